"""The readahead benchmark's fio command lines and result table (host side, no VM)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from kmlbus.tools.bench_readahead import (
    GRID_KB,
    Results,
    fio_args,
    main,
    parse_rule_variant,
    RA_FEATURES,
    rule_model,
    summarize,
)

FILES = {"seq": Path("/d/seq"), "rand": Path("/d/rand")}


def test_fio_reads_buffered_without_hints_and_invalidates() -> None:
    args = fio_args("seq4k", FILES, 1.5)
    for opt in ("--fadvise_hint=0", "--invalidate=1", "--direct=0", "--time_based", "--runtime=1.5s"):
        assert opt in args


def test_mixed_runs_a_sequential_reader_and_a_random_mmap_reader_on_two_files() -> None:
    args = fio_args("mixed", FILES, 2)
    jobs = " ".join(args).split("--name=")[1:]
    assert len(jobs) == 2
    assert "--filename=/d/seq --rw=read --bs=4k --ioengine=psync" in jobs[0]
    assert "--filename=/d/rand --rw=randread --bs=4k --ioengine=mmap" in jobs[1]


def test_rule_baseline_is_8_mib_for_sequential_streams_and_0_otherwise() -> None:
    sess = ort.InferenceSession(rule_model().SerializeToString())
    x = np.zeros((2, RA_FEATURES), dtype=np.float32)
    x[0, 0], x[1, 0] = 0.9, 0.2
    assert sess.run(None, {"features": x})[0].ravel().tolist() == [2048.0, 0.0]


def test_table_names_each_streams_oracle_and_the_best_static_setting_on_mixed() -> None:
    res = Results({})
    speeds = {0: (1.0, 40.0), 128: (20.0, 10.0), 1024: (60.0, 5.0), 8192: (80.0, 1.0)}
    for kb, (seq, mm) in speeds.items():
        for wl in ("seq4k", "seq64k", "rand_psync", "rand_mmap"):
            res.add("2ms", f"static {kb}", wl, {wl: seq if wl.startswith("seq") else mm})
        res.add("2ms", f"static {kb}", "mixed", {"seq4k": seq, "rand_mmap": mm})
    for wl in ("seq4k", "seq64k", "rand_psync", "rand_mmap"):
        res.add("2ms", "proxy rule", wl, {wl: 80.0 if wl.startswith("seq") else 40.0})
    res.add("2ms", "proxy rule", "mixed", {"seq4k": 80.0, "rand_mmap": 40.0})
    out = summarize(res, GRID_KB)
    assert "80.0 @ 8192" in out and "40.0 @    0" in out
    # geometric means over the default (20, 10): 0 KiB 0.89x, 128 1x, 1024 1.22x, 8192 0.89x
    assert "best static 1024 KiB 1.22x" in out
    assert "proxy rule: 4.00x (3.27 x best static)" in out


def test_json_results_round_trip_and_draw_a_png(tmp_path: Path) -> None:
    import json

    from kmlbus.tools.bench_readahead import LIVE, draw, load_results

    runs = []
    for kb, (seq, mm) in {0: (1.0, 40.0), 128: (20.0, 10.0), 8192: (80.0, 1.0)}.items():
        for wl, st in (("seq4k", "seq4k"), ("rand_mmap", "rand_mmap"), ("mixed", "seq4k"),
                       ("mixed", "rand_mmap")):
            runs.append({"device": "2ms", "policy": f"static {kb}", "workload": wl, "stream": st,
                         "mibs": [seq if st == "seq4k" else mm] * 3})
    runs.append({"device": "2ms", "policy": LIVE, "workload": "mixed", "stream": "rand_mmap",
                 "mibs": [30.0, 35.0, 40.0]})
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"grid": [0, 128, 8192], "reached": {"2ms": "recommendation"},
                                "runs": runs}))
    res, grid = load_results(path)
    assert grid == [0, 128, 8192] and res.reached == {"2ms": "recommendation"}
    assert res.runs[("2ms", LIVE, "mixed", "rand_mmap")] == [30.0, 35.0, 40.0]
    assert f"{LIVE}: learned from the kernel's feedback with no model and no pin; measured in " \
           "recommendation" in summarize(res, grid)
    png = draw(path, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000


def test_rule_variant_names_a_run_and_its_module_parameters() -> None:
    assert parse_rule_variant("w0:warmup_accesses=0") == ("w0", {"warmup_accesses": 0})
    assert parse_rule_variant("h250-w32:hold_ms=250,warmup_accesses=32") == (
        "h250-w32", {"hold_ms": 250, "warmup_accesses": 32})


@pytest.mark.parametrize("text, says", [
    ("warmup_accesses=0", "expected NAME:param=N"),
    (":warmup_accesses=0", "expected NAME:param=N"),
    ("w 0:warmup_accesses=0", "expected NAME:param=N"),
    ("w0:", "'' is not param=N"),
    ("w0:warmup_accesses", "is not param=N"),
    ("w0:warmup_accesses=0,", "'' is not param=N"),
    ("w0:Warmup=1", "is not param=N"),
    ("w0:warmup_accesses=eight", "is not an integer"),
    ("w0:warmup_accesses=1.5", "is not an integer"),
    ("w0:hold_ms=1,hold_ms=2", "hold_ms is given twice"),
    ("d:devices=1", "devices is not a setting to compare"),
])
def test_rule_variant_refuses_malformed_text_and_says_why(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_rule_variant(text)


def test_rule_variant_on_the_command_line_fails_before_any_run(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--rule-variant", "w0:warmup_accesses=x", "--here"])
    assert e.value.code == 2
    assert "warmup_accesses='x' is not an integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--rule-variant", "a:hold_ms=1", "--rule-variant", "a:hold_ms=2", "--here"])
    assert "names must differ: a, a" in capsys.readouterr().err


def test_table_of_a_run_without_the_mixed_workload_has_no_mixed_line() -> None:
    res = Results({})
    for kb, v in ((0, 3.0), (128, 1.0), (8192, 0.2)):
        res.add("2ms", f"static {kb}", "lmdb", {"get_k/s": v})
    res.add("2ms", "proxy rule", "lmdb", {"get_k/s": 2.0})
    res.add("2ms", "proxy rule w0", "lmdb", {"get_k/s": 0.5})
    out = summarize(res, (0, 128, 8192))
    assert "mixed" not in out and "nan" not in out
    assert "3.0 @    0" in out and "proxy rule w0" in out
