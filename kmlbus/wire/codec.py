"""Encode and decode kmlbus generic netlink messages, driven by the family spec.

Everything family-specific (attribute numbers, types, nesting, packed struct
layouts, operation numbers) comes from :func:`kmlbus.contract.spec.load`; this module
only knows netlink itself: the ``nlmsghdr``/``genlmsghdr`` headers, the
``nlattr`` TLV format with its 4-byte alignment, and ``NLMSG_ERROR``/
``NLMSG_DONE`` with extended-ack TLVs (``include/uapi/linux/netlink.h``).

Decoding is the hot path of the bus: telemetry and feedback batches come back
as zero-copy numpy views (``np.frombuffer`` on the received bytes), never as
per-record Python objects.  A batch is a run of multi-attr attributes holding
one struct each (so YNL clients decode it as a list): its view has
:func:`run_dtype`, the struct's fields behind each 4-byte attribute header.  Decoding any byte
string raises nothing but :class:`CodecError`, so a malformed datagram costs
the caller one counter, not a crash.

The codec is pure: no sockets, no pyroute2.  :mod:`kmlbus.wire.netlink` does I/O.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from kmlbus.contract import spec as kspec

__all__ = [
    "CodecError",
    "Message",
    "NLA_ALIGNTO",
    "NLA_F_NESTED",
    "NLA_F_NET_BYTEORDER",
    "NLA_TYPE_MASK",
    "NLMSG_DONE",
    "NLMSG_ERROR",
    "NLMSG_MIN_TYPE",
    "NLMSG_NOOP",
    "NLMSG_OVERRUN",
    "NLMSGERR_ATTR_MISS_NEST",
    "NLMSGERR_ATTR_MISS_TYPE",
    "NLMSGERR_ATTR_MSG",
    "NLMSGERR_ATTR_OFFS",
    "NLM_F_ACK",
    "NLM_F_ACK_TLVS",
    "NLM_F_CAPPED",
    "NLM_F_DUMP",
    "NLM_F_DUMP_INTR",
    "NLM_F_MULTI",
    "NLM_F_REQUEST",
    "attr_run",
    "decode_attrs",
    "decode_msg",
    "clear_caches",
    "decode_one",
    "encode_attrs",
    "encode_msg",
    "enum_name",
    "iter_attrs",
    "iter_nlmsgs",
    "nla_align",
    "pack_attr",
    "pack_genlmsg",
    "pack_nlmsg",
    "packed",
    "records",
    "run_dtype",
    "run_length",
]

# --- netlink constants (include/uapi/linux/netlink.h, genetlink.h) ---------
NLMSG_NOOP = 0x1
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLMSG_OVERRUN = 0x4
NLMSG_MIN_TYPE = 0x10

NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_CAPPED = 0x100  # on NLMSG_ERROR: the echoed request is only its header
NLM_F_ACK_TLVS = 0x200  # on NLMSG_ERROR/DONE: extended-ack TLVs follow

NLMSGERR_ATTR_MSG = 1
NLMSGERR_ATTR_OFFS = 2
NLMSGERR_ATTR_MISS_TYPE = 5  # Linux 6.0+: number of a missing required attribute
NLMSGERR_ATTR_MISS_NEST = 6  # Linux 6.0+: offset of the nest it was missing from

NLA_ALIGNTO = 4
NLA_F_NESTED = 1 << 15
NLA_F_NET_BYTEORDER = 1 << 14
NLA_TYPE_MASK = 0xFFFF & ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, portid
_GENLHDR = struct.Struct("=BBH")  # cmd, version, reserved
_NLAHDR = struct.Struct("=HH")  # len, type
_ERRNO = struct.Struct("=i")

#: YNL scalar attribute types -> struct codes (host byte order, like the kernel's nla_put_u32).
_INT_CODES = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q", "s8": "b", "s16": "h", "s32": "i", "s64": "q"}


class CodecError(ValueError):
    """A message or value does not fit the kmlbus wire format.

    The only exception that decoding raises, whatever the input bytes.
    """


@dataclass
class Message:
    """One decoded netlink message.

    ``type`` is the nlmsg type (the family id for genl messages, or
    ``NLMSG_ERROR``/``NLMSG_DONE``); ``cmd``/``op`` are the genl command and
    its spec name (``""`` when unknown or not a kmlbus message).  ``error`` is
    the kernel's value as on the wire: a negative errno (``-errno.EINVAL``),
    0 for an ACK or a successful dump;
    ``extack`` is the kernel's extended-ack message.  ``extack_missing`` is the
    number of a required attribute the kernel says is missing (-1 if none).
    ``payload`` keeps the raw attribute bytes of genl messages that were not
    decoded as kmlbus (other families, e.g. nlctrl).
    """

    type: int
    flags: int
    seq: int
    portid: int
    cmd: int
    op: str
    attrs: dict[str, Any]
    error: int = 0
    extack: str = ""
    extack_offset: int = -1
    extack_missing: int = -1
    payload: bytes = field(default=b"", repr=False)


#: numpy codes for YNL scalar member types (host byte order).
_NUMPY_SCALAR = {
    "u8": "u1", "u16": "u2", "u32": "u4", "u64": "u8",
    "s8": "i1", "s16": "i2", "s32": "i4", "s64": "i8",
}


@functools.cache
def struct_dtype(name: str) -> np.dtype[np.void]:
    """numpy structured dtype of spec struct *name*, with its exact C layout (host order)."""
    sd = kspec.load().structs[name]
    fields: list[Any] = []
    for m in sd.members:
        key = m.name.replace("-", "_")
        if m.type in _NUMPY_SCALAR:
            fields.append((key, "=" + _NUMPY_SCALAR[m.type]))
        elif m.sub_type:
            fields.append((key, "=" + _NUMPY_SCALAR[m.sub_type], (m.count,)))
        else:
            fields.append((key, "V%d" % m.len))
    dt: np.dtype[np.void] = np.dtype(fields)
    if dt.itemsize != sd.size:
        raise kspec.SpecError(f"struct {name}: numpy size {dt.itemsize} != {sd.size}")
    return dt


@functools.cache
def run_dtype(name: str) -> np.dtype[np.void]:
    """numpy dtype of spec struct *name* as a message carries a batch of it: one
    attribute per struct, back to back, so element *i* sits at ``i * (4 + size)``
    with its fields 4 bytes (the ``nlattr`` header) in.  Same field names as
    :func:`struct_dtype`; decoded batches are views of this dtype."""
    dt = struct_dtype(name)
    if dt.itemsize % NLA_ALIGNTO:
        raise kspec.SpecError(f"struct {name}: {dt.itemsize} bytes is not a multiple of "
                              f"{NLA_ALIGNTO}, so a run of its attributes has no fixed stride")
    names = list(dt.names or ())
    fields: Mapping[str, Any] = dt.fields or {}
    return np.dtype({"names": names, "formats": [fields[n][0] for n in names],
                     "offsets": [fields[n][1] + _NLAHDR.size for n in names],
                     "itemsize": _NLAHDR.size + dt.itemsize})


def packed(array: npt.NDArray[np.void], name: str) -> npt.NDArray[np.void]:
    """*array* (a decoded batch of :func:`run_dtype`, or already packed) with
    :func:`struct_dtype` of struct *name*: the C layout, back to back (a copy if needed)."""
    dt = struct_dtype(name)
    return array if array.dtype == dt else array.astype(dt)


def run_length(buf: bytes, off: int, end: int, header: int, stride: int) -> int:
    """How many attributes whose first 4 bytes are *header* (``nla_len | nla_type << 16``,
    host order) start at ``buf[off]``, ``buf[off + stride]``, ... before *end*.

    The hot path's check of a batch: the headers' bytes are compared in four strided
    slices of *buf* (C loops, no Python step per attribute)."""
    m = (end - off) // stride
    if m <= 0:
        return 0
    want = _run_heads(header, m)
    stop = off + m * stride
    if (buf[off:stop:stride] == want[0] and buf[off + 1:stop:stride] == want[1]
            and buf[off + 2:stop:stride] == want[2] and buf[off + 3:stop:stride] == want[3]):
        return m
    k = 0  # the run ends before *end*: find where, one header at a time
    while k < m and _U32.unpack_from(buf, off + k * stride)[0] == header:
        k += 1
    return k


_U32 = struct.Struct("=I")


@functools.lru_cache(maxsize=256)
def _run_heads(header: int, m: int) -> tuple[bytes, bytes, bytes, bytes]:
    """Byte *i* of *header*, *m* times, for i in 0..3 (what :func:`run_length` compares)."""
    raw = _U32.pack(header)
    return (bytes([raw[0]]) * m, bytes([raw[1]]) * m, bytes([raw[2]]) * m, bytes([raw[3]]) * m)


def attr_run(nla_type: int, size: int, raw: bytes | memoryview) -> bytes:
    """*raw* (structs of *size* bytes back to back) as a run of attributes of
    *nla_type*, one struct each."""
    if not raw:
        return b""
    hdr = _NLAHDR.pack(_NLAHDR.size + size, nla_type)
    return hdr + hdr.join([raw[i:i + size] for i in range(0, len(raw), size)])


def nla_align(n: int) -> int:
    """Round *n* up to the netlink attribute alignment (NLA_ALIGNTO, 4)."""
    return (n + NLA_ALIGNTO - 1) & ~(NLA_ALIGNTO - 1)


def pack_attr(nla_type: int, payload: bytes, *, nested: bool = False) -> bytes:
    """One ``nlattr``: header, payload, zero padding to 4 bytes."""
    n = _NLAHDR.size + len(payload)
    if n > 0xFFFF:
        raise CodecError(f"attribute {nla_type}: {len(payload)} bytes do not fit in one nlattr (max 65531)")
    flag = NLA_F_NESTED if nested else 0
    return _NLAHDR.pack(n, nla_type | flag) + payload + b"\0" * (nla_align(n) - n)


def pack_nlmsg(msg_type: int, flags: int, seq: int, payload: bytes, portid: int = 0) -> bytes:
    """One ``nlmsghdr`` followed by *payload* (padded to 4 bytes)."""
    n = _NLMSGHDR.size + len(payload)
    return _NLMSGHDR.pack(n, msg_type, flags, seq & 0xFFFFFFFF, portid) + payload + b"\0" * (nla_align(n) - n)


def pack_genlmsg(family_id: int, cmd: int, version: int, attrs: bytes, *, seq: int, flags: int) -> bytes:
    """A complete generic netlink message: nlmsghdr, genlmsghdr, attributes."""
    return pack_nlmsg(family_id, flags, seq, _GENLHDR.pack(cmd, version, 0) + attrs)


def iter_attrs(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int, int]]:
    """Walk the attributes in ``data[start:end]``.

    Yields ``(type, flags, payload_start, payload_end)``; ``type`` has the
    NLA_F_NESTED/NLA_F_NET_BYTEORDER bits removed (they are in ``flags``).
    Raises :class:`CodecError` on a truncated or overlong attribute.
    """
    stop = len(data) if end is None else end
    off = start
    while off + _NLAHDR.size <= stop:
        nla_len, nla_type = _NLAHDR.unpack_from(data, off)
        if nla_len < _NLAHDR.size or off + nla_len > stop:
            raise CodecError(f"attribute at offset {off}: length {nla_len} does not fit in {stop - off} bytes")
        yield nla_type & NLA_TYPE_MASK, nla_type & ~NLA_TYPE_MASK, off + _NLAHDR.size, off + nla_len
        off += (nla_len + NLA_ALIGNTO - 1) & ~(NLA_ALIGNTO - 1)
    if off < stop:
        raise CodecError(f"{stop - off} trailing bytes after the last attribute")


def iter_nlmsgs(data: bytes) -> Iterator[tuple[int, int, int, int, int, int]]:
    """Walk the netlink messages of one datagram.

    Yields ``(type, flags, seq, portid, payload_start, payload_end)``.
    Raises :class:`CodecError` on a truncated header or an impossible length.
    """
    off = 0
    n = len(data)
    while off < n:
        if off + _NLMSGHDR.size > n:
            raise CodecError(f"netlink header at offset {off}: only {n - off} bytes left")
        mlen, mtype, mflags, seq, portid = _NLMSGHDR.unpack_from(data, off)
        if mlen < _NLMSGHDR.size or off + mlen > n:
            raise CodecError(f"netlink message at offset {off}: length {mlen} does not fit in {n - off} bytes")
        yield mtype, mflags, seq, portid, off + _NLMSGHDR.size, off + mlen
        off += nla_align(mlen)


# --- spec-driven attribute tables ------------------------------------------

_Decoder = Callable[[bytes, int, int], Any]
_Encoder = Callable[[Any], bytes]


@dataclass(frozen=True)
class _AttrCodec:
    """How one spec attribute goes on and off the wire."""

    attr: kspec.Attr
    decode: _Decoder
    encode: _Encoder
    nested: bool
    #: multi-attr struct (a batch, one struct per attribute): the struct's size, else 0
    run: int = 0


def _int_codec(set_name: str, attr: kspec.Attr, enums: Mapping[str, kspec.Enum]) -> tuple[_Decoder, _Encoder]:
    st = struct.Struct("=" + _INT_CODES[attr.type])
    signed = attr.type.startswith("s")
    bits = 8 * st.size
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    enum = enums.get(attr.enum) if attr.enum else None
    where = f"{set_name}.{attr.name}"

    def dec(buf: bytes, a: int, b: int) -> Any:
        if b - a != st.size:
            raise CodecError(f"{where} ({attr.type}): expected {st.size} bytes, found {b - a}")
        return st.unpack_from(buf, a)[0]

    def enc(v: Any) -> bytes:
        if isinstance(v, str) and enum is not None:
            try:
                v = enum.value(v)
            except ValueError:
                raise CodecError(f"{where}: {v!r} is not one of {list(enum.entries)}") from None
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise CodecError(f"{where} ({attr.type}): expected an int, found {type(v).__name__}")
        iv = int(v)
        if not lo <= iv <= hi:
            raise CodecError(f"{where} ({attr.type}): {iv} is outside [{lo}, {hi}]")
        return st.pack(iv)

    return dec, enc


def _string_codec(set_name: str, attr: kspec.Attr) -> tuple[_Decoder, _Encoder]:
    where = f"{set_name}.{attr.name}"

    def dec(buf: bytes, a: int, b: int) -> Any:
        raw = bytes(buf[a:b])
        nul = raw.find(b"\0")
        if nul >= 0:
            raw = raw[:nul]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CodecError(f"{where} (string): not UTF-8: {e.reason}") from None

    def enc(v: Any) -> bytes:
        if not isinstance(v, str):
            raise CodecError(f"{where} (string): expected a str, found {type(v).__name__}")
        if "\0" in v:
            raise CodecError(f"{where} (string): embedded NUL")
        return v.encode("utf-8") + b"\0"

    return dec, enc


def _binary_codec(set_name: str, attr: kspec.Attr, structs: Mapping[str, kspec.StructDef]) -> tuple[_Decoder, _Encoder]:
    where = f"{set_name}.{attr.name}"
    if not attr.struct:
        def dec_raw(buf: bytes, a: int, b: int) -> Any:
            return bytes(buf[a:b])

        def enc_raw(v: Any) -> bytes:
            if not isinstance(v, (bytes, bytearray, memoryview)):
                raise CodecError(f"{where} (binary): expected bytes, found {type(v).__name__}")
            return bytes(v)

        return dec_raw, enc_raw

    dt = struct_dtype(attr.struct)
    size = dt.itemsize

    def dec(buf: bytes, a: int, b: int) -> Any:
        n = b - a
        if n % size:
            raise CodecError(f"{where} (struct {attr.struct}): {n} bytes is not a multiple of {size}")
        return np.frombuffer(buf, dtype=dt, count=n // size, offset=a)

    def enc(v: Any) -> bytes:
        if isinstance(v, (bytes, bytearray, memoryview)):
            raw = bytes(v)
            if len(raw) % size:
                raise CodecError(f"{where} (struct {attr.struct}): {len(raw)} bytes is not a multiple of {size}")
            return raw
        if isinstance(v, np.ndarray):
            if v.dtype != dt:
                try:
                    v = v.astype(dt)
                except (TypeError, ValueError) as e:
                    raise CodecError(f"{where}: array dtype {v.dtype} is not struct {attr.struct}: {e}") from None
            return np.ascontiguousarray(v).tobytes()
        raise CodecError(f"{where} (struct {attr.struct}): expected a numpy array or bytes, found {type(v).__name__}")

    return dec, enc


def _flag_codec(set_name: str, attr: kspec.Attr) -> tuple[_Decoder, _Encoder]:
    def dec(buf: bytes, a: int, b: int) -> Any:
        return True

    def enc(v: Any) -> bytes:
        return b""

    return dec, enc


@functools.lru_cache(maxsize=None)
def _tables() -> dict[str, dict[int, _AttrCodec]]:
    """Per attribute set: attribute number -> codec.  Built once from the spec."""
    sp = kspec.load()
    tables: dict[str, dict[int, _AttrCodec]] = {name: {} for name in sp.attr_sets}
    for set_name, aset in sp.attr_sets.items():
        for attr in aset.attrs:
            if attr.type in _INT_CODES:
                dec, enc = _int_codec(set_name, attr, sp.enums)
            elif attr.type == "string":
                dec, enc = _string_codec(set_name, attr)
            elif attr.type == "binary":
                dec, enc = _binary_codec(set_name, attr, sp.structs)
            elif attr.type == "flag":
                dec, enc = _flag_codec(set_name, attr)
            elif attr.type == "pad":
                continue  # skipped on decode, never encoded by name
            elif attr.type == "nest":
                dec, enc = _nest_codec(attr.nested, tables)
            else:
                raise CodecError(f"spec {set_name}.{attr.name}: attribute type {attr.type!r} is not supported by the codec")
            run = sp.structs[attr.struct].size if attr.multi and attr.struct else 0
            tables[set_name][attr.value] = _AttrCodec(attr, dec, enc, attr.type == "nest", run)
    return tables


def _nest_codec(inner: str, tables: dict[str, dict[int, _AttrCodec]]) -> tuple[_Decoder, _Encoder]:
    # The inner table may not be filled yet when this closure is made: look it up lazily.
    def dec(buf: bytes, a: int, b: int) -> Any:
        return _decode_set(inner, tables[inner], buf, a, b)

    def enc(v: Any) -> bytes:
        if not isinstance(v, Mapping):
            raise CodecError(f"nest {inner}: expected a dict, found {type(v).__name__}")
        return _encode_set(inner, v)

    return dec, enc


def _decode_set(set_name: str, table: Mapping[int, _AttrCodec], buf: bytes, start: int, end: int) -> dict[str, Any]:
    # The attribute walk of iter_attrs, inlined: this runs for every telemetry message.
    out: dict[str, Any] = {}
    runs: dict[str, tuple[_AttrCodec, list[int]]] = {}
    off = start
    unpack = _NLAHDR.unpack_from
    while off + 4 <= end:
        nla_len, nr = unpack(buf, off)
        if nla_len < 4 or off + nla_len > end:
            raise CodecError(f"{set_name}: attribute at offset {off}: length {nla_len} does not fit in {end - off} bytes")
        nr &= NLA_TYPE_MASK
        a, b = off + 4, off + nla_len
        off += (nla_len + 3) & ~3
        c = table.get(nr)
        if c is None:
            if nr not in _pad_numbers(set_name):
                out.setdefault("unknown", {})[nr] = bytes(buf[a:b])
            continue
        if c.run:
            if b - a != c.run:
                raise CodecError(f"{set_name}.{c.attr.name}: each attribute holds one struct "
                                 f"{c.attr.struct} ({c.run} bytes), found {b - a} bytes")
            runs.setdefault(c.attr.name, (c, []))[1].append(a - 4)
            continue
        value = c.decode(buf, a, b)
        if c.attr.multi:
            out.setdefault(c.attr.name, []).append(value)
        else:
            out[c.attr.name] = value
    if off < end:
        raise CodecError(f"{set_name}: {end - off} trailing bytes after the last attribute")
    for name, (c, offs) in runs.items():
        out[name] = _run_array(c, buf, offs)
    return out


def _run_array(c: _AttrCodec, buf: bytes, offs: list[int]) -> npt.NDArray[np.void]:
    """The structs of a batch's attributes at *offs* as one :func:`run_dtype` array: a view
    when they are back to back (as the kernel sends them), else a copy of them joined."""
    dt = run_dtype(c.attr.struct)
    stride = dt.itemsize
    first = offs[0]
    if offs[-1] - first == (len(offs) - 1) * stride and offs == list(range(first, offs[-1] + 1, stride)):
        return np.frombuffer(buf, dtype=dt, count=len(offs), offset=first)
    return np.frombuffer(b"".join(buf[o:o + stride] for o in offs), dtype=dt)


@functools.lru_cache(maxsize=None)
def _pad_numbers(set_name: str) -> frozenset[int]:
    return frozenset(a.value for a in kspec.load().attr_sets[set_name].attrs if a.type == "pad")


@functools.lru_cache(maxsize=None)
def _by_name(set_name: str) -> dict[str, _AttrCodec]:
    return {c.attr.name: c for c in _tables()[set_name].values()}


def _encode_set(set_name: str, values: Mapping[str, Any]) -> bytes:
    names = _by_name(set_name)
    parts: list[bytes] = []
    for name, v in values.items():
        if name == "unknown" and name not in names:
            if not isinstance(v, Mapping):
                raise CodecError(f"{set_name}: 'unknown' must map attribute numbers to bytes")
            for nr, raw in v.items():
                if not isinstance(nr, int) or not 0 <= nr <= NLA_TYPE_MASK or not isinstance(raw, (bytes, bytearray)):
                    raise CodecError(f"{set_name}: unknown attribute {nr!r} needs an int number and bytes")
                parts.append(pack_attr(nr, bytes(raw)))
            continue
        c = names.get(name)
        if c is None:
            raise CodecError(f"{set_name}: no attribute {name!r}; the set has {sorted(names)}")
        if v is None:
            continue
        if c.run:
            items = v if isinstance(v, (list, tuple)) else [v]
            parts.append(attr_run(c.attr.value, c.run, b"".join(c.encode(x) for x in items)))
        elif c.attr.multi:
            if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, Sequence):
                raise CodecError(f"{set_name}.{name} is multi-attr: expected a list, found {type(v).__name__}")
            for item in v:
                parts.append(pack_attr(c.attr.value, c.encode(item), nested=c.nested))
        else:
            parts.append(pack_attr(c.attr.value, c.encode(v), nested=c.nested))
    return b"".join(parts)


def _set_table(set_name: str) -> dict[int, _AttrCodec]:
    try:
        return _tables()[set_name]
    except KeyError:
        raise CodecError(f"no attribute set {set_name!r} in the spec") from None


# --- public API ------------------------------------------------------------


def encode_attrs(set_name: str, values: Mapping[str, Any]) -> bytes:
    """Encode *values* (attribute name -> value) as attributes of *set_name*.

    ints for integer attributes (enum attributes also take the entry name),
    ``str`` for strings, ``dict`` for nests, ``list`` for multi-attr, a numpy
    array of the spec struct's dtype (or :func:`run_dtype`, or packed bytes)
    for a batch of structs, which goes out as one attribute per struct.  ``None``
    values are left out.  ``{"unknown": {nr: bytes}}`` re-encodes raw
    attributes.  Raises :class:`CodecError` for values that do not fit.
    """
    _set_table(set_name)
    return _encode_set(set_name, values)


def decode_attrs(set_name: str, data: bytes) -> dict[str, Any]:
    """Decode the attributes in *data* as members of *set_name*.

    Returns attribute name -> value (see :func:`encode_attrs`); pad attributes
    are dropped, unknown numbers land in ``{"unknown": {nr: bytes}}``.
    Raises only :class:`CodecError`.
    """
    table = _set_table(set_name)
    buf = data if isinstance(data, bytes) else bytes(data)
    return _decode_set(set_name, table, buf, 0, len(buf))


def encode_msg(family_id: int, op: str, attrs: Mapping[str, Any], *, seq: int, flags: int) -> bytes:
    """A complete request for *op* (a spec operation name) to family *family_id*."""
    sp = kspec.load()
    try:
        o = sp.op(op)
    except kspec.SpecError as e:
        raise CodecError(str(e)) from None
    return pack_genlmsg(family_id, o.value, sp.version, encode_attrs(o.attr_set, attrs), seq=seq, flags=flags)


@functools.lru_cache(maxsize=None)
def _recommend_layout() -> tuple[struct.Struct, int, int, int, int, int]:
    """(header struct, cmd, version, attr type of ``id``, of ``recs``, rec size) from the spec."""
    sp = kspec.load()
    o = sp.op_by_name["recommend"]
    aset = sp.attr_sets[o.attr_set]
    id_a, recs_a = aset.by_name["id"], aset.by_name["recs"]
    if id_a.type != "u32" or recs_a.struct != "rec" or not recs_a.multi:
        raise CodecError("spec: recommend's id is no longer u32 or recs no longer multi-attr "
                         "struct rec; encode_recommend must follow the spec")
    # nlmsghdr, genlmsghdr, nla(id) + u32; the recs attributes follow
    size = sp.structs["rec"].size
    if size % 4:
        raise CodecError(f"spec: struct rec of {size} bytes would misalign the attributes")
    return (struct.Struct("=IHHII" "BBH" "HHI"), o.value, sp.version, id_a.value,
            recs_a.value, size)


def encode_recommend(family_id: int, proxy_id: int, recs: bytes, *, seq: int, flags: int) -> bytes:
    """The ``recommend`` request for packed ``rec`` records *recs*: :func:`encode_msg`'s
    bytes, built in one pack for the hot path (a test holds them equal)."""
    hdr, cmd, version, a_id, a_recs, size = _recommend_layout()
    n = len(recs)
    if n % size:
        raise CodecError(f"recommend: {n} bytes of records is not a whole number of "
                         f"{size}-byte rec structs")
    body = attr_run(a_recs, size, recs)
    return hdr.pack(hdr.size + len(body), family_id, flags, seq, 0, cmd, version, 0, 8, a_id,
                    proxy_id) + body


def _decode_err(buf: bytes, a: int, b: int, mflags: int, msg: Message) -> None:
    """Fill *msg* from an NLMSG_ERROR payload: errno, then extack TLVs."""
    if b - a < _ERRNO.size:
        raise CodecError(f"NLMSG_ERROR payload of {b - a} bytes has no error code")
    msg.error = _ERRNO.unpack_from(buf, a)[0]
    if b - a < _ERRNO.size + _NLMSGHDR.size:
        return  # a bare errno (NLMSG_DONE carries only this)
    echoed_len = _NLMSGHDR.unpack_from(buf, a + _ERRNO.size)[0]
    tlv = a + _ERRNO.size + (_NLMSGHDR.size if mflags & NLM_F_CAPPED else nla_align(echoed_len))
    if not mflags & NLM_F_ACK_TLVS:
        return
    if tlv > b:
        raise CodecError(f"NLMSG_ERROR: echoed request of {echoed_len} bytes overruns the message")
    _decode_extack(buf, tlv, b, msg)


def _decode_extack(buf: bytes, a: int, b: int, msg: Message) -> None:
    u32 = struct.Struct("=I")
    for nr, _f, pa, pb in iter_attrs(buf, a, b):
        if nr == NLMSGERR_ATTR_MSG:
            msg.extack = bytes(buf[pa:pb]).split(b"\0", 1)[0].decode("utf-8", "replace")
        elif nr == NLMSGERR_ATTR_OFFS and pb - pa == 4:
            msg.extack_offset = u32.unpack_from(buf, pa)[0]
        elif nr == NLMSGERR_ATTR_MISS_TYPE and pb - pa == 4:
            msg.extack_missing = u32.unpack_from(buf, pa)[0]


def decode_msg(data: bytes, *, family_id: int | None = None) -> list[Message]:
    """Decode every netlink message of one datagram.

    genl messages are decoded with the kmlbus spec (op from the command, its
    attribute set); when *family_id* is given, genl messages of other
    families keep their attributes raw in ``Message.payload`` instead.
    ``NLMSG_ERROR`` fills ``error``/``extack``; ``NLMSG_DONE`` fills ``error``.
    Raises only :class:`CodecError`.
    """
    buf = data if isinstance(data, bytes) else bytes(data)
    return [decode_one(buf, *m, family_id=family_id) for m in iter_nlmsgs(buf)]


def decode_one(buf: bytes, mtype: int, mflags: int, seq: int, portid: int, a: int, b: int,
               *, family_id: int | None = None) -> Message:
    """Decode one message located by :func:`iter_nlmsgs` (see :func:`decode_msg`)."""
    msg = Message(mtype, mflags, seq, portid, 0, "", {})
    try:
        if mtype == NLMSG_ERROR:
            _decode_err(buf, a, b, mflags, msg)
        elif mtype == NLMSG_DONE:
            if b - a >= _ERRNO.size:
                msg.error = _ERRNO.unpack_from(buf, a)[0]
                if mflags & NLM_F_ACK_TLVS:
                    _decode_extack(buf, a + _ERRNO.size, b, msg)
        elif mtype >= NLMSG_MIN_TYPE:
            if b - a < _GENLHDR.size:
                raise CodecError(f"genl message of type {mtype}: {b - a} bytes, no genl header")
            msg.cmd = buf[a]
            if family_id is not None and mtype != family_id:
                msg.payload = bytes(buf[a + _GENLHDR.size:b])
            else:
                msg.op, set_name, table = _op_index().get(msg.cmd) or _unknown_op()
                msg.attrs = _decode_set(set_name, table, buf, a + _GENLHDR.size, b)
    except CodecError:
        raise
    except (struct.error, ValueError, TypeError, IndexError) as e:  # defensive: never leak these
        raise CodecError(f"message type {mtype}: {e}") from e
    return msg


@functools.lru_cache(maxsize=None)
def _event_tables() -> dict[int, tuple[str, dict[int, tuple[str, Any, int, int]]]]:
    """For events whose attributes are plain integers or batches of structs (telemetry,
    feedback): genl cmd -> (op name, attr number -> (name, struct.Struct or run dtype,
    size or stride, header)); *header* is the 4 bytes every attribute of a batch starts
    with (as a u32), 0 for an integer.  Pad attribute numbers map to ``("", None, 0, 0)``."""
    sp = kspec.load()
    out: dict[int, tuple[str, dict[int, tuple[str, Any, int, int]]]] = {}
    for o in sp.ops:
        if o.event is None:
            continue
        aset = sp.attr_sets[o.attr_set]
        table: dict[int, tuple[str, Any, int, int]] = {
            n: ("", None, 0, 0) for n in _pad_numbers(o.attr_set)}
        plain = True
        for name in o.event:
            a = aset.by_name[name]
            if a.type in _INT_CODES and not a.enum and not a.multi:
                st = struct.Struct("=" + _INT_CODES[a.type])
                table[a.value] = (a.name, st, st.size, 0)
            elif a.type == "binary" and a.struct and a.multi:
                dt = run_dtype(a.struct)
                table[a.value] = (a.name, dt, dt.itemsize, dt.itemsize | a.value << 16)
            else:
                plain = False
        if plain:
            out[o.value] = (o.name, table)
    return out


def decode_event(buf: bytes, mtype: int, mflags: int, seq: int, portid: int, a: int, b: int,
                 *, views: bool = False) -> Message | None:
    """The hot path's decoder for a telemetry or feedback message located at ``buf[a:b]``
    (the genl header onwards): the same :class:`Message` as :func:`decode_one`, in
    fewer steps, or None for anything else or anything unusual (then use
    :func:`decode_one`, which also explains errors).  A test holds the two equal.

    With *views*, a batch is left as the ``memoryview`` slice of *buf* that its run
    of attributes spans (stride ``run_dtype(struct).itemsize``, each struct behind
    its 4-byte header) instead of a numpy array: for a caller that answers the
    message before it makes any array (:func:`peek_event`)."""
    if b - a < _GENLHDR.size:
        return None
    ev = _event_tables().get(buf[a])
    if ev is None:
        return None
    op, table = ev
    attrs: dict[str, Any] = {}
    unpack = _NLAHDR.unpack_from
    off = a + _GENLHDR.size
    while off + 4 <= b:
        nla_len, nr = unpack(buf, off)
        end = off + nla_len
        if nla_len < 4 or end > b:
            return None
        entry = table.get(nr & NLA_TYPE_MASK)
        if entry is None:
            return None
        name, kind, size, header = entry
        if header:  # a batch: its attributes back to back, one struct each
            k = run_length(buf, off, b, header, size)
            if not k or name in attrs:
                return None
            end = off + k * size
            attrs[name] = (memoryview(buf)[off:end] if views else
                           np.frombuffer(buf, dtype=kind, count=k, offset=off))
            off = end
            continue
        if size:
            if nla_len - 4 != size:
                return None
            attrs[name] = kind.unpack_from(buf, off + 4)[0]
        off += (nla_len + 3) & ~3
    if off < b:
        return None
    return Message(mtype, mflags, seq, portid, buf[a], op, attrs)


def peek_event(data: bytes, family_id: int, *, views: bool = True) -> Message | None:
    """A datagram that is exactly one telemetry or feedback message of *family_id*,
    decoded by :func:`decode_event` (batches as ``memoryview`` slices of their
    attributes with *views*, as numpy arrays without); None for anything else, which the generic
    decoder then handles."""
    n = len(data)
    if n < _NLMSGHDR.size:
        return None
    mlen, mtype, mflags, seq, portid = _NLMSGHDR.unpack_from(data, 0)
    if mlen != n or mtype != family_id:
        return None
    return decode_event(data, mtype, mflags, seq, portid, _NLMSGHDR.size, n, views=views)


@functools.lru_cache(maxsize=None)
def _op_index() -> dict[int, tuple[str, str, dict[int, _AttrCodec]]]:
    """genl command -> (op name, attribute set, its decode table)."""
    return {o.value: (o.name, o.attr_set, _tables()[o.attr_set]) for o in kspec.load().ops}


@functools.lru_cache(maxsize=None)
def _unknown_op() -> tuple[str, str, dict[int, _AttrCodec]]:
    """An unknown command still decodes, with the first operation's attribute set."""
    set_name = kspec.load().ops[0].attr_set
    return "", set_name, _tables()[set_name]


@functools.lru_cache(maxsize=None)
def _struct_attr_names() -> tuple[str, ...]:
    sp = kspec.load()
    return tuple(dict.fromkeys(a.name for s in sp.attr_sets.values() for a in s.attrs if a.struct))


def records(msg_attrs: Mapping[str, Any]) -> npt.NDArray[Any]:
    """The batch of structs of a telemetry/feedback message's attributes.

    Returns the zero-copy numpy view (of :func:`run_dtype`) already made by the
    decoder (``records`` for telemetry, ``feedback`` for feedback, whichever
    batch the message carries).  Raises :class:`CodecError` if none.
    """
    for name in _struct_attr_names():
        v = msg_attrs.get(name)
        if isinstance(v, np.ndarray):
            return v
    raise CodecError(f"no struct-array attribute ({', '.join(_struct_attr_names())}) in {sorted(msg_attrs)}")


def enum_name(enum: str, value: int) -> str:
    """Entry name of *value* in spec enum *enum* (e.g. ``enum_name("mode", 0)`` -> ``"emergency"``).

    For flags enums, returns the set bit names joined with ``|``.  Unknown
    values give ``"<enum>?<value>"`` rather than an exception, because this
    is for display of what the kernel sent.
    """
    e = kspec.load().enums.get(enum)
    if e is None:
        raise CodecError(f"no enum {enum!r} in the spec")
    if e.is_flags:
        names = [n for i, n in enumerate(e.entries) if value & (1 << i)]
        rest = value & ~sum(1 << i for i in range(len(e.entries)))
        if rest:
            names.append(hex(rest))
        return "|".join(names)
    if 0 <= value < len(e.entries):
        return e.entries[value]
    return f"{enum}?{value}"


def clear_caches() -> None:
    """Forget the tables built from the spec (for tests and tools that swap :func:`kmlbus.contract.spec.load`)."""
    for f in (_tables, _pad_numbers, _by_name, _op_index, _unknown_op, _struct_attr_names):
        f.cache_clear()
