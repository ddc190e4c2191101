"""``kmlbus plot``: a trace written here becomes a PNG of the right size that shows the run."""

from __future__ import annotations

import struct
import subprocess
import sys
import os
from pathlib import Path

import numpy as np
import pytest

from kmlbus.bus import models
from kmlbus.bus.config import FieldSchema, ProxySchema
from kmlbus.bus.tracefile import TraceError, TraceWriter
from kmlbus.contract import spec
from kmlbus.tools import plot
from kmlbus.wire import codec

SP = spec.load()
MODE, REASON, ARM = SP.enums["mode"], SP.enums["reason"], SP.enums["arm"]
ROOT = Path(__file__).resolve().parent.parent
S = 1_000_000_000
#: (seconds into the run, new mode, reason): the climb, a demotion, and a climb back
CLIMB = [(5, "learning", "recovery"), (10, "collaboration", "promotion"),
         (15, "recommendation", "promotion"), (22, "learning", "demotion"),
         (26, "collaboration", "promotion")]


def schema() -> ProxySchema:
    return ProxySchema("sample", tuple(FieldSchema(n, 1000) for n in models.SAMPLE_FEATURES),
                       FieldSchema("window", 1, 1, 64), 64, 1000, 1)


def write_run(path: Path, seconds: int = 30, t0: int = 1_700_000_000 * S, gap: tuple[int, int] | None = None
              ) -> None:
    """A 30 s run at 100 decisions/s through :data:`CLIMB`; the model arm decides in
    collaboration (half) and recommendation (all) and scores 0.9 against the default's 0.5."""
    sample, feedback = codec.struct_dtype("sample"), codec.struct_dtype("feedback")
    changes = dict((t, (m, r)) for t, m, r in CLIMB)
    mode, seq = "emergency", 0
    with TraceWriter(path, [schema()]) as w:
        for tenth in range(seconds * 10):
            t = t0 + tenth * S // 10
            if tenth % 10 == 0 and tenth // 10 in changes:
                new, why = changes[tenth // 10]
                w.mode("sample", MODE.value(new), MODE.value(mode), REASON.value(why), ts=t)
                mode = new
            if gap is not None and gap[0] * 10 <= tenth < gap[1] * 10:
                continue
            tel = np.zeros(10, sample)
            tel["seq"] = np.arange(seq + 1, seq + 11)
            seq += 10
            tel["mode"] = MODE.value(mode)
            share = {"collaboration": 5, "recommendation": 10}.get(mode, 0)
            tel["arm"][:share] = ARM.value("model")
            w.telemetry("sample", tel, ts=t)
            fb = np.zeros(10, feedback)
            fb["seq"], fb["arm"] = tel["seq"], tel["arm"]
            fb["efficiency"] = np.where(tel["arm"] == ARM.value("model"), 900, 500)
            w.feedback("sample", fb, ts=t + S // 20)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's signature and IHDR chunk (raises if it is not a PNG)."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", head[:8]
    assert head[12:16] == b"IHDR"
    w, h = struct.unpack(">II", head[16:24])
    return w, h


def test_a_run_is_read_into_modes_transitions_and_per_arm_efficiency(tmp_path: Path) -> None:
    p = tmp_path / "run.kmltrace"
    write_run(p)
    run = plot.load_run(p)
    assert run.proxy == "sample"
    assert [(tr.old, tr.new, tr.reason) for tr in run.transitions] == [
        ("emergency", "learning", "recovery"), ("learning", "collaboration", "promotion"),
        ("collaboration", "recommendation", "promotion"), ("recommendation", "learning", "demotion"),
        ("learning", "collaboration", "promotion")]
    assert [tr.t for tr in run.transitions] == pytest.approx([5, 10, 15, 22, 26])
    assert [m for _, _, m in run.spans] == ["emergency", "learning", "collaboration", "recommendation",
                                            "learning", "collaboration"]
    assert run.spans[0][0] == 0 and run.spans[3][:2] == pytest.approx((15, 22))
    assert run.modes_seen() == list(MODE.entries)
    model = run.fb_arm == ARM.value("model")
    assert run.fb_eff[model] == pytest.approx(0.9) and run.fb_eff[~model] == pytest.approx(0.5)
    assert len(run.dec_t) == 3000 and run.duration == pytest.approx(29.95)


def test_a_silence_in_the_trace_is_left_unshaded(tmp_path: Path) -> None:
    p = tmp_path / "run.kmltrace"
    write_run(p, gap=(17, 21))  # the bus was gone: no telemetry, no feedback
    spans = plot.load_run(p).spans
    rec = [s for s in spans if s[2] == "recommendation"]
    assert len(rec) == 2 and rec[0][1] == pytest.approx(16.9) and rec[1][0] == pytest.approx(21.0)


def test_the_plot_is_a_png_of_the_requested_size(tmp_path: Path) -> None:
    p = tmp_path / "run.kmltrace"
    write_run(p)
    out = plot.draw(plot.load_run(p), tmp_path / "run.png", size=(12, 8), dpi=100)
    assert png_size(out) == (1200, 800)
    small = plot.draw(plot.load_run(p), tmp_path / "small.png", size=(6, 4), dpi=50)
    assert png_size(small) == (300, 200)


def test_kmlbus_plot_writes_the_png_and_prints_its_path(tmp_path: Path) -> None:
    p = tmp_path / "run.kmltrace"
    write_run(p)
    out = tmp_path / "run.png"
    done = subprocess.run([sys.executable, "-m", "kmlbus", "plot", str(p), "-o", str(out)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    assert png_size(out) == (1200, 800)


def test_a_trace_without_the_proxy_is_one_line_and_no_picture(tmp_path: Path) -> None:
    p = tmp_path / "run.kmltrace"
    write_run(p, seconds=2)
    with pytest.raises(TraceError, match="no records of proxy other"):
        plot.load_run(p, "other")
    empty = tmp_path / "empty.kmltrace"
    TraceWriter(empty).close()
    done = subprocess.run([sys.executable, "-m", "kmlbus", "plot", str(empty), "-o", str(tmp_path / "x.png")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          timeout=120, check=False)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "no records" in done.stderr
    assert not (tmp_path / "x.png").exists()


def test_the_demos_bus_config_records_a_trace_that_draws_the_climb(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's config (``[bus] trace``) run by the real daemon against the stand-in:
    the trace it leaves is drawn with every mode and the climb's transitions."""
    from kmlbus.bus.config import load
    from kmlbus.bus.daemon import Bus
    from kmlbus.tools import demo
    from tests.support.standin import StandinKernel

    monkeypatch.setenv("KMLBUS_STATE", str(tmp_path / "state.json"))
    trace = tmp_path / "out" / "demo.kmltrace"
    models.save(models.sample_good_model(), tmp_path / "sample.onnx")
    cfg = load(demo._write_config(tmp_path, trace))
    assert cfg.bus.trace == trace
    k = StandinKernel(seed=1)
    trace.parent.mkdir()
    bus = Bus(cfg, clock=k.clock.now, opener=k.open, state_path=tmp_path / "state.json")
    assert bus.connect()
    end = k.clock.now() + 40
    while k.clock.now() < end and k.find("sample").mode_name != "recommendation":
        bus.step()
    bus.run(2.0)
    bus.shutdown()
    run = plot.load_run(trace)
    assert run.modes_seen() == list(MODE.entries)
    assert [(t.new, t.reason) for t in run.transitions][:3] == [
        ("learning", "recovery"), ("collaboration", "promotion"), ("recommendation", "promotion")]
    model = run.fb_arm == ARM.value("model")
    assert run.fb_eff[model].mean() > run.fb_eff[~model].mean()
    assert png_size(plot.draw(run, tmp_path / "demo.png")) == (1200, 800)
