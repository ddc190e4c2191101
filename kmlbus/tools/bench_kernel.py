"""In-kernel benchmarks, run inside the VM: decide cost and telemetry delivery.

* `decide_ns`: nanoseconds per ``kml_proxy_decide`` with no recommendation
  (the default decides) and with a fresh recommendation in recommendation mode
  (the model decides), against an empty callback called the same way, all
  measured in one run of ``kernel/bench/kmlbus_bench.ko`` (median of chunks).
* `telemetry_rate`: telemetry samples per second that reach a bare raw
  netlink socket joined to group ``telemetry``, with ``kmlbus.ko``'s
  ``flush_batch`` records per message (32 = batching, 1 = one per message),
  while ``kmlbus_sample.ko`` makes ``rate`` decisions per second.

``python3 -m kmlbus.vm run -- python3 -m kmlbus.tools.bench_kernel`` prints both as
a table with ratios against the baseline measured in the same run.  Modules
that are not loaded are loaded for the measurement and unloaded afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kmlbus.tools.rawtelemetry import TelemetryReader
from kmlbus.vm.guest import (
    KMLBUS_KO,
    SAMPLE_KO,
    insmod,
    is_loaded,
    rmmod,
    sample_param,
    set_sample_param,
)
from kmlbus.vm.kernels import project_root
from kmlbus.wire.netlink import Connection

__all__ = ["BENCH_KO", "decide_ns", "main", "parallel_dps", "parse_result", "telemetry_rate"]

BENCH_KO = project_root() / "kernel" / "bench" / "kmlbus_bench.ko"
FRESH_KEYS = 32  # the bench module measures the fresh path on keys 0..31
_SYS_MODULE = Path("/sys/module")


@contextmanager
def _loaded(name: str, path: Path, **params: object) -> Iterator[bool]:
    """Make sure module *name* is loaded; unload it afterwards only if this loaded it."""
    mine = not is_loaded(name)
    if mine:
        insmod(path, **params)
    try:
        yield mine
    finally:
        if mine:
            rmmod(name)


def _param_path(module: str, name: str) -> Path:
    return _SYS_MODULE / module / "parameters" / name


def _write_param(module: str, name: str, value: object) -> None:
    _param_path(module, name).write_text(f"{value}\n")


def _read_param(module: str, name: str) -> str:
    return _param_path(module, name).read_text().strip()


def parse_result(text: str) -> dict[str, float]:
    """Parse the bench module's ``result`` line (``key=value`` pairs) into floats.

    Raises ValueError when the module has not run yet (``none``) or a field is not a number.
    """
    text = text.strip()
    if not text or text == "none":
        raise ValueError("the bench module has no result yet")
    out: dict[str, float] = {}
    for part in text.split():
        key, sep, val = part.partition("=")
        if not sep:
            raise ValueError(f"malformed field {part!r} in {text!r}")
        out[key] = float(val)
    return out


def decide_ns(iters: int) -> dict[str, float]:
    """Run kmlbus_bench.ko once with *iters* calls per path; returns its result as floats.

    Keys: ``baseline_ns``, ``decide_default_ns``, ``decide_fresh_ns`` (median ns
    per call), ``iters``, ``chunks``, ``default_model`` and ``fresh_model``
    (decisions of that path made by the model arm: 0 and ``iters`` when the
    measured paths are the intended ones).  Keys 0..31 of proxy ``bench`` get
    fresh recommendations (value 20, 60 s) just before the run.
    """
    with _loaded("kmlbus", KMLBUS_KO), _loaded("kmlbus_bench", BENCH_KO):
        with Connection() as c:
            pid = int(c.proxy("bench")["id"])
            c.recommend(pid, [(k, 20, 60_000) for k in range(FRESH_KEYS)])
        _write_param("kmlbus_bench", "iters", iters)
        _write_param("kmlbus_bench", "run", 1)
        return parse_result(_read_param("kmlbus_bench", "result"))


def parallel_dps(iters: int) -> dict[str, float]:
    """Default decisions per second on one CPU and on every online CPU at once (kmlbus_bench.ko's
    ``run_parallel``): keys ``cpus``, ``iters`` (per thread), ``one_cpu_dps``, ``all_cpus_dps``."""
    with _loaded("kmlbus", KMLBUS_KO), _loaded("kmlbus_bench", BENCH_KO):
        _write_param("kmlbus_bench", "run_parallel", iters)
        return parse_result(_read_param("kmlbus_bench", "par_result"))


class _TelemetryReader(TelemetryReader):
    """The shared raw reader, counting one proxy's records, messages and message sizes."""

    def __init__(self, family_id: int, group_id: int, proxy_id: int) -> None:
        super().__init__(family_id, group_id)
        self.proxy_id = proxy_id
        self.records = 0
        self.messages = 0
        self.sizes: dict[int, int] = {}

    def read_until(self, deadline: float) -> None:
        """Count telemetry messages until ``time.monotonic()`` reaches *deadline*."""
        while time.monotonic() < deadline:
            for b in self.read() or ():
                if b.proxy_id == self.proxy_id:
                    self.messages += 1
                    self.records += b.records
                    self.sizes[b.records] = self.sizes.get(b.records, 0) + 1


def telemetry_rate(seconds: float, batch: int, rate: int) -> dict[str, float]:
    """Telemetry delivered to a raw reader with *batch* records per message at *rate* decisions/s.

    Sets ``kmlbus.flush_batch`` and the sample's ``rate`` for *seconds*, then
    restores both.  Returns ``samples_per_s`` (records the reader got),
    ``messages_per_s``, ``kernel_samples_per_s`` (samples the kernel
    buffered), ``made_per_s`` (samples made, buffered or dropped),
    ``records_per_message`` (mean), ``max_records_per_message``,
    ``drops`` (ring overflow), ``unheard`` and ``socket_overflows`` (ENOBUFS
    seen by the reader) over the window.
    """
    if not 1 <= batch <= 32:
        raise ValueError(f"batch must be in 1..32, not {batch}")
    with _loaded("kmlbus", KMLBUS_KO), _loaded("kmlbus_sample", SAMPLE_KO, rate=0):
        old_batch = _read_param("kmlbus", "flush_batch")
        old_rate = sample_param("rate")
        set_sample_param("rate", 0)
        _write_param("kmlbus", "flush_batch", batch)
        try:
            with Connection() as c:
                pid = int(c.proxy("sample")["id"])
                reader = _TelemetryReader(c.family_id, c.groups["telemetry"], pid)
                try:
                    reader.read_until(time.monotonic() + 0.1)  # drain what was buffered
                    reader.records = reader.messages = reader.enobufs = 0
                    reader.sizes.clear()
                    before = c.proxy(pid)["counters"]
                    t0 = time.monotonic()
                    set_sample_param("rate", rate)
                    reader.read_until(t0 + seconds)
                    set_sample_param("rate", 0)
                    elapsed = time.monotonic() - t0
                    reader.read_until(time.monotonic() + 0.1)  # the last flush (20 ms timer)
                    after = c.proxy(pid)["counters"]
                finally:
                    reader.close()
        finally:
            _write_param("kmlbus", "flush_batch", old_batch)
            set_sample_param("rate", old_rate)
    msgs = max(reader.messages, 1)
    return {
        "batch": float(batch),
        "rate": float(rate),
        "seconds": elapsed,
        "samples_per_s": reader.records / elapsed,
        "messages_per_s": reader.messages / elapsed,
        "kernel_samples_per_s": (after["samples"] - before["samples"]) / elapsed,
        "made_per_s": (after["samples"] + after["drops"] - before["samples"] - before["drops"]) / elapsed,
        "records_per_message": reader.records / msgs,
        "max_records_per_message": float(max(reader.sizes, default=0)),
        "drops": float(after["drops"] - before["drops"]),
        "unheard": float(after["unheard"] - before["unheard"]),
        "socket_overflows": float(reader.enobufs),
    }


def _ratio(x: float, base: float) -> str:
    return f"{x / base:.2f}x" if base > 0 else "n/a"


def main(argv: list[str] | None = None) -> int:
    """Run both benchmarks and print a table (``--json`` prints the raw numbers instead)."""
    ap = argparse.ArgumentParser(prog="python -m kmlbus.tools.bench_kernel", description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=200_000, help="calls per decide path (default 200000)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per telemetry run (default 3)")
    ap.add_argument("--rate", type=int, action="append",
                    help="sample decisions/s for the telemetry runs (repeatable; default 20000 and 200000)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = ap.parse_args(argv)
    rates = args.rate or [20_000, 200_000]

    d = decide_ns(args.iters)
    par = parallel_dps(args.iters)
    tele = [(telemetry_rate(args.seconds, 32, r), telemetry_rate(args.seconds, 1, r)) for r in rates]
    if args.json:
        print(json.dumps({"decide": d, "parallel": par,
                          "telemetry": [{"batched": b, "single": s} for b, s in tele]}))
        return 0

    base = d["baseline_ns"]
    print(f"decide cost, median of {int(d['chunks'])} chunks, {int(d['iters'])} calls per path")
    print(f"{'path':<38} {'ns/call':>9} {'vs empty':>9} {'extra ns':>9}")
    rows = [("empty callback (baseline)", base),
            ("decide, no recommendation (default)", d["decide_default_ns"]),
            ("decide, fresh rec (model)", d["decide_fresh_ns"])]
    for name, ns in rows:
        print(f"{name:<38} {ns:>9.2f} {_ratio(ns, base):>9} {ns - base:>9.2f}")
    print(f"model arm: default path {int(d['default_model'])}, fresh path {int(d['fresh_model'])}"
          f" of {int(d['iters'])}")
    print(f"default decisions/s, {int(par['iters'])} per thread: one CPU {par['one_cpu_dps']:.0f}, "
          f"{int(par['cpus'])} CPUs at once {par['all_cpus_dps']:.0f} "
          f"({_ratio(par['all_cpus_dps'], par['one_cpu_dps'])} of one)")
    print()
    print(f"telemetry to a raw reader, {args.seconds:g} s per run (made = decisions' samples; "
          "buffered = made - drops; ENOBUFS = reader socket overflows)")
    print(f"{'rate/s':>8} {'rec/msg':>7} {'delivered/s':>12} {'msgs/s':>10} {'made/s':>10} {'buffered/s':>10} "
          f"{'drops':>8} {'unheard':>8} {'ENOBUFS':>8} {'vs 1/msg':>9}")
    for b, s in tele:
        for r in (b, s):
            print(f"{int(r['rate']):>8} {r['records_per_message']:>7.1f} {r['samples_per_s']:>12.0f} "
                  f"{r['messages_per_s']:>10.0f} {r['made_per_s']:>10.0f} {r['kernel_samples_per_s']:>10.0f} "
                  f"{int(r['drops']):>8} "
                  f"{int(r['unheard']):>8} {int(r['socket_overflows']):>8} "
                  f"{_ratio(r['samples_per_s'], s['samples_per_s']):>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
