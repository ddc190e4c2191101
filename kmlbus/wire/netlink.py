"""The kmlbus netlink transport: a raw generic netlink socket, no pyroute2.

:class:`GenlSocket` speaks generic netlink to any family: it frames
requests, matches replies and ACKs by sequence number, handles dumps
(``NLM_F_DUMP`` ... ``NLMSG_DONE``), turns ``NLMSG_ERROR`` with its
extended-ack TLVs into :class:`NetlinkError`, resolves families through the
kernel's ``nlctrl`` family (``CTRL_CMD_GETFAMILY``) and joins multicast
groups.  Multicast messages that arrive while a request waits are queued,
never dropped, for :meth:`GenlSocket.recv`.

:class:`Connection` is that socket bound to the ``kmlbus`` family, with the
messages encoded and decoded by :mod:`kmlbus.wire.codec` from the family spec and
one method per control operation.

The hot path is :meth:`Connection.recv`: one ``recv_into`` per datagram, one
copy into ``bytes``, and telemetry records returned as numpy views of it.
A receive-buffer overrun (``ENOBUFS``) means the kernel dropped multicast
messages for us; it is counted in ``stats["overruns"]``, not raised, because
the bus must keep serving.  A socket is not thread-safe: use one per thread
or one asyncio reader (:meth:`GenlSocket.fileno`).
"""

from __future__ import annotations

import collections
import errno as errno_mod
import functools
import itertools
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from kmlbus.contract import spec as kspec
from kmlbus.wire import codec
from kmlbus.wire.codec import CodecError, Message

__all__ = [
    "Connection",
    "ControlOps",
    "FamilyInfo",
    "GenlSocket",
    "KmlbusError",
    "ModuleNotLoaded",
    "NetlinkError",
    "GENL_ID_CTRL",
    "refusal_text",
]

log = logging.getLogger(__name__)

# include/uapi/linux/netlink.h, genetlink.h (stable kernel ABI, not the kmlbus spec)
NETLINK_GENERIC = 16  # not exported by Python's socket module
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_DROP_MEMBERSHIP = 2
NETLINK_BROADCAST_ERROR = 4
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_VERSION = 2
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_VERSION = 3
CTRL_ATTR_HDRSIZE = 4
CTRL_ATTR_MAXATTR = 5
CTRL_ATTR_OPS = 6
CTRL_ATTR_MCAST_GROUPS = 7
CTRL_ATTR_OP_ID = 1
CTRL_ATTR_OP_FLAGS = 2
CTRL_ATTR_MCAST_GRP_NAME = 1
CTRL_ATTR_MCAST_GRP_ID = 2

_RECV_BUF = 64 << 10  # kernel dumps fill at most 32 KiB per skb (netlink_recvmsg caps max_recvmsg_len)
DRAIN_MAX = 256  # datagrams read per recv() call before returning to the caller
_UNACKED_MAX = 1024  # no-ACK requests remembered for explaining a late error
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")


class KmlbusError(Exception):
    """Base of every error the transport raises."""


class ModuleNotLoaded(KmlbusError):
    """The kernel has no ``kmlbus`` generic netlink family."""

    def __init__(self, family: str = "kmlbus") -> None:
        self.family = family
        super().__init__(
            f"the {family} kernel module is not loaded: load it with `insmod kernel/{family}.ko` "
            f"(or `modprobe {family}`)"
        )


def refusal_text(extack: str, missing: str | None = None, bad: str | None = None) -> str:
    """The reason shown for a refused request: the kernel's extack message, then the
    attribute it reports missing, then the attribute its offset points at (each optional)."""
    text = extack
    if missing:
        text = f"{text}: missing attribute {missing}" if text else f"missing attribute {missing}"
    if bad:
        text = f"{text} [attribute {bad}]" if text else f"bad attribute {bad}"
    return text


class NetlinkError(KmlbusError):
    """The kernel refused a request: ``errno`` (positive), ``extack`` message, ``op`` name."""

    def __init__(self, errno: int, extack: str = "", op: str = "", family: str = "kmlbus") -> None:
        self.errno = errno
        self.extack = extack
        self.op = op
        self.family = family
        text = f"{family} {op}: {os.strerror(errno)}"
        super().__init__(f"{text} ({extack})" if extack else text)


@dataclass
class FamilyInfo:
    """What ``CTRL_CMD_GETFAMILY`` says about a family."""

    name: str
    id: int
    version: int = 0
    hdrsize: int = 0
    maxattr: int = 0
    ops: dict[int, int] = field(default_factory=dict)  # cmd -> GENL_* capability flags
    groups: dict[str, int] = field(default_factory=dict)  # multicast group name -> id


def _parse_family(payload: bytes) -> FamilyInfo:
    """Decode a ``CTRL_CMD_NEWFAMILY`` reply (the attributes after the genl header)."""
    info = FamilyInfo("", 0)
    for nr, _f, a, b in codec.iter_attrs(payload):
        if nr == CTRL_ATTR_FAMILY_ID and b - a >= 2:
            info.id = _U16.unpack_from(payload, a)[0]
        elif nr == CTRL_ATTR_FAMILY_NAME:
            info.name = payload[a:b].split(b"\0", 1)[0].decode("utf-8", "replace")
        elif nr in (CTRL_ATTR_VERSION, CTRL_ATTR_HDRSIZE, CTRL_ATTR_MAXATTR) and b - a >= 4:
            v = _U32.unpack_from(payload, a)[0]
            if nr == CTRL_ATTR_VERSION:
                info.version = v
            elif nr == CTRL_ATTR_HDRSIZE:
                info.hdrsize = v
            else:
                info.maxattr = v
        elif nr == CTRL_ATTR_OPS:
            for _i, _f2, oa, ob in codec.iter_attrs(payload, a, b):
                op_id = op_flags = None
                for k, _f3, ka, kb in codec.iter_attrs(payload, oa, ob):
                    if kb - ka >= 4:
                        if k == CTRL_ATTR_OP_ID:
                            op_id = _U32.unpack_from(payload, ka)[0]
                        elif k == CTRL_ATTR_OP_FLAGS:
                            op_flags = _U32.unpack_from(payload, ka)[0]
                if op_id is not None:
                    info.ops[op_id] = op_flags or 0
        elif nr == CTRL_ATTR_MCAST_GROUPS:
            for _i, _f2, ga, gb in codec.iter_attrs(payload, a, b):
                gname, gid = "", None
                for k, _f3, ka, kb in codec.iter_attrs(payload, ga, gb):
                    if k == CTRL_ATTR_MCAST_GRP_NAME:
                        gname = payload[ka:kb].split(b"\0", 1)[0].decode("utf-8", "replace")
                    elif k == CTRL_ATTR_MCAST_GRP_ID and kb - ka >= 4:
                        gid = _U32.unpack_from(payload, ka)[0]
                if gname and gid is not None:
                    info.groups[gname] = gid
    if not info.id:
        raise CodecError("CTRL_CMD_GETFAMILY reply has no CTRL_ATTR_FAMILY_ID")
    return info


class GenlSocket:
    """A raw ``AF_NETLINK``/``NETLINK_GENERIC`` socket with request/ACK matching.

    *family_id* (0 until :meth:`use_family`) selects which genl messages are
    decoded with the kmlbus codec; messages of other families keep their raw
    attributes in ``Message.payload``.  *timeout* bounds every request.
    """

    def __init__(self, rcvbuf: int = 8 << 20, timeout: float = 5.0, *,
                 broadcast_error: bool = False) -> None:
        self.timeout = timeout
        self.family_id = 0
        self.family_name = ""
        self.stats: dict[str, int] = {"malformed": 0, "overruns": 0, "dropped": 0}
        self._queue: collections.deque[Message] = collections.deque()
        self._seq = itertools.count(int(time.monotonic_ns()) & 0x3FFFFFFF | 1)
        self._buf = bytearray(_RECV_BUF)
        self._view = memoryview(self._buf)
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        try:
            self._set_rcvbuf(rcvbuf)
            if broadcast_error:
                # a multicast this socket has no room for fails the kernel's send (ENOBUFS),
                # so the sender counts the loss even when another listener took the message
                self._sock.setsockopt(SOL_NETLINK, NETLINK_BROADCAST_ERROR, 1)
            # Extended ACK gives the kernel's error text; CAP_ACK keeps error replies small.
            for opt in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):
                try:
                    self._sock.setsockopt(SOL_NETLINK, opt, 1)
                except OSError as e:  # older kernels: still works, less detail
                    log.debug("netlink sockopt %d unavailable: %s", opt, e)
            self._sock.bind((0, 0))
            self.portid: int = self._sock.getsockname()[0]
            self._sock.setblocking(False)
            self._poll = select.poll()
            self._poll.register(self._sock.fileno(), select.POLLIN)
        except BaseException:
            self._sock.close()
            raise

    def _set_rcvbuf(self, size: int) -> None:
        # FORCE ignores net.core.rmem_max but needs CAP_NET_ADMIN; fall back silently.
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except OSError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    @property
    def rcvbuf(self) -> int:
        """Bytes the kernel lets queue on this socket (``SO_RCVBUF``: twice what was asked,
        see socket(7); without CAP_NET_ADMIN capped by ``net.core.rmem_max``)."""
        return int(self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    # --- lifecycle ---------------------------------------------------------
    def fileno(self) -> int:
        """The socket's file descriptor (for selectors / ``loop.add_reader``)."""
        return self._sock.fileno()

    def close(self) -> None:
        """Close the socket (the kernel sees the port released)."""
        self._sock.close()

    def __enter__(self) -> GenlSocket:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # --- receiving ----------------------------------------------------------
    def _wait(self, timeout: float | None) -> bool:
        """Block until the socket is readable or *timeout* seconds pass (None: forever)."""
        ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
        return bool(self._poll.poll(ms))

    def _recv_datagram(self) -> bytes | None:
        """One datagram, or None when nothing is waiting.  ENOBUFS is counted and skipped."""
        while True:
            try:
                n = self._sock.recv_into(self._buf, 0, socket.MSG_TRUNC)
            except BlockingIOError:
                return None
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno_mod.ENOBUFS:
                    self.stats["overruns"] += 1
                    log.debug("netlink receive buffer overran: multicast messages were lost")
                    continue
                raise
            if n > len(self._buf):
                self.stats["malformed"] += 1
                log.warning("netlink datagram of %d bytes truncated to %d: dropped", n, len(self._buf))
                continue
            return bytes(self._view[:n])

    def _decode(self, data: bytes) -> list[Message]:
        """Decode a datagram message by message; a bad one is counted, the rest kept."""
        out: list[Message] = []
        fam = self.family_id or -1
        try:
            for m in codec.iter_nlmsgs(data):
                try:
                    out.append(codec.decode_one(data, *m, family_id=fam))
                except CodecError as e:
                    self.stats["malformed"] += 1
                    log.debug("undecodable netlink message dropped: %s", e)
        except CodecError as e:
            self.stats["malformed"] += 1
            log.debug("undecodable netlink datagram tail dropped: %s", e)
        return out

    def _is_event(self, m: Message) -> bool:
        """Unsolicited traffic to queue for :meth:`recv` (multicast of our family)."""
        return m.type == self.family_id and self.family_id != 0

    def _park(self, m: Message) -> None:
        if self._is_event(m):
            self._queue.append(m)
        else:
            self.stats["dropped"] += 1
            log.debug("unexpected netlink message dropped: type %d seq %d", m.type, m.seq)

    def _drain(self, limit: int) -> None:
        """Read and park up to *limit* waiting datagrams, without blocking."""
        for _ in range(limit):
            data = self._recv_datagram()
            if data is None:
                break
            for m in self._decode(data):
                self._park(m)

    def _take_queue(self) -> list[Message]:
        out = list(self._queue)
        self._queue.clear()
        return out

    def wait_datagram(self, timeout: float | None = None) -> bytes | None:
        """The next datagram, undecoded, when nothing is queued or waiting.

        Waits up to *timeout* seconds (None: until one arrives) and returns the
        first datagram that arrives, as bytes; the caller may read it before it
        is decoded (the kernel sends a proxy's telemetry before its feedback, so
        that datagram is the one whose answer is most urgent), then hands it to
        :meth:`accept`.  Returns None on timeout, and at once when messages are
        already queued or waiting (take those with :meth:`recv`).
        """
        if self._queue:
            return None
        self._drain(DRAIN_MAX)
        if self._queue:
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._wait(left):
                return None
            data = self._recv_datagram()
            if data is not None:
                return data
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def accept(self, data: bytes) -> list[Message]:
        """Decode a datagram from :meth:`wait_datagram`: its messages as :meth:`recv` gives them."""
        for m in self._decode(data):
            self._park(m)
        return self._take_queue()

    def recv(self, timeout: float | None = None) -> list[Message]:
        """Multicast messages of the family: queued ones first, else wait up to *timeout*.

        ``timeout=None`` blocks until at least one message arrives; ``0``
        never blocks.  Returns ``[]`` on timeout.

        Latency first, batches when behind: whatever is already waiting (up
        to a bound) is taken in one go, so a bus that fell behind catches up
        with few large batches.  When the socket was idle and this call had
        to wait, the first datagram is returned alone, at once (see
        :meth:`wait_datagram`); the next call takes the rest without waiting.
        """
        if not self._queue:
            self._drain(DRAIN_MAX)
        if self._queue or timeout == 0:
            return self._take_queue()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            data = self.wait_datagram(left)
            if data is None:
                return self._take_queue()
            out = self.accept(data)
            if out or (deadline is not None and time.monotonic() >= deadline):
                return out

    # --- requests -----------------------------------------------------------
    def next_seq(self) -> int:
        """A fresh non-zero sequence number (kernel events use seq 0)."""
        return next(self._seq) & 0xFFFFFFFF or next(self._seq)

    def send_frame(self, data: bytes | bytearray) -> None:
        """Send one already framed request as it is, and return at once (nothing is awaited).

        Netlink runs a request in the sender's context: when this returns, the
        kernel has run it.  Its error, if any, comes back later and is dropped
        (counted in ``stats["dropped"]``).  For the benchmarks' raw floor.
        """
        self._sock.sendto(data, (0, 0))

    def transact(self, data: bytes, seq: int, *, expect_ack: bool = True, timeout: float | None = None) -> list[Message]:
        """Send one framed request and collect every message answering *seq*.

        Returns the replies followed by the terminating ``NLMSG_ERROR`` (ACK
        or error) or ``NLMSG_DONE``; without *expect_ack*, the first
        non-multipart reply also ends it.  Other traffic goes to the queue.
        Raises :class:`KmlbusError` when nothing ends it within the timeout.
        """
        # Make room first: under a telemetry flood a full receive buffer would make the
        # kernel drop our ACK (kernel-to-user unicast does not wait), and we would time out.
        self._drain(4 * DRAIN_MAX)
        self._sock.sendto(data, (0, 0))
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        replies: list[Message] = []
        done = False
        while not done:
            left = deadline - time.monotonic()
            if left <= 0 or not self._wait(left):
                why = " (the receive buffer overran, the reply may be lost)" if self.stats["overruns"] else ""
                raise KmlbusError(f"no answer to netlink request seq {seq} within {limit:g} s{why}")
            while (dg := self._recv_datagram()) is not None:
                for m in self._decode(dg):
                    if m.seq == seq and not done and not self._is_event_op(m):
                        replies.append(m)
                        if m.type in (codec.NLMSG_ERROR, codec.NLMSG_DONE):
                            done = True
                        elif not expect_ack and not m.flags & codec.NLM_F_MULTI:
                            done = True
                    else:
                        self._park(m)
                if done:
                    break
        return replies

    def _is_event_op(self, m: Message) -> bool:
        """Events the kernel sends with the triggering request's seq are still events."""
        return False

    def join_group_id(self, group_id: int) -> None:
        """``NETLINK_ADD_MEMBERSHIP`` for a multicast group id."""
        self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group_id)

    def leave_group_id(self, group_id: int) -> None:
        """``NETLINK_DROP_MEMBERSHIP`` for a multicast group id."""
        self._sock.setsockopt(SOL_NETLINK, NETLINK_DROP_MEMBERSHIP, group_id)

    def get_family(self, name: str) -> FamilyInfo:
        """Resolve a generic netlink family by name through ``nlctrl``.

        Raises :class:`NetlinkError` (errno ENOENT when the family does not exist).
        """
        seq = self.next_seq()
        attrs = codec.pack_attr(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0")
        req = codec.pack_genlmsg(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_VERSION, attrs,
                                 seq=seq, flags=codec.NLM_F_REQUEST | codec.NLM_F_ACK)
        info: FamilyInfo | None = None
        for m in self.transact(req, seq):
            if m.error:
                raise NetlinkError(-m.error, m.extack, "getfamily", "nlctrl")
            if m.type == GENL_ID_CTRL:
                try:
                    info = _parse_family(m.payload)
                except CodecError as e:
                    raise KmlbusError(f"nlctrl getfamily {name}: malformed reply: {e}") from e
        if info is None:
            raise KmlbusError(f"nlctrl getfamily {name}: ACK without a family description")
        return info


def _bad_attr_name(request: bytes, offset: int, set_name: str) -> str:
    """Name the top-level attribute of *request* that extack offset *offset* points into.

    A multi-attr attribute (e.g. ``recs``, one struct each) is named with its
    place among the attributes of its type: ``recs[3]``.
    """
    sp = kspec.load()
    base = 16 + 4  # nlmsghdr + genlmsghdr
    seen: dict[int, int] = {}
    try:
        for nr, _f, a, b in codec.iter_attrs(request, base, len(request)):
            index = seen[nr] = seen.get(nr, -1) + 1
            if a - 4 <= offset < b:
                attr = sp.attr_sets[set_name].by_value.get(nr)
                if attr is None:
                    return f"#{nr}"
                if attr.multi:
                    return f"{attr.name}[{index}]"
                return attr.name
    except CodecError:
        pass
    return ""


class ControlOps:
    """One method per control operation, built on :meth:`request` and :meth:`send_nowait`.

    :class:`Connection` speaks them to the kernel; :mod:`tests.support.standin`'s
    link to its in-process model of the module, with the same semantics.
    """

    def request(self, op: str, attrs: Mapping[str, Any] | None = None, *,
                dump: bool = False) -> list[dict[str, Any]]:
        raise NotImplementedError

    def send_nowait(self, op: str, attrs: Mapping[str, Any]) -> int:
        raise NotImplementedError

    def _recommend_nowait(self, proxy_id: int, recs: bytes) -> None:
        """One ``recommend`` of packed ``rec`` structs, no ACK asked."""
        dt = codec.struct_dtype("rec")
        self.send_nowait("recommend", {"id": proxy_id, "recs": np.frombuffer(recs, dtype=dt)})

    def proxies(self) -> list[dict[str, Any]]:
        """Every registered proxy (dump of ``get``)."""
        return self.request("get", dump=True)

    def proxy(self, id_or_name: int | str) -> dict[str, Any]:
        """One proxy by id or name."""
        key = "name" if isinstance(id_or_name, str) else "id"
        replies = self.request("get", {key: id_or_name})
        if not replies:
            raise KmlbusError(f"kmlbus get {key}={id_or_name!r}: the kernel sent no proxy")
        return replies[0]

    def set_mode(self, proxy_id: int, mode: str, reason: str = "operator") -> None:
        """Move a proxy to *mode* (refused by the kernel unless the mode graph allows it)."""
        self.request("set-mode", {"id": proxy_id, "mode": mode, "reason": reason})

    def set_params(self, proxy_id: int, *, share: int | None = None, explore: int | None = None,
                   stale_ms: int | None = None, sample_period: int | None = None) -> None:
        """Set collaboration share, exploration share (permille), stale limit and sample period
        (one decision in N recorded); None leaves one alone."""
        self.request("set-params", {"id": proxy_id, "share": share, "explore": explore, "stale-ms": stale_ms,
                                    "sample-period": sample_period})

    def attach(self, proxy_id: int) -> None:
        """Make this socket the proxy's bus (closing it drops the proxy to emergency)."""
        self.request("attach", {"id": proxy_id})

    def detach(self, proxy_id: int) -> None:
        """Release the proxy from its bus (it falls to emergency)."""
        self.request("detach", {"id": proxy_id})

    def recommend(self, proxy_id: int,
                  recs: npt.NDArray[Any] | bytes | Iterable[tuple[int, int, int]],
                  *, wait: bool = True) -> None:
        """Send recommendations: ``(key, value, ttl_ms)`` rows, a ``rec`` struct array, or
        ``rec`` structs packed back to back in ``bytes`` (what the dispatcher's hot path makes).

        More than the spec's ``max-recs`` entries go as several requests,
        each all-or-nothing in the kernel.  With ``wait=False`` no ACK is
        asked for (:meth:`send_nowait`): the kernel has applied them when
        this returns, and a refusal shows up in :meth:`take_errors`.
        """
        size, step = _rec_limits()
        if isinstance(recs, bytes):
            if len(recs) % size:
                raise KmlbusError(f"recommend: {len(recs)} bytes is not a whole number of "
                                  f"{size}-byte rec structs")
            if not wait:  # the hot path: no array at all
                for i in range(0, len(recs), step * size):
                    self._recommend_nowait(proxy_id, recs[i:i + step * size])
                return
            recs = np.frombuffer(recs, dtype=codec.struct_dtype("rec"))
        dt = codec.struct_dtype("rec")
        if isinstance(recs, np.ndarray) and recs.dtype in (dt, codec.run_dtype("rec")):
            arr = codec.packed(recs, "rec")
        else:
            arr = np.array(list(recs), dtype=dt)
        for i in range(0, len(arr), step):
            if wait:
                self.request("recommend", {"id": proxy_id, "recs": arr[i:i + step]})
            else:
                self._recommend_nowait(proxy_id, arr[i:i + step].tobytes())


@functools.lru_cache(maxsize=None)
def _rec_limits() -> tuple[int, int]:
    """(bytes of one ``rec``, most ``rec`` per ``recommend``) from the spec."""
    sp = kspec.load()
    return sp.structs["rec"].size, int(sp.consts["max-recs"])


class Connection(GenlSocket, ControlOps):
    """A socket talking to the ``kmlbus`` family (spec name), resolved on creation.

    Joins *groups* (spec multicast group names).  Raises :class:`ModuleNotLoaded`
    when the kernel has no such family.  Attributes: ``family_id``,
    ``groups`` (name -> id), ``ops`` (cmd -> kernel GENL_* flags), ``portid``,
    ``version`` (the kernel's family version), ``stats``.
    """

    def __init__(self, groups: Sequence[str] = (), rcvbuf: int = 8 << 20, *, timeout: float = 5.0,
                 broadcast_error: bool = False) -> None:
        super().__init__(rcvbuf, timeout, broadcast_error=broadcast_error)
        self.spec = kspec.load()
        self._event_cmds = frozenset(o.value for o in self.spec.ops if o.event is not None)
        try:
            info = self.get_family(self.spec.name)
        except NetlinkError as e:
            self.close()
            if e.errno == errno_mod.ENOENT:
                raise ModuleNotLoaded(self.spec.name) from None
            raise
        except BaseException:
            self.close()
            raise
        self.family_id = info.id
        self.family_name = info.name
        #: requests sent without waiting (seq -> (op, attribute set, request bytes)),
        #: so that a late error can still be explained; bounded, oldest forgotten
        self._unacked: collections.OrderedDict[int, tuple[str, str, bytes]] = collections.OrderedDict()
        #: kernel errors of such requests, oldest first (bounded; all counted in
        #: ``stats["async_errors"]``); :meth:`take_errors` hands them over
        self.async_errors: collections.deque[NetlinkError] = collections.deque(maxlen=256)
        self.stats["async_errors"] = 0
        self.version = info.version
        self.ops: dict[int, int] = info.ops
        self.groups: dict[str, int] = info.groups
        if info.version != self.spec.version:
            log.warning("kernel %s family is version %d, this bus speaks version %d",
                        info.name, info.version, self.spec.version)
        try:
            for g in groups:
                self.join(g)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Connection:
        return self

    def _is_event_op(self, m: Message) -> bool:
        return m.type == self.family_id and m.cmd in self._event_cmds

    def _decode(self, data: bytes) -> list[Message]:
        # The kernel sends each telemetry/feedback batch as a datagram of one message:
        # decode those the short way (codec.peek_event), everything else generically.
        m = codec.peek_event(data, self.family_id, views=False)
        return [m] if m is not None else super()._decode(data)

    def _park(self, m: Message) -> None:
        if m.type == codec.NLMSG_ERROR and m.seq in self._unacked:
            op, set_name, req = self._unacked.pop(m.seq)
            if m.error:  # without NLM_F_ACK the kernel only answers failures
                self.async_errors.append(self._error(m, op, set_name, req))
                self.stats["async_errors"] += 1
            return
        super()._park(m)

    def send_nowait(self, op: str, attrs: Mapping[str, Any]) -> int:
        """Send request *op* without asking for an ACK, and return at once; its seq.

        Netlink hands a request to the kernel synchronously: when this
        returns, the kernel has run the operation.  Only a failure is
        answered; it is collected by the next receive on this socket into
        :attr:`async_errors` (see :meth:`take_errors`).
        """
        self._op(op)
        seq = self.next_seq()
        self._send_unacked(seq, op, codec.encode_msg(self.family_id, op, attrs, seq=seq,
                                                     flags=codec.NLM_F_REQUEST))
        return seq

    def _op(self, op: str) -> kspec.Op:
        """The spec's operation *op*, or a clear error naming the ones there are."""
        try:
            return self.spec.op(op)
        except kspec.SpecError as e:
            raise KmlbusError(str(e)) from None

    def _send_unacked(self, seq: int, op: str, req: bytes) -> None:
        self._unacked[seq] = (op, self.spec.op_by_name[op].attr_set, req)
        while len(self._unacked) > _UNACKED_MAX:
            self._unacked.popitem(last=False)
        self._sock.sendto(req, (0, 0))

    def take_errors(self) -> list[NetlinkError]:
        """Errors the kernel returned for :meth:`send_nowait` requests, oldest first.

        Reads what is waiting on the socket first (never blocks); other
        traffic found meanwhile stays queued for :meth:`recv`.
        """
        self._drain(DRAIN_MAX)
        out = list(self.async_errors)
        self.async_errors.clear()
        return out

    def join(self, group: str) -> None:
        """Join multicast group *group* (``telemetry`` or ``events``)."""
        gid = self.groups.get(group)
        if gid is None:
            raise KmlbusError(f"{self.family_name} has no multicast group {group!r}; the kernel offers {sorted(self.groups)}")
        self.join_group_id(gid)

    def leave(self, group: str) -> None:
        """Leave multicast group *group*."""
        gid = self.groups.get(group)
        if gid is not None:
            self.leave_group_id(gid)

    # --- requests -----------------------------------------------------------
    def request(self, op: str, attrs: Mapping[str, Any] | None = None, *, dump: bool = False) -> list[dict[str, Any]]:
        """Run spec operation *op* and return the decoded reply attribute dicts.

        ``[]`` for a bare ACK.  A kernel error raises :class:`NetlinkError`
        with the extack message (and the offending attribute's name when the
        kernel points at one).
        """
        o = self._op(op)
        seq = self.next_seq()
        flags = codec.NLM_F_REQUEST | codec.NLM_F_ACK | (codec.NLM_F_DUMP if dump else 0)
        req = codec.encode_msg(self.family_id, op, attrs or {}, seq=seq, flags=flags)
        out: list[dict[str, Any]] = []
        for m in self.transact(req, seq):
            if m.type in (codec.NLMSG_ERROR, codec.NLMSG_DONE):
                if m.error:
                    raise self._error(m, op, o.attr_set, req)
            elif m.type == self.family_id:
                out.append(m.attrs)
        return out

    def _error(self, m: Message, op: str, set_name: str, req: bytes) -> NetlinkError:
        missing = None
        if m.extack_missing > 0:
            a = self.spec.attr_sets[set_name].by_value.get(m.extack_missing)
            missing = a.name if a else str(m.extack_missing)
        bad = _bad_attr_name(req, m.extack_offset, set_name) if m.extack_offset >= 0 else None
        return NetlinkError(-m.error, refusal_text(m.extack, missing, bad), op,
                            self.family_name or self.spec.name)

    def request_raw(self, cmd: int, payload: bytes, *, flags: int = codec.NLM_F_REQUEST | codec.NLM_F_ACK,
                    timeout: float | None = None) -> list[Message]:
        """Send an arbitrary attribute *payload* as command *cmd* (for fuzzing).

        Returns every answering message, the terminating ERROR/DONE included;
        kernel errors are reported in ``Message.error`` (negative errno, as on the
        wire) and ``.extack``, not raised.
        """
        seq = self.next_seq()
        req = codec.pack_genlmsg(self.family_id, cmd, self.spec.version, payload, seq=seq, flags=flags)
        expect = bool(flags & (codec.NLM_F_ACK | codec.NLM_F_DUMP))
        return self.transact(req, seq, expect_ack=expect, timeout=timeout)

    def _recommend_nowait(self, proxy_id: int, recs: bytes) -> None:
        # the hot path: one pack instead of the generic encoder (codec.encode_recommend)
        seq = self.next_seq()
        req = codec.encode_recommend(self.family_id, proxy_id, recs, seq=seq,
                                     flags=codec.NLM_F_REQUEST)
        self._send_unacked(seq, "recommend", req)
