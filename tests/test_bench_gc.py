"""bench_gc's host-side parts: workloads, the table, the mode timeline and the PNG."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmlbus.tools import bench_gc
from kmlbus.tools.bench_gc import POLICIES, Run


def test_moving_hot_set_puts_90_percent_on_a_tenth_that_moves() -> None:
    for phase in range(9):
        zones = bench_gc.moving_hot_set(phase)[len("zoned:"):].split(":")
        pairs = [tuple(int(v) for v in z.split("/")) for z in zones]
        assert sum(a for a, _ in pairs) == 100 and sum(b for _, b in pairs) == 100
        offset = sum(b for _, b in pairs[:pairs.index((90, 10))])
        assert offset == 10 * phase  # the hot tenth starts at phase * 10% of the device
    assert bench_gc.moving_hot_set(9) == bench_gc.moving_hot_set(0)


def _run(wa: float, modes: list[str]) -> Run:
    written = [0.5 * (i + 1) for i in range(len(modes))]
    return Run(wa, 10.0, written, [wa] * len(modes), modes,
               [(x, m) for i, (x, m) in enumerate(zip(written, modes))
                if m and (i == 0 or modes[i - 1] != m)])


def test_mode_spans_follow_the_written_axis() -> None:
    run = _run(1.5, ["learning", "learning", "collaboration", "recommendation", "recommendation"])
    assert bench_gc._mode_spans(run) == [(0.0, 1.0, "learning"), (1.0, 1.5, "collaboration"),
                                         (1.5, 2.5, "recommendation")]
    assert bench_gc._mode_spans(_run(2.0, ["", ""])) == []


def test_table_ratios_are_to_the_first_policy_in_the_same_run() -> None:
    pols = [POLICIES[0], POLICIES[-1]]
    results = {("90/10", 0.8, pols[0].name): [_run(2.0, [""]), _run(2.2, [""]), _run(1.8, [""])],
               ("90/10", 0.8, pols[1].name): [_run(1.0, ["learning"]), _run(1.2, ["learning"]),
                                              _run(1.1, ["learning"])]}
    table = bench_gc._table(results, ["90/10"], [0.8], pols)
    row = table.splitlines()[-1]
    assert "| 90/10 | 80% | 2.00 (1.80-2.20; 1.00x) | 1.10 (1.00-1.20; 0.55x) |" == row
    assert "learned 90/10 80% rep 0: learning@0.50; learned models installed at none" \
        in bench_gc._timelines(results)


def test_png_has_a_panel_per_cell(tmp_path: Path) -> None:
    pols = [POLICIES[0], POLICIES[-1]]
    results = {(w, 0.8, p.name): [_run(1.5, ["learning", "collaboration"] if p.learned else ["", ""])]
               for w in ("uniform", "90/10") for p in pols}
    out = tmp_path / "gc.png"
    bench_gc.draw(results, ["uniform", "90/10"], [0.8], pols, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_policies_are_named_once_and_learned_sits_on_the_best_human_pair() -> None:
    names = [p.name for p in POLICIES]
    assert len(set(names)) == len(names)
    learned = [p for p in POLICIES if p.learned]
    assert len(learned) == 1
    best_human = next(p for p in POLICIES if p.name == "cb+hot-cold")
    assert (learned[0].victim, learned[0].placement, learned[0].streams) == (
        best_human.victim, best_human.placement, best_human.streams)


def test_saved_rows_merge_into_the_table_of_one_run(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Repetitions split over invocations (``--rows``) give the table one run would have."""
    import json

    pols = [POLICIES[0], POLICIES[-1]]
    results = {("90/10", 0.8, pols[0].name): [_run(2.0, [""]), _run(2.2, [""]), _run(1.8, [""])],
               ("90/10", 0.8, pols[1].name): [_run(1.0, ["learning"]), _run(1.2, ["learning"]),
                                              _run(1.1, ["learning", "collaboration"])]}
    files = [tmp_path / f"rep{i}.jsonl" for i in range(3)]
    for (w, u, p), runs in results.items():
        for rep, run in enumerate(runs):
            with open(files[rep], "a", encoding="utf-8") as f:
                f.write(json.dumps(bench_gc.row(w, u, p, rep, run)) + "\n")
    loaded = bench_gc.load_rows(list(reversed(files)))  # file order does not matter, reps do
    assert loaded == results
    assert bench_gc.main(["--from-rows", *map(str, files), "--policy", "greedy", "learned"]) == 0
    out = capsys.readouterr().out
    assert bench_gc._table(results, ["90/10"], [0.8], pols) in out
    assert "learned 90/10 80% rep 2: learning@0.50 -> collaboration@1.00" in out


def test_a_broken_row_is_named_with_its_file_and_line(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"workload": "90/10", "utilization": 0.8, "policy": "greedy", "wa": 2.0, '
                   '"seconds": 1}\n{"workload": "90/10"}\n')
    assert bench_gc.main(["--from-rows", str(bad)]) == 2
    assert f"{bad}:2: not a bench_gc row: KeyError" in capsys.readouterr().err
