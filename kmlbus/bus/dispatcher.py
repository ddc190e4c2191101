"""Turn a telemetry batch into a recommendation batch: the bus's hot path.

For one batch of ``sample`` records of one proxy the dispatcher keeps the
latest sample of each key (by ``seq``), converts its fixed-point features to
float (``raw / scale``, vectorised), runs the proxy's model once on all rows,
converts back to fixed point (``round(y * out_scale)``), clamps to the
recommendation's [min, max] and returns one ``rec`` per distinct key with the
configured ttl.  Only the latest sample per key matters because a key is one
recommendation slot in the kernel: an older prediction would be overwritten
in the same batch anyway.

Keys outside the proxy's ``nkeys`` are dropped and counted (``recommend`` is
all-or-nothing in the kernel, so one bad key would lose the whole batch), as
are rows where the model produced NaN.  An inference failure is counted and
raised as :class:`InferenceError`; the daemon turns it into a fault.
"""

from __future__ import annotations

import functools
import logging
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt

from kmlbus.contract import spec as _spec
from kmlbus.wire import codec

from .config import Binding, ProxySchema
from .latency import LatencyHistogram
from .fixedpoint import (
    SMALL_BATCH,
    Conversion,
    conversion,
    features_to_float,
    sample_rows,
    to_fixed_lazy,
)
from .registry import ModelRegistry, ModelRuntimeError, NoModelError

__all__ = [
    "DispatchError",
    "Dispatcher",
    "InferenceError",
    "ProxyCounters",
    "RecordsError",
    "latest_per_key",
]

log = logging.getLogger(__name__)

_Y = TypeVar("_Y")


class DispatchError(Exception):
    """A batch could not be turned into recommendations; ``.proxy`` names the proxy."""

    def __init__(self, proxy: str, message: str) -> None:
        super().__init__(message)
        self.proxy = proxy


class InferenceError(DispatchError):
    """The model failed (or is missing) for this batch: a fault for the daemon."""


class RecordsError(DispatchError):
    """The records are not an array of the spec's ``sample`` struct."""


@dataclass
class ProxyCounters:
    """Per-proxy dispatcher counters (monotonic, except ``last_batch_ns``)."""

    batches: int = 0
    records: int = 0
    inferences: int = 0
    inference_ns: int = 0
    recs_sent: int = 0
    clamped: int = 0
    errors: int = 0
    bad_keys: int = 0
    nonfinite: int = 0
    over_budget: int = 0
    last_batch_ns: int = 0
    max_batch_ns: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _sample_dtype() -> np.dtype[np.void]:
    return codec.struct_dtype("sample")


def _sample_run_dtype() -> np.dtype[np.void]:
    return codec.run_dtype("sample")


def _rec_dtype() -> np.dtype[np.void]:
    return codec.struct_dtype("rec")


_INF = float("inf")


@functools.lru_cache(maxsize=None)
def _rec_pack(n: int) -> struct.Struct:
    """``struct`` layout of *n* consecutive ``rec`` records (from the spec)."""
    fmt = _spec.load().struct_format("rec")
    return struct.Struct(fmt[0] + fmt[1:] * n)

def latest_per_key(records: npt.NDArray[np.void]) -> npt.NDArray[np.intp]:
    """Indices into *records* of the highest-``seq`` sample of each distinct key, by key.

    Of two samples with the same key and seq, the later row wins.  (Kernel-sized
    batches take :meth:`Dispatcher._handle_small` instead, which picks the same rows
    in plain Python; a property test holds the two paths equal.)
    """
    if len(records) == 0:
        return np.zeros(0, dtype=np.intp)
    seq, keys = records["seq"], records["key"]
    if bool((seq[1:] >= seq[:-1]).all()) and int(keys.max()) <= 0xFFFF:
        # The usual backlog: one proxy's samples in ring order.  The last row of each
        # key is then its latest; a stable sort of 16-bit keys is numpy's radix sort,
        # several times cheaper than the two-key lexsort on a receive's worth (8192).
        order = np.argsort(keys.astype(np.uint16), kind="stable")
    else:
        # lexsort: last key is primary -> sorted by key, then seq (stable: then row order)
        order = np.lexsort((seq, keys))
    k = keys[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = k[1:] != k[:-1]
    return order[last].astype(np.intp)


class Dispatcher:
    """Per-proxy telemetry -> recommendation conversion with counters and latency.

    *registry* holds each proxy's binding and model; *schemas* (optional)
    are bound in the registry without loading a model if not bound yet, so a
    dispatcher can be built before models load.
    """

    def __init__(self, registry: ModelRegistry,
                 schemas: Mapping[str, ProxySchema] | Iterable[ProxySchema] | None = None) -> None:
        self.registry = registry
        self.counters: dict[str, ProxyCounters] = {}
        #: per proxy: how long each telemetry batch took to become recommendations
        self.latency: dict[str, LatencyHistogram] = {}
        items = schemas.values() if isinstance(schemas, Mapping) else (schemas or ())
        for s in items:
            if s.name not in registry.proxies:
                registry.bind(s, load=False)
        self._budget_ns = int(registry.config.bus.latency_budget_ms * 1e6)

    def counters_of(self, proxy: str) -> ProxyCounters:
        """Counters of *proxy* (created zeroed on first use)."""
        c = self.counters.get(proxy)
        if c is None:
            c = self.counters[proxy] = ProxyCounters()
        return c

    def latency_of(self, proxy: str) -> LatencyHistogram:
        """The batch latency histogram of *proxy* (created empty on first use)."""
        h = self.latency.get(proxy)
        if h is None:
            h = self.latency[proxy] = LatencyHistogram()
        return h

    @property
    def latency_budget_ns(self) -> int:
        return self._budget_ns

    def over_budget(self, proxy: str) -> bool:
        """Whether the last batch of *proxy* took longer than the latency budget."""
        return self.counters_of(proxy).last_batch_ns > self._budget_ns

    def handle_telemetry(self, proxy: str, records: npt.NDArray[np.void]) -> npt.NDArray[np.void]:
        """One telemetry batch -> an array of ``rec`` (possibly empty) to send to the kernel.

        Raises :class:`InferenceError` when the model is missing or fails and
        :class:`RecordsError` for records of the wrong dtype.  The batch's
        wall time is in ``counters_of(proxy).last_batch_ns``.
        """
        out = self._timed(proxy, records)
        return out if isinstance(out, np.ndarray) else np.frombuffer(bytearray(out), dtype=_rec_dtype())

    def handle_telemetry_packed(self, proxy: str,
                                records: npt.NDArray[np.void] | memoryview | bytes) -> bytes:
        """:meth:`handle_telemetry`'s recommendations as the bytes ``recommend`` carries
        (``rec`` structs back to back): the daemon's hot path, which sends them before
        it makes any array of them.

        *records* may also be the bytes of the samples' run of attributes, as a
        telemetry message carries them (:func:`kmlbus.wire.codec.peek_event`); a
        kernel-sized batch is then answered without any array of it at all.
        """
        out = self._timed(proxy, records)
        return out if isinstance(out, bytes) else out.tobytes()

    def _timed(self, proxy: str, records: npt.NDArray[np.void] | memoryview | bytes
               ) -> npt.NDArray[np.void] | bytes:
        t0 = time.perf_counter_ns()
        c = self.counters_of(proxy)
        try:
            return self._handle(proxy, records, c)
        finally:
            dt = time.perf_counter_ns() - t0
            c.last_batch_ns = dt
            c.max_batch_ns = max(c.max_batch_ns, dt)
            self.latency_of(proxy).observe(dt)
            if dt > self._budget_ns:
                c.over_budget += 1

    def _handle(self, proxy: str, records: npt.NDArray[np.void] | memoryview | bytes,
                c: ProxyCounters) -> npt.NDArray[np.void] | bytes:
        b = self.registry.binding(proxy)
        rec_dt = _rec_dtype()
        if isinstance(records, (bytes, memoryview)):
            size = _sample_run_dtype().itemsize
            if len(records) % size:
                c.errors += 1
                raise RecordsError(proxy, f"proxy {proxy}: telemetry records: {len(records)} "
                                          f"bytes is not a whole number of {size}-byte sample "
                                          f"attributes")
            n = len(records) // size
        elif isinstance(records, np.ndarray) and (records.dtype is _sample_run_dtype()
                                                  or records.dtype == _sample_dtype()
                                                  or records.dtype == _sample_run_dtype()):
            n = len(records)
        else:
            c.errors += 1
            found = records.dtype if isinstance(records, np.ndarray) else type(records).__name__
            raise RecordsError(proxy, f"proxy {proxy}: telemetry records: expected an array of "
                                      f"struct sample, found {found}")
        c.batches += 1
        c.records += n
        if n == 0:
            return np.zeros(0, dtype=rec_dt)
        conv = conversion(b)
        if n <= SMALL_BATCH and conv.nonzero:
            return self._handle_small(proxy, records, b, conv, c)
        if not isinstance(records, np.ndarray):
            records = np.frombuffer(records, dtype=_sample_run_dtype())
        if int(records["key"].max()) >= b.schema.nkeys:
            good = records["key"] < b.schema.nkeys
            c.bad_keys += int(len(records) - np.count_nonzero(good))
            records = records[good]
        idx = latest_per_key(records)
        if len(idx) == 0:
            return np.zeros(0, dtype=rec_dt)
        latest = records[idx]
        x = features_to_float(latest, b)
        y = self._infer(proxy, len(x), c, lambda: self.registry.predict(proxy, x))
        fixed, clamped, valid = to_fixed_lazy(y, b)
        c.clamped += int(np.count_nonzero(clamped))
        keys = latest["key"]
        if valid is not None:
            nnan = int(len(valid) - np.count_nonzero(valid))
            c.nonfinite += nnan
            log.warning("proxy %s: model produced %d NaN values, dropped", proxy, nnan)
            keys, fixed = keys[valid], fixed[valid]
        out = np.empty(len(keys), dtype=rec_dt)
        out["key"] = keys
        out["value"] = fixed
        out["ttl_ms"] = b.ttl_ms
        c.recs_sent += len(out)
        return out

    def _infer(self, proxy: str, n: int, c: ProxyCounters, run: Callable[[], _Y]) -> _Y:
        """One inference of *n* rows (*run*, a registry predict), counted and timed; a
        model failure is counted and raised as :class:`InferenceError`."""
        t0 = time.perf_counter_ns()
        try:
            y = run()
        except (ModelRuntimeError, NoModelError) as e:
            c.errors += 1
            raise InferenceError(proxy, str(e)) from e
        finally:
            c.inference_ns += time.perf_counter_ns() - t0
        c.inferences += n
        return y

    def _handle_small(self, proxy: str, records: npt.NDArray[np.void] | memoryview | bytes,
                      b: Binding, conv: Conversion, c: ProxyCounters) -> bytes:
        """:meth:`_handle` for a kernel-sized batch: packed ``rec`` bytes, computed in plain
        Python around one array for the inference.

        Each numpy call costs tens of microseconds under emulation (hundreds when
        its code has gone cold between two batches), more than a few Python
        operations on 32 records.  The arithmetic is the same as the general
        path's (latest sample per key with the later row winning a tie, float64
        division rounded once to float32, half-to-even rounding, clamping); a
        property test holds the two paths to identical bytes and counters.
        """
        stride = records.itemsize if isinstance(records, np.ndarray) else _sample_run_dtype().itemsize
        unpack, i_seq, i_key, _ = sample_rows(stride)
        try:
            rows = unpack.iter_unpack(cast(Any, records))  # the array's own bytes, no copy
        except (ValueError, TypeError, BufferError):  # a non-contiguous view
            rows = unpack.iter_unpack(bytes(records))
        nkeys = b.schema.nkeys
        best: dict[int, tuple[Any, ...]] = {}
        bad = 0
        for row in rows:
            k = row[i_key]
            if k >= nkeys:
                bad += 1
                continue
            o = best.get(k)
            if o is None or row[i_seq] >= o[i_seq]:
                best[k] = row
        c.bad_keys += bad
        if not best:
            return b""
        order = sorted(best)
        feats = [[best[k][i] / d for i, d in conv.pairs] for k in order]
        def run() -> list[float]:
            return self.registry.predict_rows(proxy, feats)

        if conv.tiny:
            with np.errstate(over="ignore"):  # a silly divisor gives inf; the model sees it
                y = self._infer(proxy, len(feats), c, run)
        else:
            y = self._infer(proxy, len(feats), c, run)
        lo, hi, scale, ttl = b.rec_min, b.rec_max, b.out_scale, b.ttl_ms
        out: list[int] = []  # key, value, ttl of each record, flat
        nan = clamped = 0
        for k, v in zip(order, y):
            r = v * scale
            if r != r:  # NaN: no recommendation for this key
                nan += 1
                continue
            # rounded first, then clamped, as _to_fixed does (infinities just clamp)
            value = round(r) if -_INF < r < _INF else (hi if r > 0 else lo)  # half to even
            if value < lo or value > hi or not -_INF < r < _INF:
                clamped += 1
                value = min(max(value, lo), hi)
            out += (k, value, ttl)
        c.clamped += clamped
        if nan:
            c.nonfinite += nan
            log.warning("proxy %s: model produced %d NaN values, dropped", proxy, nan)
        n = len(out) // 3
        c.recs_sent += n
        return _rec_pack(n).pack(*out)
