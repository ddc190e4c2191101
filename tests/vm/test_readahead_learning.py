"""The bus learns the readahead window from the kernel's feedback and climbs through the modes.

Runs inside the guest (``python -m kmlbus.vm test tests/vm/test_readahead_learning.py``).
A bus with ``learn = true`` and ``learner = "tree"``, no model and no pin,
serves proxy ``readahead`` while fio runs the mixed workload (a sequential
reader and a random mmap reader on one null_blk device at 200 us + 200 MB/s),
then the random mmap and the sequential one alone, in turn:
it explores in learning, fits, hot-swaps the fit, and the proxy must reach
recommendation through collaboration on the kernel's evidence (the model
arm's measured progress rate beating the default arm's).  The learned model
must then give the random mmap reader a small window and the sequential
reader a large one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from kmlbus.contract import spec as kspec
from kmlbus.tools.bench_readahead import fio_args
from kmlbus.tools.plot import load_run
from kmlbus.vm import project_root
from kmlbus.vm.guest import dmesg_mark, dmesg_problems, insmod, is_loaded, rmmod
from kmlbus.vm.nullblk import NullBlk, drop_caches
from kmlbus.wire.netlink import Connection

pytestmark = pytest.mark.vm

RA_KO = project_root() / "kernel" / "readahead" / "kmlbus_readahead.ko"
KMLBUS_KO = project_root() / "kernel" / "kmlbus.ko"
DEV = "nullb0"
MODE = kspec.load().enums["mode"]
#: the longest the climb may take under TCG (bus start, exploration, fits, two promotions)
CLIMB_S = 420.0


def _unload() -> None:
    for name in ("kmlbus_readahead", "kmlbus"):
        if is_loaded(name):
            rmmod(name)


@pytest.fixture
def files(tmp_path: Path) -> Iterator[dict[str, Path]]:
    _unload()
    mark = dmesg_mark()
    with NullBlk("/run/kmlbus-ra-learn", name=DEV, size_mb=512, completion_nsec=200_000,
                 mbps=200) as d:
        fs = {"seq": d.make_file("seq", 192), "rand": d.make_file("rand", 128)}
        insmod(KMLBUS_KO)
        try:
            insmod(RA_KO, devices=DEV)
            yield fs
        finally:
            _unload()
    noise = dmesg_problems(mark)
    assert not noise, f"kernel log problems during the test: {noise[:5]}"


def _mode() -> str:
    with Connection() as c:
        return MODE.name_of(int(c.proxy("readahead")["mode"]))


def test_bus_learns_windows_and_the_proxy_climbs_to_recommendation(
        files: dict[str, Path], tmp_path: Path) -> None:
    trace, learned = tmp_path / "live.kmltrace", tmp_path / "learned.onnx"
    (tmp_path / "bus.toml").write_text(
        f'[bus]\nttl_ms = 5000\nlatency_budget_ms = 1000\ntrace = "{trace}"\n\n'
        '[proxy.readahead]\nlearn = true\nlearner = "tree"\nexplore = 300\n'
        f'learn_every_s = 5\nlearned_model = "{learned}"\n')
    env = dict(os.environ, KMLBUS_STATE=str(tmp_path / "state.json"))
    log = open(tmp_path / "bus.log", "wb")  # noqa: SIM115 - closed below
    bus = subprocess.Popen([sys.executable, "-m", "kmlbus", "run", "--config",
                            str(tmp_path / "bus.toml")], stdout=log, stderr=subprocess.STDOUT,
                           env=env)
    seen = []
    try:
        end = time.monotonic() + CLIMB_S
        while time.monotonic() < end:
            assert bus.poll() is None, (tmp_path / "bus.log").read_text()[-3000:]
            for wl in ("mixed", "rand_mmap", "seq4k"):  # as the benchmark's climb
                drop_caches()
                subprocess.run(fio_args(wl, files, 1.5), capture_output=True, check=True)
            mode = _mode()
            if not seen or seen[-1] != mode:
                seen.append(mode)
            if mode == "recommendation":
                break
        with Connection() as c:
            counters = c.proxy("readahead")["counters"]
        status = subprocess.run([sys.executable, "-m", "kmlbus", "status", "--json"],
                                capture_output=True, text=True, env=env, check=False).stdout
    finally:
        bus.terminate()
        bus.wait(timeout=60)
        log.close()
    out = (tmp_path / "bus.log").read_text()
    assert seen[-1] == "recommendation", f"modes seen: {seen}\n{status[-3000:]}\n{out[-2000:]}"
    moves = [(t.old, t.new, t.reason) for t in load_run(trace, "readahead").transitions]
    assert ("learning", "collaboration", "promotion") in moves, moves
    assert ("collaboration", "recommendation", "promotion") in moves, moves
    assert "learned model installed" in out
    assert counters["decisions-model"] > 0
    # what it learned: the reader's own access pattern decides the window
    sess = ort.InferenceSession(learned.read_bytes())
    x = np.array([[0.0, 1.0, 1.0, 13.0, 32.0],    # random mmap: no sequential run, long jumps
                  [1.0, 1.0, 0.0, 0.0, 32.0]],    # sequential 4 KiB reads
                 dtype=np.float32)
    rand_w, seq_w = sess.run(None, {sess.get_inputs()[0].name: x})[0].ravel().tolist()
    assert rand_w < 32 < seq_w, (rand_w, seq_w)
