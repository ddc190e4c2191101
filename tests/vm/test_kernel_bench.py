"""The in-kernel benchmark plumbing: kmlbus_bench.ko and kmlbus.ko's ``flush_batch``.

No timing assertions: these check that the benchmark measures what it claims
(the fresh path really decides by the model arm, the default path never
does), that its numbers parse, that it loads and unloads without kernel log
noise, and that ``flush_batch`` really sets the records per telemetry message.
"""

from __future__ import annotations

import errno
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kmlbus.tools.bench_kernel import BENCH_KO, decide_ns, parallel_dps, parse_result, telemetry_rate
from kmlbus.wire import codec
from kmlbus.wire.netlink import Connection
from kmlbus.vm.guest import dmesg_mark, dmesg_since, insmod, is_loaded, rmmod

pytestmark = pytest.mark.vm

FLUSH_BATCH = Path("/sys/module/kmlbus/parameters/flush_batch")
BENCH_PARAMS = Path("/sys/module/kmlbus_bench/parameters")
_EXPECTED_LOG = ("taints kernel", "verification failed")


def _noise(mark: int) -> list[str]:
    return [m for m in dmesg_since(mark) if "kmlbus" in m and not any(x in m for x in _EXPECTED_LOG)]


def test_decide_bench_runs_the_fresh_path_and_unloads_cleanly(kmlbus_module: int) -> None:
    mark = dmesg_mark()
    r = decide_ns(2000)
    assert not is_loaded("kmlbus_bench")
    for k in ("baseline_ns", "decide_default_ns", "decide_fresh_ns"):
        assert math.isfinite(r[k]) and r[k] > 0, r
    assert r["iters"] >= 2000 and r["chunks"] >= 1, r
    assert r["fresh_model"] == r["iters"], f"fresh path not decided by the model: {r}"
    assert r["default_model"] == 0, f"default path used a recommendation: {r}"
    assert not _noise(mark), _noise(mark)


def test_bench_params_before_a_run_and_invalid_iters(kmlbus_module: int) -> None:
    insmod(BENCH_KO)
    try:
        assert (BENCH_PARAMS / "result").read_text().strip() == "none"
        with pytest.raises(ValueError):
            parse_result("none")
        for bad in ("0", "10", "x", "-1", "999999999999"):
            with pytest.raises(OSError):
                (BENCH_PARAMS / "iters").write_text(f"{bad}\n")
        assert (BENCH_PARAMS / "iters").read_text().strip() == "200000"
        with Connection() as c:
            p = c.proxy("bench")
            assert codec.enum_name("mode", int(p["mode"])) == "recommendation", p
            assert p["nkeys"] == 64, p
        # without recommendations every decision of both paths is the default's
        (BENCH_PARAMS / "iters").write_text("1000\n")
        (BENCH_PARAMS / "run").write_text("1\n")
        r = parse_result((BENCH_PARAMS / "result").read_text())
        assert r["fresh_model"] == 0 and r["default_model"] == 0, r
    finally:
        rmmod("kmlbus_bench")


@pytest.mark.sample_params(rate=0)
def test_flush_batch_one_sends_one_record_per_message(modules: Any) -> None:
    assert FLUSH_BATCH.read_text().strip() == "32"
    one = telemetry_rate(1.0, 1, 3000)
    assert one["messages_per_s"] > 0, one
    assert one["max_records_per_message"] == 1 and one["records_per_message"] == 1.0, one
    batched = telemetry_rate(1.0, 32, 3000)
    assert batched["max_records_per_message"] > 1, batched
    assert batched["max_records_per_message"] <= 32, batched
    assert FLUSH_BATCH.read_text().strip() == "32", "flush_batch not restored"


def test_flush_batch_rejects_invalid_values(kmlbus_module: int) -> None:
    for bad in ("0", "33", "-1", "x", ""):
        with pytest.raises(OSError):
            FLUSH_BATCH.write_text(f"{bad}\n")
    assert FLUSH_BATCH.read_text().strip() == "32"
    FLUSH_BATCH.write_text("7\n")
    try:
        assert FLUSH_BATCH.read_text().strip() == "7"
    finally:
        FLUSH_BATCH.write_text("32\n")


def test_insmod_with_run_1_runs_once_after_init(kmlbus_module: int) -> None:
    # parameters are parsed before init: run=1 used to reach a NULL proxy
    insmod(BENCH_KO, iters=1000, run=1)
    try:
        r = parse_result((BENCH_PARAMS / "result").read_text())
        assert r["iters"] == 1000 and r["fresh_model"] == 0, r
    finally:
        rmmod("kmlbus_bench")


def test_rmmod_during_a_run_stops_it_before_the_proxy_is_freed(kmlbus_module: int) -> None:
    insmod(BENCH_KO)
    outcome: list[object] = []

    def run() -> None:
        fd = os.open(BENCH_PARAMS / "run", os.O_WRONLY)
        try:
            os.write(fd, b"1\n")
            outcome.append("finished")
        except OSError as e:
            outcome.append(e.errno)
        finally:
            os.close(fd)

    (BENCH_PARAMS / "iters").write_text("50000000\n")  # minutes under TCG: still running at rmmod
    writer = threading.Thread(target=run)
    writer.start()
    try:
        with Connection() as c:
            while not c.proxy("bench")["counters"]["samples"] and writer.is_alive():
                time.sleep(0.05)
        assert writer.is_alive(), outcome
        rmmod("kmlbus_bench")  # exit ends the run, then frees the proxy
    finally:
        writer.join(timeout=120)
    assert not writer.is_alive(), "the run outlived rmmod"
    assert outcome == [errno.ECANCELED], outcome


def test_parallel_bench_reports_both_rates(kmlbus_module: int) -> None:
    mark = dmesg_mark()
    r = parallel_dps(1000)
    assert not is_loaded("kmlbus_bench")
    assert r["cpus"] == os.cpu_count() and r["iters"] == 1000, r
    assert r["one_cpu_dps"] > 0 and r["all_cpus_dps"] > 0, r
    assert not _noise(mark), _noise(mark)
