"""How large the daemon's telemetry socket's receive buffer must be for a given rate.

The kernel multicasts telemetry and feedback; when the daemon's socket has no
room, the message is lost for it (the socket reports an overrun, ENOBUFS, and
the kernel counts the records ``send-failed``).  The buffer must hold what
arrives while the loop is away (a slow inference, a model reload, a garbage
collection): `STALL_S` seconds at the configured rate.

A queued message costs its skb's ``truesize``, not its payload: the data area
(payload, netlink and genetlink headers, ``skb_shared_info``) comes from a
power-of-two kmalloc cache, plus the ``sk_buff`` itself.  Batch sizes and
record sizes come from the family spec.
"""

from __future__ import annotations

import math

from kmlbus.contract import spec as _spec

__all__ = ["MIN_RCVBUF", "MAX_RCVBUF", "STALL_S", "bytes_per_decision", "receive_buffer"]

#: Seconds of telemetry the buffer holds while the loop does something else.
STALL_S = 0.5
#: Never less than this (what the daemon used before sizing for a rate).
MIN_RCVBUF = 8 << 20
#: Never more: the kernel takes at most INT_MAX / 2 and doubles it.
MAX_RCVBUF = 1 << 30

#: Netlink + genetlink headers, the proxy id and drops attributes, rounded up.
_HEADERS = 64
#: ``sizeof(struct skb_shared_info)`` on x86_64, at the end of every data area.
_SHINFO = 320
#: ``sizeof(struct sk_buff)`` with its cache alignment, counted in truesize.
_SKB = 256


def _truesize(payload: int) -> int:
    """The receive-buffer charge of one message carrying *payload* bytes of records."""
    return (1 << math.ceil(math.log2(payload + _HEADERS + _SHINFO))) + _SKB


def bytes_per_decision() -> int:
    """Receive-buffer bytes one decision costs: its sample and its feedback record."""
    sp = _spec.load()
    total = 0.0
    for struct_name, per_msg in (("sample", sp.consts["msg-samples"]),
                                 ("feedback", sp.consts["msg-feedback"])):
        total += _truesize(per_msg * sp.structs[struct_name].size) / per_msg
    return math.ceil(total)


def receive_buffer(rate: int, stall_s: float = STALL_S) -> int:
    """``SO_RCVBUF`` bytes for *rate* decisions per second over all proxies.

    ``rate * stall_s * bytes_per_decision()``, within [`MIN_RCVBUF`, `MAX_RCVBUF`].
    """
    need = math.ceil(rate * stall_s * bytes_per_decision())
    return max(MIN_RCVBUF, min(MAX_RCVBUF, need))
