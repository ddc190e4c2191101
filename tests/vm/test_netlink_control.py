"""The asyncio control plane (kmlbus.wire.control) against the real kmlbus.ko, in the guest."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest

from kmlbus.contract import spec as kspec
from kmlbus.wire import control
from kmlbus.wire.netlink import Connection, NetlinkError

pytestmark = pytest.mark.vm

SPEC = kspec.load()
MODE = SPEC.enums["mode"]


def test_pyroute2_resolution_matches_the_raw_connection(modules: Any) -> None:
    info = asyncio.run(control.resolve())
    with Connection() as c:
        assert (info.id, info.version, info.ops, info.groups) == (c.family_id, c.version, c.ops, c.groups)


def test_async_control_runs_requests_and_keeps_the_extack(modules: Any) -> None:
    async def main() -> None:
        async with control.AsyncControl() as ctl:
            assert ctl.family is not None and set(ctl.family.groups) == set(SPEC.mcast_groups)
            (p,) = [p for p in await ctl.proxies() if p["name"] == "sample"]
            assert (await ctl.proxy("sample"))["id"] == p["id"]
            await ctl.attach(p["id"])
            await ctl.set_mode(p["id"], "learning")
            assert (await ctl.proxy(p["id"]))["mode"] == MODE.value("learning")
            with pytest.raises(NetlinkError) as ei:
                await ctl.set_mode(p["id"], "recommendation")  # learning -> recommendation: not in the graph
            assert ei.value.errno == errno.EINVAL and ei.value.extack
            await ctl.set_mode(p["id"], "emergency")

    asyncio.run(main())
