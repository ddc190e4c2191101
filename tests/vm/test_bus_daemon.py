"""``kmlbus run`` and the CLI against the real module (issue 3 acceptance)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmlbus.wire import codec

from .busproc import Daemon, kernel_mode, kernel_proxy, wait_for
from .conftest import KMLBUS_KO, SAMPLE_KO, LoadedModules, insmod, rmmod


@pytest.fixture
def daemon(modules: LoadedModules, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path).start()
    try:
        yield d
    finally:
        d.stop()
        print("---- kmlbus run log (tail) ----\n" + d.output()[-4000:])


def _counters() -> dict[str, int]:
    return dict(kernel_proxy()["counters"])


def test_pinned_recommendation_mode_applies_the_daemons_recommendations(daemon: Daemon) -> None:
    for mode in ("learning", "collaboration", "recommendation"):
        r = daemon.cli("mode", "sample", mode, "--pin")
        assert r.returncode == 0, r.stderr
    before = _counters()
    wait_for("model-arm decisions", lambda: _counters()["decisions-model"] - before["decisions-model"] > 500, 120)
    after = _counters()
    assert after["recs-applied"] > before["recs-applied"]
    assert after["recs-received"] > before["recs-received"]
    assert kernel_mode() == "recommendation"
    daemon.check_alive()


def test_status_json_agrees_with_the_kernel(daemon: Daemon) -> None:
    # pinned, so the bus holds the mode still while we compare
    assert daemon.cli("mode", "sample", "emergency", "--pin").returncode == 0
    k = kernel_proxy()
    r = daemon.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    views = json.loads(r.stdout)
    (v,) = [v for v in views if v["name"] == "sample"]
    assert v["id"] == k["id"]
    assert v["mode"] == codec.enum_name("mode", int(k["mode"]))
    assert v["bus_portid"] == int(k["bus-portid"]) != 0
    assert "stale" not in v.get("bus", {})
    assert [f for f in v["features"]] == [f["name"] for f in k["feature"]]
    # counters only grow: the CLI's snapshot lies between two kernel reads
    later = kernel_proxy()["counters"]
    for name, value in v["counters"].items():
        assert k["counters"][name] <= value <= later[name], name


def test_mode_refusal_prints_the_kernels_reason_and_changes_nothing(daemon: Daemon) -> None:
    assert daemon.cli("mode", "sample", "emergency", "--pin").returncode == 0
    before = kernel_proxy()
    r = daemon.cli("mode", "sample", "recommendation")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "emergency" in lines[0] and "recommendation" in lines[0], lines[0]
    after = kernel_proxy()
    assert after["mode"] == before["mode"]
    assert after["counters"]["mode-changes"] == before["counters"]["mode-changes"]


def test_killing_the_daemon_puts_the_proxy_in_emergency(daemon: Daemon) -> None:
    assert daemon.cli("mode", "sample", "learning", "--pin").returncode == 0
    assert kernel_mode() == "learning"
    state = Path(daemon.env["KMLBUS_STATE"])
    wait_for("the daemon's state file", state.exists, 30)
    daemon.signal(signal.SIGKILL)
    p = kernel_proxy()
    assert codec.enum_name("mode", int(p["mode"])) == "emergency"
    assert int(p.get("bus-portid", 0)) == 0
    assert codec.enum_name("reason", int(p["reason"])) == "bus-gone"
    # the dead daemon's state file is still there, and status says it is stale
    r = daemon.cli("status", "--json")
    (v,) = [v for v in json.loads(r.stdout) if v["name"] == "sample"]
    assert v["mode"] == "emergency" and "not attached" in v["bus"]["stale"], v.get("bus")


def test_sigterm_detaches_and_exits_zero(daemon: Daemon) -> None:
    assert daemon.signal(signal.SIGTERM) == 0
    p = kernel_proxy()
    assert int(p.get("bus-portid", 0)) == 0
    assert codec.enum_name("mode", int(p["mode"])) == "emergency"


def test_daemon_reattaches_after_the_module_is_reloaded(daemon: Daemon) -> None:
    first = int(kernel_proxy()["bus-portid"])
    assert first != 0
    rmmod("kmlbus_sample")
    rmmod("kmlbus")
    insmod(KMLBUS_KO)
    insmod(SAMPLE_KO)
    assert int(kernel_proxy().get("bus-portid", 0)) == 0  # a fresh module knows no bus
    wait_for("the daemon to re-attach", lambda: int(kernel_proxy().get("bus-portid", 0)) != 0, 60)
    daemon.check_alive()
    assert "family lost" in daemon.output()


def test_a_removed_proxy_is_forgotten_and_its_new_registration_adopted_on_the_same_socket(
        daemon: Daemon) -> None:
    before = kernel_proxy()
    rmmod("kmlbus_sample")  # the kernel destroys the proxy and announces proxy-removed
    insmod(SAMPLE_KO)  # same name, new id
    wait_for("the daemon to adopt the new proxy", lambda: int(kernel_proxy().get("bus-portid", 0)), 60)
    after = kernel_proxy()
    assert int(after["id"]) != int(before["id"])
    # the same socket: the daemon followed the event instead of reconnecting
    assert int(after["bus-portid"]) == int(before["bus-portid"])
    daemon.check_alive()
    log = daemon.output()
    assert f"proxy sample (id {before['id']}): removed by the kernel; forgotten" in log, log[-2000:]
    assert "no longer attached" not in log and "family lost" not in log


def test_cli_without_privilege_says_eperm_in_one_line(daemon: Daemon) -> None:
    assert daemon.cli("mode", "sample", "emergency", "--pin").returncode == 0
    before = kernel_proxy()
    # import first (the interpreter's files may be root-only), then drop to nobody
    code = ("import os, sys, locale, gettext; import kmlbus.tools.cli, kmlbus.bus.pins; from kmlbus.tools.cli import main; "
            "os.setgroups([]); os.setgid(65534); os.setuid(65534); "
            "sys.exit(main(['mode', 'sample', 'learning']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, HOME="/tmp"), check=False)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "not permitted" in r.stderr.lower() or "eperm" in r.stderr.lower(), r.stderr
    after = kernel_proxy()
    assert after["mode"] == before["mode"]
    assert after["counters"]["mode-changes"] == before["counters"]["mode-changes"]


def test_cli_without_the_module_says_how_to_load_it(kmlbus_module: int) -> None:
    rmmod("kmlbus")
    try:
        r = subprocess.run([sys.executable, "-m", "kmlbus", "status"], capture_output=True, text=True,
                           timeout=240, check=False)
    finally:
        insmod(KMLBUS_KO)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "not loaded" in r.stderr and "insmod" in r.stderr, r.stderr
