"""systemd's notify protocol, received on a real AF_UNIX datagram socket.

The daemon runs against the user-space stand-in (simulated time) with
``$NOTIFY_SOCKET`` pointing at a socket bound here: it must say READY=1 once
its proxies are attached, WATCHDOG=1 from its loop every half ``$WATCHDOG_USEC``,
and STOPPING=1 when it detaches.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmlbus.bus import models
from kmlbus.bus.config import loads
from kmlbus.bus.daemon import Bus, serve
from kmlbus.bus.sdnotify import Notifier
from tests.support.standin import StandinKernel


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    s.bind(path)
    yield s, path
    s.close()


def drain(s: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(s.recv(4096, socket.MSG_DONTWAIT).decode())
        except BlockingIOError:
            return out


def make_bus(tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
             ) -> tuple[StandinKernel, Bus]:
    monkeypatch.setenv("KMLBUS_STATE", str(tmp_path / "state.json"))
    models.save(models.sample_good_model(), tmp_path / "model.onnx")
    cfg = loads('[proxy.sample]\nmodel = "model.onnx"\n', tmp_path / "bus.toml")
    k = StandinKernel(seed=1)
    n = Notifier(env, clock=k.clock.now)
    return k, Bus(cfg, clock=k.clock.now, opener=k.open, state_path=tmp_path / "state.json", notifier=n)


def test_ready_after_attach_then_watchdog_pings_then_stopping(
        tmp_path: Path, listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch) -> None:
    s, path = listener
    k, bus = make_bus(tmp_path, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, monkeypatch)
    serve(bus, duration=10.0)
    got = drain(s)
    assert got[0] == "READY=1\nSTATUS=attached to 1 proxies: sample", got[:2]
    assert got[-1] == "STOPPING=1\nSTATUS=detaching"
    pings = got[1:-1]
    assert set(pings) == {"WATCHDOG=1"}
    assert 9 <= len(pings) <= 11, len(pings)  # one per second (half of 2 s) for 10 s
    assert int(k.find("sample").bus_portid) == 0  # and it did detach


def test_the_watchdog_pings_at_half_the_interval_from_the_loop(
        tmp_path: Path, listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch) -> None:
    s, path = listener
    k, bus = make_bus(tmp_path, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"}, monkeypatch)
    assert bus.connect()
    assert bus.notifier is not None and bus.notifier.ready("up")
    start = k.clock.now()
    stamps: list[float] = []
    while k.clock.now() < start + 12:
        bus.step()
        stamps += [k.clock.now() for m in drain(s) if m == "WATCHDOG=1"]
    gaps = [b - a for a, b in zip([start, *stamps], stamps)]
    assert len(stamps) == 7 or len(stamps) == 8, stamps
    assert all(1.5 <= g <= 1.5 + 0.2 for g in gaps), gaps  # 1.5 s, late by at most one step
    bus.shutdown()


def test_an_abstract_socket_name_is_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"kmlbus-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready("up")
        assert s.recv(100) == b"READY=1\nSTATUS=up"
        n.close()


def test_without_systemd_nothing_is_sent_and_nothing_fails() -> None:
    n = Notifier({})
    assert not n.enabled and n.interval is None
    assert not n.ready("up") and not n.keepalive() and not n.stopping()


def test_a_watchdog_meant_for_another_process_is_not_ours(listener: tuple[socket.socket, str]) -> None:
    s, path = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert n.interval is None and not n.keepalive()
    mine = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000", "WATCHDOG_PID": str(os.getpid())})
    assert mine.interval == pytest.approx(0.0005) and mine.keepalive()
    assert drain(s) == ["WATCHDOG=1"]


def test_a_vanished_socket_is_logged_not_raised(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone"), "WATCHDOG_USEC": "1000000"})
    assert n.enabled and not n.ready("up") and not n.keepalive()
