"""The trace file format: record the bus's batches to a msgpack file and replay them.

A trace is a stream of msgpack objects::

    header  {"format": "kmlbus-trace", "version": 1, "family": "kmlbus",
             "spec_version": 1, "created_ns": ..., "structs": {name: numpy descr},
             "schemas": {proxy: get-reply attrs}}
    record  {"kind": "telemetry" | "feedback" | "recs" | "mode" | "schema",
             "ts": ns since the epoch, "proxy": name, "data": bytes}

``data`` is the raw bytes of a numpy array of the spec struct of that kind
(``sample``, ``feedback``, ``rec``), or of :data:`MODE_EVENT_DTYPE`; the
header records each struct's layout, so a trace stays readable after the
spec grows.  ``schema`` records (a proxy seen after the header was written)
carry msgpack-encoded get-reply attributes and are folded into the reader's
schemas, not yielded.

Reading never lets a msgpack exception escape: a corrupt or truncated trace
raises :class:`TraceError` naming the file and the byte offset of the first
object that could not be read.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import msgpack
import numpy as np
import numpy.typing as npt

from kmlbus.contract import spec as _spec
from kmlbus.wire import codec

from .config import ProxySchema

__all__ = [
    "FORMAT",
    "KINDS",
    "MODE_EVENT_DTYPE",
    "TraceError",
    "TraceEvent",
    "TraceHeader",
    "TraceReader",
    "TraceWriter",
    "collect",
    "VERSION",
    "open_trace",
    "read_header",
    "replay",
]

FORMAT = "kmlbus-trace"
VERSION = 1
#: record kind -> spec struct of its data
KINDS = {"telemetry": "sample", "feedback": "feedback", "recs": "rec", "mode": "mode-event"}
#: a mode change as recorded (values are the spec's mode/reason enum numbers)
MODE_EVENT_DTYPE: np.dtype[np.void] = np.dtype(
    [("mode", "<u4"), ("old_mode", "<u4"), ("reason", "<u4")])
_MAX_OBJECT = 64 << 20  # no single record may claim more (the kernel's batches are tiny)
log = logging.getLogger(__name__)


class TraceError(ValueError):
    """A trace file is unreadable, corrupt, truncated or from an unknown format."""


def _struct_dtypes() -> dict[str, np.dtype[np.void]]:
    out: dict[str, np.dtype[np.void]] = {
        KINDS[k]: codec.struct_dtype(KINDS[k]) for k in ("telemetry", "feedback", "recs")}
    out["mode-event"] = MODE_EVENT_DTYPE
    return out


def _descr(dt: np.dtype[np.void]) -> list[list[Any]]:
    return [list(item) for item in dt.descr]


def _dtype_from_descr(raw: Any) -> np.dtype[np.void]:
    fields: list[tuple[Any, ...]] = []
    for item in raw:
        name, typ = str(item[0]), str(item[1])
        if len(item) > 2:
            fields.append((name, typ, tuple(int(n) for n in item[2])))
        else:
            fields.append((name, typ))
    try:
        dt: np.dtype[np.void] = np.dtype(fields)
    except SyntaxError as e:  # numpy parses some type strings with ast.literal_eval
        raise ValueError(f"unusable type in struct layout {raw!r}: {e.msg}") from None
    if dt.hasobject or dt.itemsize == 0:  # records are plain bytes: never objects, never empty
        raise ValueError(f"unusable struct layout {raw!r}")
    return dt


# --------------------------------------------------------------------------
# Writing


class TraceWriter:
    """Write batches to a trace file (context manager).

    One writer per file; each ``write`` is one msgpack object, buffered and
    flushed at least every ``flush_s`` seconds and on :meth:`close`.  The
    daemon opens it on ``[bus] trace`` and calls :meth:`telemetry`,
    :meth:`feedback`, :meth:`recs` and :meth:`mode` as batches pass through.

    With ``append=True`` an existing trace is continued: its header must
    describe the same struct layouts, and a record cut short by a crash is
    cut off first (the trace before it stays valid).  Otherwise the file is
    replaced.
    """

    def __init__(self, path: str | os.PathLike[str],
                 schemas: Iterable[ProxySchema] | Mapping[str, ProxySchema] = (), *,
                 append: bool = False, flush_s: float = 1.0) -> None:
        self.path = Path(path)
        items = list(schemas.values() if isinstance(schemas, Mapping) else schemas)
        self._dtypes = _struct_dtypes()
        self._packer = msgpack.Packer(use_bin_type=True)
        self._flush_s = flush_s
        self._last_flush = time.monotonic()
        self.records = 0
        if append and self.path.exists() and self.path.stat().st_size > 0:
            known, end = _resume_point(self.path, self._dtypes)
            self._schemas = dict(known)
            self._f: BinaryIO = open(self.path, "r+b")
            self._f.truncate(end)
            self._f.seek(end)
            for sch in items:
                self.add_schema(sch)
            return
        self._schemas = {sch.name: sch for sch in items}
        self._f = open(self.path, "wb")
        sp = _spec.load()
        header = {
            "format": FORMAT, "version": VERSION, "family": sp.name,
            "spec_version": sp.version, "created_ns": time.time_ns(),
            "structs": {k: _descr(v) for k, v in self._dtypes.items()},
            "schemas": {n: sch.to_attrs() for n, sch in self._schemas.items()},
        }
        self._f.write(self._packer.pack(header))

    def add_schema(self, schema: ProxySchema) -> None:
        """Record a proxy that appeared after the trace was opened."""
        if self._schemas.get(schema.name) == schema:
            return
        self._schemas[schema.name] = schema
        self._put("schema", schema.name, self._packer.pack(schema.to_attrs()), None)

    def _put(self, kind: str, proxy: str, data: bytes, ts: int | None) -> None:
        rec = {"kind": kind, "ts": time.time_ns() if ts is None else ts, "proxy": proxy,
               "data": data}
        self._f.write(self._packer.pack(rec))
        self.records += 1
        now = time.monotonic()
        if now - self._last_flush >= self._flush_s:
            self._f.flush()
            self._last_flush = now

    def write(self, kind: str, proxy: str, array: npt.NDArray[np.void],
              ts: int | None = None) -> None:
        """Record one batch; *array* must have the dtype of *kind*'s struct, packed or as
        a decoded message's batch (:func:`kmlbus.wire.codec.run_dtype`), stored packed."""
        if kind not in KINDS:
            raise ValueError(f"trace kind {kind!r}: expected one of {', '.join(KINDS)}")
        want = self._dtypes[KINDS[kind]]
        if array.dtype != want:
            if array.dtype != codec.run_dtype(KINDS[kind]):
                raise ValueError(f"trace {kind} batch: expected dtype of struct {KINDS[kind]}, "
                                 f"found {array.dtype}")
            array = codec.packed(array, KINDS[kind])
        self._put(kind, proxy, np.ascontiguousarray(array).tobytes(), ts)

    def telemetry(self, proxy: str, records: npt.NDArray[np.void], ts: int | None = None) -> None:
        self.write("telemetry", proxy, records, ts)

    def feedback(self, proxy: str, feedback: npt.NDArray[np.void], ts: int | None = None) -> None:
        self.write("feedback", proxy, feedback, ts)

    def recs(self, proxy: str, recs: npt.NDArray[np.void], ts: int | None = None) -> None:
        self.write("recs", proxy, recs, ts)

    def mode(self, proxy: str, mode: int, old_mode: int, reason: int,
             ts: int | None = None) -> None:
        """Record a mode change (enum numbers of the spec's ``mode`` and ``reason``)."""
        a = np.zeros(1, dtype=MODE_EVENT_DTYPE)
        a["mode"], a["old_mode"], a["reason"] = mode, old_mode, reason
        self.write("mode", proxy, a, ts)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _resume_point(path: Path, dtypes: Mapping[str, np.dtype[np.void]]
                  ) -> tuple[dict[str, ProxySchema], int]:
    """Schemas known to an existing trace and the offset after its last whole record."""
    reader = open_trace(path)
    for k, dt in dtypes.items():
        if reader.header.dtypes.get(k) != dt:
            reader.close()
            raise TraceError(f"{path}: cannot append: the trace's struct {k} layout differs "
                             "from this kmlbus (start a new trace)")
    try:
        for _ in reader:
            pass
    except TraceError as e:
        if "truncated" not in str(e):
            raise
        log.warning("%s: dropping a partial record at offset %d before appending",
                    path, reader._offset)
    # the reader stops at the end of the last whole object, schema records included
    return dict(reader.schemas), reader._offset


# --------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class TraceHeader:
    """What a trace says about itself."""

    version: int
    spec_version: int
    created_ns: int
    dtypes: Mapping[str, np.dtype[np.void]]
    schemas: Mapping[str, ProxySchema]


@dataclass(frozen=True)
class TraceEvent:
    """One recorded batch; ``offset`` is where its msgpack object starts in the file."""

    kind: str
    ts: int
    proxy: str
    data: npt.NDArray[np.void]
    offset: int


@dataclass
class TraceReader:
    """Iterate a trace's events; ``schemas`` grows as ``schema`` records pass."""

    path: Path
    header: TraceHeader
    schemas: dict[str, ProxySchema] = field(default_factory=dict)
    _unpacker: Any = None
    _file: Any = None
    _offset: int = 0
    _size: int = 0

    def __iter__(self) -> Iterator[TraceEvent]:
        try:
            while True:
                start = self._offset
                obj = _next(self._unpacker, self.path, start)
                if obj is _EOF:
                    if start != self._size:
                        raise TraceError(f"{self.path}: truncated at offset {start}: "
                                         f"{self._size - start} trailing bytes are not a "
                                         "complete record")
                    return
                self._offset = self._unpacker.tell()
                ev = self._event(obj, start)
                if ev is not None:
                    yield ev
        finally:
            self.close()

    def _event(self, obj: Any, off: int) -> TraceEvent | None:
        def bad(why: str) -> TraceError:
            return TraceError(f"{self.path}: record at offset {off}: {why}")

        if not isinstance(obj, dict):
            raise bad(f"expected a map, found {type(obj).__name__}")
        kind, ts, proxy, data = (obj.get(k) for k in ("kind", "ts", "proxy", "data"))
        if not isinstance(proxy, str):
            raise bad(f"expected a proxy name, found {proxy!r}")
        if not isinstance(ts, int):
            raise bad(f"expected an integer ts, found {ts!r}")
        if not isinstance(data, bytes):
            raise bad(f"expected binary data, found {type(data).__name__}")
        if kind == "schema":
            try:
                attrs = msgpack.unpackb(data, raw=False)
                self.schemas[proxy] = ProxySchema.from_attrs(attrs)
            except (LookupError, TypeError, ValueError, AttributeError) as e:
                raise bad(f"unreadable schema: {e}") from None
            return None
        if kind not in KINDS:
            raise bad(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
        dt = self.header.dtypes.get(KINDS[kind])
        if dt is None:
            raise bad(f"header has no layout for struct {KINDS[kind]}")
        if len(data) % dt.itemsize:
            raise bad(f"{kind} data of {len(data)} bytes is not a whole number of "
                      f"{dt.itemsize}-byte {KINDS[kind]} structs")
        return TraceEvent(kind, ts, proxy, np.frombuffer(data, dtype=dt), off)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _Eof:
    pass


_EOF = _Eof()


def _next(unpacker: Any, path: Path, offset: int) -> Any:
    """The next object, :data:`_EOF` at a clean or truncated end; never a msgpack exception."""
    try:
        return next(unpacker)
    except StopIteration:
        return _EOF
    except Exception as e:  # msgpack raises FormatError, StackError, ExtraData, UnicodeError...
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TraceError(f"{path}: corrupt trace at offset {offset}: {why}") from None


def open_trace(path: str | os.PathLike[str]) -> TraceReader:
    """Open a trace and read its header (raises :class:`TraceError`)."""
    p = Path(path)
    try:
        f = open(p, "rb")
        size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise TraceError(f"{p}: cannot open trace: {e.strerror}") from None
    unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=_MAX_OBJECT,
                                strict_map_key=True)
    try:
        raw = _next(unpacker, p, 0)
        if raw is _EOF:
            why = "empty file" if size == 0 else "truncated header"
            raise TraceError(f"{p}: not a kmlbus trace ({why}) at offset 0")
        header = _header(p, raw)
    except BaseException:
        f.close()
        raise
    reader = TraceReader(p, header, dict(header.schemas))
    reader._unpacker, reader._file, reader._size = unpacker, f, size
    reader._offset = unpacker.tell()
    return reader


def _header(p: Path, raw: Any) -> TraceHeader:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise TraceError(f"{p}: not a kmlbus trace at offset 0 (expected a header map with "
                         f"format {FORMAT!r})")
    version = raw.get("version")
    if version != VERSION:
        raise TraceError(f"{p}: trace format version {version!r}, this kmlbus reads {VERSION}")
    try:
        dtypes = {str(k): _dtype_from_descr(v) for k, v in raw["structs"].items()}
        schemas = {str(k): ProxySchema.from_attrs(v) for k, v in raw.get("schemas", {}).items()}
        return TraceHeader(int(version), int(raw.get("spec_version", 0)),
                           int(raw.get("created_ns", 0)), dtypes, schemas)
    except (LookupError, TypeError, ValueError, AttributeError) as e:  # ConfigError is a ValueError
        raise TraceError(f"{p}: malformed trace header at offset 0: {e}") from None


def read_header(path: str | os.PathLike[str]) -> TraceHeader:
    """Just the header of the trace at *path*."""
    r = open_trace(path)
    r.close()
    return r.header


def replay(path: str | os.PathLike[str]) -> Iterator[TraceEvent]:
    """Yield the recorded batches of *path* in order, as numpy arrays."""
    yield from open_trace(path)


def collect(path: str | os.PathLike[str], proxy: str | None
             ) -> tuple[TraceReader, str, ProxySchema, npt.NDArray[np.void], npt.NDArray[np.void]]:
    """All telemetry and feedback of one proxy (default: the first one recorded), each joined
    into one array of this spec's layout; with the reader (for its header and schemas).

    Raises :class:`TraceError` when the trace holds no batch or no schema of the proxy.
    """
    reader = open_trace(path)
    tel: list[npt.NDArray[np.void]] = []
    fb: list[npt.NDArray[np.void]] = []
    for ev in reader:
        if proxy is None and ev.kind in ("telemetry", "feedback"):
            proxy = ev.proxy
        if ev.proxy != proxy:
            continue
        if ev.kind == "telemetry":
            tel.append(ev.data)
        elif ev.kind == "feedback":
            fb.append(ev.data)
    if proxy is None:
        raise TraceError(f"{reader.path}: no telemetry or feedback recorded")
    schema = reader.schemas.get(proxy)
    if schema is None:
        raise TraceError(f"{reader.path}: no schema recorded for proxy {proxy!r}")
    sample_dt, fb_dt = codec.struct_dtype("sample"), codec.struct_dtype("feedback")
    t = _by_name(reader.path, tel, sample_dt)
    f = _by_name(reader.path, fb, fb_dt)
    return reader, proxy, schema, t, f


def _by_name(path: Path, parts: list[npt.NDArray[np.void]], dt: np.dtype[np.void]
             ) -> npt.NDArray[np.void]:
    """Concatenate recorded batches into this spec's layout, field by field name.

    (numpy's structured ``astype`` matches fields by position, which would
    silently mix fields if a later spec reordered them.)
    """
    if not parts:
        return np.zeros(0, dt)
    try:
        src = np.concatenate(parts)
    except (TypeError, ValueError) as e:
        raise TraceError(f"{path}: recorded batches have differing layouts: {e}") from None
    if src.dtype == dt:
        return src
    out = np.zeros(len(src), dt)
    for name in dt.names or ():
        if src.dtype.names is None or name not in src.dtype.names:
            raise TraceError(f"{path}: recorded struct lacks field {name!r} that this kmlbus needs")
        try:
            out[name] = src[name]
        except (TypeError, ValueError) as e:
            raise TraceError(f"{path}: recorded field {name!r} does not convert: {e}") from None
    return out
