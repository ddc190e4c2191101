"""The fast lane: answer a telemetry datagram from its bytes, before it is decoded.

Under emulation, code that has not run for a few milliseconds is slow to run
again, and kernel batches arrive every 20 ms or so; so the datagram that ends
an idle wait is answered with as little distinct code as possible:
:func:`kmlbus.wire.codec.peek_event` reads the proxy id and the samples' bytes
with ``struct``, the dispatcher makes packed recommendations from them, and they
are sent as they are.  The daemon's loop calls :func:`answer` first, then
decodes the datagram and does the bookkeeping without recommending again.
"""

from __future__ import annotations

from collections.abc import Mapping

from kmlbus.bus.proxy import Proxy
from kmlbus.wire import codec

__all__ = ["answer"]


def answer(data: bytes, family_id: int, proxies: Mapping[int, Proxy]) -> bool:
    """Send the recommendations for the telemetry batch in *data*; True if it did.

    Only a datagram that is exactly one telemetry message of a known proxy that
    is not exploring (exploration needs the batch as an array) takes the lane;
    anything else, or anything unusual, returns False and goes the decoded way.
    """
    m = codec.peek_event(data, family_id)
    if m is None or m.op != "telemetry":
        return False
    p = proxies.get(m.attrs.get("id", -1))
    raw = m.attrs.get("records")
    if p is None or not isinstance(raw, memoryview) or p.exploring is not None:
        return False
    if not p.recommend(raw):
        return False
    p.fast_lane += 1
    return True
