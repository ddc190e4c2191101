"""Asyncio control plane: family and group resolution through pyroute2.

DESIGN.md puts the control plane on pyroute2 and the hot path on the raw
socket of :mod:`kmlbus.wire.netlink`.  This module is the pyroute2 half:
:func:`resolve` asks ``nlctrl`` for the ``kmlbus`` family with pyroute2's
asyncio generic netlink socket and returns the same
:class:`~kmlbus.wire.netlink.FamilyInfo` the raw transport builds.

Control *requests* (set-mode, attach, ...) in :class:`AsyncControl` go
through a :class:`~kmlbus.wire.netlink.Connection` in a worker thread instead of
pyroute2, on purpose: pyroute2 0.9 does not enable ``NETLINK_EXT_ACK`` and
reports only the errno, and every rejected kmlbus request carries an extack
message that operators need ("mode change not allowed by the graph", "no
proxy with this id").  The bench (:mod:`kmlbus.tools.bench_wire`) also shows
pyroute2 several times slower per request.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from kmlbus.contract import spec as kspec
from kmlbus.wire import netlink as nl

__all__ = ["AsyncControl", "resolve"]


async def resolve(family: str | None = None) -> nl.FamilyInfo:
    """Resolve a generic netlink family (default: the spec's ``kmlbus``) through pyroute2.

    Raises :class:`~kmlbus.wire.netlink.ModuleNotLoaded` when the kernel does not
    have it, :class:`~kmlbus.wire.netlink.NetlinkError` for other kernel errors.
    """
    from pyroute2.netlink.exceptions import NetlinkError as Pr2NetlinkError
    from pyroute2.netlink.generic import (
        GENL_ID_CTRL,
        AsyncGenericNetlinkSocket,
        ctrlmsg,
    )

    name = family or kspec.load().name
    sock = AsyncGenericNetlinkSocket()
    sock.module_err_level = "debug"  # we raise ModuleNotLoaded ourselves; no pyroute2 error log
    try:
        try:
            # bind() resolves too, but keeps only the id and groups; ask again for ops and version.
            await sock.bind(name, ctrlmsg)
            sock.marshal.msg_map[GENL_ID_CTRL] = ctrlmsg
            msg = await sock.discovery(name)
        except Pr2NetlinkError as e:
            if e.code == errno_mod.ENOENT:
                raise nl.ModuleNotLoaded(name) from None
            raise nl.NetlinkError(e.code, "", "getfamily", "nlctrl") from None
        ops = {int(o.get_attr("CTRL_ATTR_OP_ID")): int(o.get_attr("CTRL_ATTR_OP_FLAGS") or 0)
               for o in msg.get_attr("CTRL_ATTR_OPS") or []}
        groups = {str(g.get_attr("CTRL_ATTR_MCAST_GRP_NAME")): int(g.get_attr("CTRL_ATTR_MCAST_GRP_ID"))
                  for g in msg.get_attr("CTRL_ATTR_MCAST_GROUPS") or []}
        return nl.FamilyInfo(
            name=str(msg.get_attr("CTRL_ATTR_FAMILY_NAME")),
            id=int(msg.get_attr("CTRL_ATTR_FAMILY_ID")),
            version=int(msg.get_attr("CTRL_ATTR_VERSION") or 0),
            hdrsize=int(msg.get_attr("CTRL_ATTR_HDRSIZE") or 0),
            maxattr=int(msg.get_attr("CTRL_ATTR_MAXATTR") or 0),
            ops=ops,
            groups=groups,
        )
    finally:
        sock.close()


class AsyncControl:
    """An asyncio control client for kmlbus.

    ``family`` comes from :func:`resolve` (pyroute2); requests run on one
    private :class:`~kmlbus.wire.netlink.Connection` in a worker thread,
    serialized by a lock (a Connection is not thread-safe).  Note that the
    Connection's port becomes the proxy's bus on :meth:`attach`: closing
    this client releases it.

    Use ``async with AsyncControl() as ctl: await ctl.set_mode(1, "learning")``.
    """

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self.family: nl.FamilyInfo | None = None
        self._conn: nl.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> AsyncControl:
        """Resolve the family and open the request socket."""
        self.family = await resolve()
        self._conn = await asyncio.to_thread(nl.Connection, (), 1 << 20, timeout=self.timeout)
        return self

    async def close(self) -> None:
        """Close the request socket."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def __aenter__(self) -> AsyncControl:
        return await self.open()

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def request(self, op: str, attrs: Mapping[str, Any] | None = None, *,
                      dump: bool = False) -> list[dict[str, Any]]:
        """:meth:`kmlbus.wire.netlink.Connection.request`, awaited."""
        if self._conn is None:
            raise nl.KmlbusError("AsyncControl is not open: use `async with AsyncControl() as ctl`")
        async with self._lock:
            return await asyncio.to_thread(self._conn.request, op, attrs, dump=dump)

    async def proxies(self) -> list[dict[str, Any]]:
        """Every registered proxy."""
        return await self.request("get", dump=True)

    async def proxy(self, id_or_name: int | str) -> dict[str, Any]:
        """One proxy by id or name."""
        key = "name" if isinstance(id_or_name, str) else "id"
        replies = await self.request("get", {key: id_or_name})
        if not replies:
            raise nl.KmlbusError(f"kmlbus get {key}={id_or_name!r}: the kernel sent no proxy")
        return replies[0]

    async def set_mode(self, proxy_id: int, mode: str, reason: str = "operator") -> None:
        """Move a proxy to *mode* (checked by the kernel against the mode graph)."""
        await self.request("set-mode", {"id": proxy_id, "mode": mode, "reason": reason})

    async def set_params(self, proxy_id: int, *, share: int | None = None, explore: int | None = None,
                         stale_ms: int | None = None, sample_period: int | None = None) -> None:
        """Set share/explore (permille), the stale limit and the sample period; None leaves one alone."""
        await self.request("set-params", {"id": proxy_id, "share": share, "explore": explore,
                                          "stale-ms": stale_ms, "sample-period": sample_period})

    async def attach(self, proxy_id: int) -> None:
        """Make this client's socket the proxy's bus."""
        await self.request("attach", {"id": proxy_id})

    async def detach(self, proxy_id: int) -> None:
        """Release the proxy from its bus."""
        await self.request("detach", {"id": proxy_id})

    async def recommend(self, proxy_id: int, recs: Sequence[tuple[int, int, int]] | Any) -> None:
        """:meth:`kmlbus.wire.netlink.Connection.recommend`, awaited."""
        if self._conn is None:
            raise nl.KmlbusError("AsyncControl is not open: use `async with AsyncControl() as ctl`")
        async with self._lock:
            await asyncio.to_thread(self._conn.recommend, proxy_id, recs)
