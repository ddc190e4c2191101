"""The mode machine against the real module (issue 4 acceptance).

With a model better than the default the sample proxy climbs to
recommendation by itself; a worse model swapped in gets it demoted; killing
the bus leaves it in emergency; and in collaboration the kernel gives the
model its configured share of the decisions.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kmlbus.bus import models
from kmlbus.contract import graph as mgraph
from kmlbus.contract import spec
from kmlbus.wire import codec, netlink

from .busproc import Daemon, kernel_mode, wait_for
from .conftest import LoadedModules

CLIMB = ["learning", "collaboration", "recommendation"]


@pytest.fixture
def events(modules: LoadedModules) -> Iterator[netlink.Connection]:
    with netlink.Connection(groups=("events",)) as c:
        yield c


def _modes_seen(conn: netlink.Connection, into: list[tuple[str, str]]) -> None:
    for m in conn.recv(timeout=0.1):
        if m.op == "mode-event":
            into.append((codec.enum_name("mode", int(m.attrs["mode"])),
                         codec.enum_name("reason", int(m.attrs.get("reason", 0)))))


def test_good_model_climbs_bad_model_is_demoted_dead_bus_is_emergency(
        events: netlink.Connection, tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []
    d = Daemon(tmp_path).start()
    try:
        def at(mode: str) -> bool:
            _modes_seen(events, seen)
            return bool(seen) and seen[-1][0] == mode
        wait_for("the climb to recommendation", lambda: at("recommendation"), 300)
        climb = [m for m, _ in seen]
        # every step of the climb was an allowed edge, made by the bus on evidence
        g = mgraph.load()
        path = ["emergency", *climb]
        assert all(g.is_allowed(a, b) for a, b in zip(path, path[1:])), path
        assert climb[-3:] == CLIMB, climb
        assert [r for m, r in seen[-3:]] == ["recovery", "promotion", "promotion"], seen

        bad = d.model.with_suffix(".new")
        bad.write_bytes(models.to_bytes(models.sample_bad_model()))
        bad.replace(d.model)
        wait_for("demotion after the bad model", lambda: (_modes_seen(events, seen), seen[-1][0])[1]
                 != "recommendation", 300)
        assert seen[-1] == ("learning", "demotion"), seen[-3:]

        d.signal(signal.SIGKILL)
        assert kernel_mode() == "emergency"
        wait_for("the bus-gone event", lambda: (_modes_seen(events, seen), seen[-1])[1] ==
                 ("emergency", "bus-gone"), 30)
    finally:
        d.stop()


def test_collaboration_gives_the_model_its_share(modules: LoadedModules, tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    try:
        share = mgraph.load().guards.collaboration_share
        for mode in ("learning", "collaboration"):
            r = d.cli("mode", "sample", mode, "--pin")
            assert r.returncode == 0, r.stderr
        sp = spec.load()
        fresh = sp.enums["sample-flags"].value("has-shadow")
        model = sp.enums["arm"].value("model")
        collab = sp.enums["mode"].value("collaboration")
        n_fresh = n_model = 0
        with netlink.Connection(groups=("telemetry",)) as t:
            end = time.monotonic() + 120
            while n_fresh < 4000 and time.monotonic() < end:
                for m in t.recv(timeout=0.2):
                    if m.op != "telemetry":
                        continue
                    r = m.attrs["records"]
                    r = r[(r["mode"] == collab) & ((r["flags"] & fresh) != 0)]
                    n_fresh += len(r)
                    n_model += int(np.count_nonzero(r["arm"] == model))
        assert n_fresh >= 1000, f"only {n_fresh} decisions with a fresh recommendation"
        p = share / 1000
        sigma = math.sqrt(p * (1 - p) / n_fresh)
        assert abs(n_model / n_fresh - p) < 5 * sigma, (n_model, n_fresh, share)
    finally:
        d.stop()
