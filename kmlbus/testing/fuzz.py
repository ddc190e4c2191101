"""Malformed requests for every operation of the family spec, and how each must be answered.

The strategies build attribute payloads from the spec: request attributes of
every operation with right and wrong lengths, unknown and zero attribute
numbers, the nested flag where it does not belong, packed struct arrays
(``recs``) with bad keys, ttls and lengths, and trailing garbage.
:func:`answer` sends one and checks the reply the way the project requires:
an answer always comes, and every rejection the family makes carries an
extack message (the generic netlink core's own EPERM for a missing
CAP_NET_ADMIN and EOPNOTSUPP for an unsupported flag combination carry none).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from kmlbus.contract import spec as kspec
from kmlbus.wire.codec import NLMSG_ERROR, pack_attr
from kmlbus.wire.netlink import Connection

__all__ = ["CORE_ERRNOS", "FuzzTally", "STATE_KEYS", "answer", "batch_keeps_state", "payloads", "proxy_state",
           "request_ops", "variants"]

#: errnos the genl core returns before the family's handler runs, without a message
CORE_ERRNOS = frozenset({errno.EPERM, errno.EOPNOTSUPP})
#: a proxy's state a rejected request must leave alone (``get`` reply keys)
STATE_KEYS = ("mode", "share", "explore", "stale-ms", "bus-portid", "nkeys", "name", "mode-seq")
_SAMPLES = [b"", b"\0", b"\1\0\0\0", b"\0" * 8, b"\xff" * 4, b"\0" * 3]


def request_ops() -> list[kspec.Op]:
    """Every operation of the spec that takes a request."""
    return [o for o in kspec.load().ops if o.do_request is not None]


def _u32(v: int) -> bytes:
    return struct.pack("=I", v & 0xFFFFFFFF)


def _attrs() -> kspec.AttrSet:
    return kspec.load().attr_sets["proxy"]


def _raw_attr() -> st.SearchStrategy[bytes]:
    """Any attribute number (known, unknown, 0, huge) with any payload, maybe flagged nested."""
    return st.builds(lambda t, payload, nested: pack_attr(t, payload, nested=nested),
                     st.one_of(st.sampled_from([a.value for a in _attrs().attrs]), st.integers(0, 0x3FFF)),
                     st.one_of(st.binary(max_size=48), st.sampled_from(_SAMPLES)),
                     st.booleans())


def _id_attr(pid: int) -> st.SearchStrategy[bytes]:
    a = _attrs().by_name["id"].value
    return st.builds(lambda v: pack_attr(a, _u32(v)),
                     st.sampled_from([pid, pid, 0, pid + 1000, 0xFFFFFFFF]))


def _recs_attr(nkeys: int) -> st.SearchStrategy[bytes]:
    sp = kspec.load()
    fmt = "=" + sp.struct_format("rec").lstrip("=<>@!")
    max_ttl, max_recs = int(sp.consts["max-ttl-ms"]), int(sp.consts["max-recs"])
    entry = st.builds(lambda k, v, t: struct.pack(fmt, k, v, t),
                      st.one_of(st.integers(0, nkeys - 1), st.integers(0, 0xFFFFFFFF)),
                      st.integers(-(1 << 31), (1 << 31) - 1),
                      st.one_of(st.integers(1, max_ttl), st.sampled_from([0, max_ttl + 1, 0xFFFFFFFF])))
    body = st.one_of(st.lists(entry, max_size=8).map(b"".join), st.binary(max_size=40),
                     st.integers(max_recs - 4, max_recs + 6).map(lambda n: struct.pack(fmt, 0, 1, 1) * n))
    a = _attrs().by_name["recs"].value
    return body.map(lambda b: pack_attr(a, b))


def _scalar_attr(name: str) -> st.SearchStrategy[bytes]:
    """Every request attribute but ``id`` and ``recs``: any u32 value, or a string of any
    length (with and without its NUL), or the wrong size."""
    sp = kspec.load()
    attr = _attrs().by_name[name]
    if attr.type == "string":
        return st.builds(lambda n, nul: pack_attr(attr.value, (b"sample" * 8)[:n] + (b"\0" if nul else b"")),
                         st.integers(0, 40), st.booleans())
    enum_len = len(sp.enums[attr.enum].entries) if attr.enum else 0
    values = st.one_of(st.integers(0, max(enum_len + 1, 10)), st.integers(0, 2000), st.just(0xFFFFFFFF))
    return st.one_of(values.map(lambda v: pack_attr(attr.value, _u32(v))),
                     st.sampled_from(_SAMPLES).map(lambda b: pack_attr(attr.value, b)))


def payloads(pid: int, nkeys: int, *, max_attrs: int = 5) -> st.SearchStrategy[bytes]:
    """An attribute payload for any request: a few attributes from everything above, and
    maybe a trailing fragment shorter than an attribute header."""
    names = sorted({n for o in request_ops() for n in (o.do_request or ()) if n not in ("id", "recs")})
    part = st.one_of(_raw_attr(), _id_attr(pid), _recs_attr(nkeys), *(_scalar_attr(n) for n in names))
    trailer = st.one_of(st.just(b""), st.binary(min_size=1, max_size=3))
    return st.builds(lambda ps, t: b"".join(ps) + t, st.lists(part, max_size=max_attrs), trailer)


def variants(payload: bytes) -> list[bytes]:
    """*payload*, cut in the middle (an attribute truncated, or a header torn) and given twice
    (every attribute repeated): three requests from one drawn payload, for the price of one draw."""
    return [payload, payload[:len(payload) // 2], payload + payload]


def proxy_state(conn: Connection, pid: int) -> dict[str, Any]:
    """What a rejected request must not change: :data:`STATE_KEYS` and ``recs-received``
    (and ``reason``, the why of the mode)."""
    p = conn.proxy(pid)
    out = {k: p.get(k) for k in (*STATE_KEYS, "reason")}
    out["recs-received"] = p["counters"]["recs-received"]
    return out


@dataclass
class FuzzTally:
    """Counts of one fuzz run: requests sent, accepted, refused per errno, and every fault
    found (a missing answer, a refusal without extack, a rejected batch that changed state)."""

    sent: int = 0
    accepted: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)


def answer(conn: Connection, cmd: int, payload: bytes, tally: FuzzTally, *, timeout: float = 10.0) -> int:
    """Send *payload* as command *cmd*; its errno (0 when accepted), counted in *tally*.

    A missing answer, or a refusal other than :data:`CORE_ERRNOS` without an extack
    message, is recorded in ``tally.faults``.
    """
    tally.sent += 1
    try:
        replies = conn.request_raw(cmd, payload, timeout=timeout)
    except Exception as e:  # noqa: BLE001 -- a timeout or a socket error is a finding, not a crash
        tally.faults.append(f"cmd {cmd}: no answer ({e}); payload {payload.hex()}")
        return -1
    errs = [m for m in replies if m.type == NLMSG_ERROR and m.error]
    if not errs:
        tally.accepted += 1
        return 0
    err = -errs[0].error
    tally.refused[err] = tally.refused.get(err, 0) + 1
    if not errs[0].extack and err not in CORE_ERRNOS:
        tally.faults.append(f"cmd {cmd}: errno {err} without extack; payload {payload.hex()}")
    return err


def batch_keeps_state(conn: Connection, pid: int, cmd: int, batch: list[bytes], tally: FuzzTally,
                      send: Callable[[Connection, int, bytes, FuzzTally], int] = answer) -> None:
    """Send *batch* one request at a time; each refused one must leave the proxy's state as
    it found it (``get`` after every request: the one after is the next one's before).

    The kernel's own fallback on staleness (an earlier accepted request may have set a
    short ``stale-ms``) moves the mode by itself: a change whose reason is ``stale`` is not
    the refused request's doing."""
    stale = kspec.load().enums["reason"].value("stale")
    before = proxy_state(conn, pid)
    for p in batch:
        err = send(conn, cmd, p, tally)
        after = proxy_state(conn, pid)
        if err and after != before:
            own = {k: v for k, v in after.items() if k not in ("mode", "mode-seq", "reason")}
            if after["reason"] != stale or own != {k: v for k, v in before.items()
                                                    if k not in ("mode", "mode-seq", "reason")}:
                tally.faults.append(f"cmd {cmd}: refused (errno {err}) yet the state changed "
                                    f"{before} -> {after}: payload {p.hex()}")
        before = after
