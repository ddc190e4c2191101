"""The bus's capacity on one host core: recorded telemetry through decode -> model -> encode.

``python -m kmlbus.tools.bench_capacity`` needs no kernel and no VM.  It makes
telemetry datagrams exactly as ``kmlbus.ko`` sends them (one message per
datagram, ``msg-samples`` records each, the sample proxy's schema), then feeds
the same bytes to two readers, alternating in rounds so the machine's drift
falls on both:

* the floor: the bare parse of :class:`kmlbus.tools.rawtelemetry.TelemetryParser`
  (headers walked with ``struct``, records counted; the VM benchmarks' floor);
* the bus's path when it is behind: each datagram decoded as the connection
  decodes it (:func:`kmlbus.wire.codec.peek_event`), a receive's worth of
  batches (``DRAIN_MAX`` datagrams) joined per proxy as ``Bus.handle_all``
  does, the dispatcher's latest-per-key selection and one ONNX inference
  (:class:`kmlbus.bus.dispatcher.Dispatcher`), and the ``recommend`` requests
  encoded (:func:`kmlbus.wire.codec.encode_recommend`).

It prints samples per second of each and their ratio.  The load is the bytes in
memory, so neither side waits for a generator: what is measured is the reader.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from kmlbus.bus import models
from kmlbus.bus.config import FieldSchema, ProxySchema, loads
from kmlbus.bus.dispatcher import Dispatcher
from kmlbus.bus.registry import ModelRegistry
from kmlbus.contract import spec as kspec
from kmlbus.tools.rawtelemetry import TelemetryParser
from kmlbus.wire import codec
from kmlbus.wire.netlink import DRAIN_MAX

__all__ = ["datagrams", "main", "run"]

FAMILY_ID = 0x20
PROXY_ID = 1
#: keys of the sample proxy's recommendation table
NKEYS = 64


def datagrams(count: int, *, seed: int = 1) -> list[bytes]:
    """*count* telemetry datagrams of the sample proxy, ``msg-samples`` records each."""
    sp = kspec.load()
    per = int(sp.consts["msg-samples"])
    rng = np.random.default_rng(seed)
    out = []
    seq = 1
    for _ in range(count):
        recs = np.zeros(per, dtype=codec.struct_dtype("sample"))
        recs["seq"] = np.arange(seq, seq + per)
        recs["ts_ns"] = recs["seq"] * 5000
        recs["key"] = rng.integers(0, NKEYS, per)
        recs["decision"] = 8
        recs["features"][:, :3] = rng.integers(0, 1000, (per, 3))
        seq += per
        out.append(codec.encode_msg(FAMILY_ID, "telemetry", {"id": PROXY_ID, "records": recs},
                                    seq=0, flags=0))
    return out


def sample_schema() -> ProxySchema:
    """The sample proxy's schema as its ``get`` reply gives it (kernel/samples/kmlbus_sample.c)."""
    return ProxySchema("sample", tuple(FieldSchema(n, 1000) for n in models.SAMPLE_FEATURES),
                       FieldSchema("window", 1, 1, 64), NKEYS, id=PROXY_ID)


def _dispatcher(workdir: Path) -> Dispatcher:
    """The sample proxy bound to its good model, as the daemon binds it."""
    (workdir / "good.onnx").write_bytes(models.to_bytes(models.sample_good_model()))
    cfg = loads('[bus]\nlatency_budget_ms = 1000\n[proxy.sample]\nmodel = "good.onnx"\n',
                workdir / "capacity.toml")
    registry = ModelRegistry(cfg)
    registry.bind(sample_schema())
    return Dispatcher(registry)


def floor_pass(data: Sequence[bytes], parser: TelemetryParser) -> int:
    """Samples counted by the bare parse of every datagram."""
    n = 0
    t = time.monotonic_ns()
    for d in data:
        for b in parser.parse(d, len(d), t):
            n += b.records
    return n


def bus_pass(data: Sequence[bytes], dispatcher: Dispatcher) -> int:
    """Samples taken through decode -> join -> model -> encoded ``recommend`` requests."""
    n = 0
    rec_size = kspec.load().structs["rec"].size
    chunk = int(kspec.load().consts["max-recs"]) * rec_size
    for start in range(0, len(data), DRAIN_MAX):
        parts = []
        for d in data[start:start + DRAIN_MAX]:
            m = codec.peek_event(d, FAMILY_ID, views=False)
            if m is not None and m.op == "telemetry":
                parts.append(m.attrs["records"])
        arr = np.frombuffer(b"".join(p.tobytes() for p in parts), dtype=parts[0].dtype)
        recs = dispatcher.handle_telemetry_packed("sample", arr)
        for off in range(0, len(recs), chunk):
            codec.encode_recommend(FAMILY_ID, PROXY_ID, recs[off:off + chunk], seq=1,
                                   flags=codec.NLM_F_REQUEST)
        n += len(arr)
    return n


def _rate(fn: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def run(n_datagrams: int = 8192, rounds: int = 7, verbose: bool = True) -> dict[str, float]:
    """Median samples/s of the floor and the bus over *rounds* alternating rounds, and the ratio."""
    data = datagrams(n_datagrams)
    parser = TelemetryParser(FAMILY_ID)
    with tempfile.TemporaryDirectory(prefix="kmlbus-capacity-") as tmp:
        dispatcher = _dispatcher(Path(tmp))
        bus_pass(data[:DRAIN_MAX], dispatcher)  # warm up onnxruntime
        floor: list[float] = []
        bus: list[float] = []
        for _ in range(rounds):
            floor.append(_rate(lambda: floor_pass(data, parser)))
            bus.append(_rate(lambda: bus_pass(data, dispatcher)))
        inferences = dispatcher.counters_of("sample").inferences
    out = {
        "floor_samples_s": statistics.median(floor),
        "bus_samples_s": statistics.median(bus),
        "floor_min": min(floor), "floor_max": max(floor),
        "bus_min": min(bus), "bus_max": max(bus),
        "inferences": float(inferences),
    }
    out["ratio"] = out["bus_samples_s"] / out["floor_samples_s"]
    if verbose:
        per = int(kspec.load().consts["msg-samples"])
        print(f"{n_datagrams} datagrams x {per} samples, {rounds} alternating rounds, one core "
              f"(medians, min-max)")
        print(f"  floor: bare parse          {out['floor_samples_s'] / 1e6:6.2f} M samples/s "
              f"({out['floor_min'] / 1e6:.2f}-{out['floor_max'] / 1e6:.2f})")
        print(f"  bus: decode, model, encode {out['bus_samples_s'] / 1e6:6.2f} M samples/s "
              f"({out['bus_min'] / 1e6:.2f}-{out['bus_max'] / 1e6:.2f})")
        print(f"  ratio bus / floor          {out['ratio']:6.2f}x")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m kmlbus.tools.bench_capacity [--datagrams N] [--rounds R]``."""
    ap = argparse.ArgumentParser(prog="python -m kmlbus.tools.bench_capacity",
                                 description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--datagrams", type=int, default=8192, help="datagrams per pass (default 8192)")
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds (default 7)")
    args = ap.parse_args(argv)
    run(args.datagrams, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
