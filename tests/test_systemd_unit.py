"""packaging/systemd: the unit verifies with systemd-analyze and starts the daemon the CLI knows.

``systemd-analyze verify`` needs the unit's program to exist on systemd's search
path; where ``kmlbus`` is installed elsewhere (a pyenv or venv), the test verifies
a copy whose ExecStart runs this Python with ``-m kmlbus`` instead: every other
line is verified as shipped.
"""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kmlbus.bus import metrics, statefile
from kmlbus.tools import cli

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "packaging" / "systemd" / "kmlbus.service"
DROPIN = ROOT / "packaging" / "systemd" / "metrics.conf"
#: where systemd looks for a program given without a path (systemd.service(5), "Command lines")
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def service(path: Path) -> configparser.RawConfigParser:
    p = configparser.RawConfigParser(strict=False, interpolation=None, delimiters=("=",))
    p.optionxform = str  # type: ignore[assignment,method-assign]
    p.read_string(path.read_text())
    return p


def exec_args(path: Path) -> list[str]:
    """The last non-empty ExecStart= of a unit or drop-in, split as systemd does (simple quoting)."""
    lines = [ln.split("=", 1)[1] for ln in path.read_text().splitlines() if ln.startswith("ExecStart=")]
    return shlex.split([ln for ln in lines if ln][-1])


def test_the_unit_is_a_notify_service_with_a_watchdog_and_restarts_on_failure() -> None:
    s = service(UNIT)["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert int(s["WatchdogSec"].rstrip("s")) > 0
    assert s["Restart"] == "on-failure"


def test_the_unit_is_hardened_for_a_netlink_daemon() -> None:
    s = service(UNIT)["Service"]
    assert s["CapabilityBoundingSet"] == "CAP_NET_ADMIN"
    assert s["RestrictAddressFamilies"].split() == ["AF_NETLINK", "AF_UNIX"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelModules",
                "RestrictNamespaces", "RestrictSUIDSGID"):
        assert s[key] == "yes", key
    assert s["ProtectSystem"] == "strict"


def test_the_state_file_lives_in_the_units_runtime_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    s = service(UNIT)["Service"]
    monkeypatch.delenv("KMLBUS_STATE", raising=False)
    assert statefile.default_path().parent == Path("/run") / s["RuntimeDirectory"]
    env = dict(kv.split("=", 1) for kv in shlex.split(s["Environment"]))
    assert Path(env["KMLBUS_STATE"]).parent == Path("/run") / s["RuntimeDirectory"]


def test_execstart_is_a_command_line_the_cli_accepts() -> None:
    argv = exec_args(UNIT)
    assert argv[0] == "kmlbus"
    args = cli.build_parser().parse_args(argv[1:])
    assert args.func is cli.cmd_run and args.config == "/etc/kmlbus/kmlbus.toml" and args.metrics is None
    argv = exec_args(DROPIN)
    args = cli.build_parser().parse_args(argv[1:])
    assert args.func is cli.cmd_run and metrics.parse_address(args.metrics) == ("127.0.0.1", 9464)
    assert "AF_INET" in service(DROPIN)["Service"]["RestrictAddressFamilies"].split()


def _runnable(text: str) -> str:
    """*text* with ``ExecStart=kmlbus`` made runnable here if kmlbus is not on systemd's path."""
    if shutil.which("kmlbus", path=SYSTEMD_PATH):
        return text
    return text.replace("ExecStart=kmlbus ", f"ExecStart={Path(sys.executable).resolve()} -m kmlbus ")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_is_clean_for_the_unit_and_its_metrics_drop_in(tmp_path: Path) -> None:
    (tmp_path / "kmlbus.service").write_text(_runnable(UNIT.read_text()))
    (tmp_path / "kmlbus.service.d").mkdir()
    (tmp_path / "kmlbus.service.d" / "metrics.conf").write_text(_runnable(DROPIN.read_text()))
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "kmlbus.service")],
                       capture_output=True, text=True, timeout=120, check=False,
                       env={"SYSTEMD_UNIT_PATH": f"{tmp_path}:", "PATH": SYSTEMD_PATH})
    assert r.returncode == 0 and r.stdout == r.stderr == "", r.stdout + r.stderr
