"""Smoke tests of the VM testbed itself: right kernel, modules load cleanly."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest

from kmlbus.vm import installed_kernels, project_root
from kmlbus.vm.guest import (
    KMLBUS_KO,
    SAMPLE_KO,
    dmesg_mark,
    dmesg_since,
    insmod,
    is_loaded,
    rmmod,
)

pytestmark = pytest.mark.vm


def test_guest_runs_an_installed_debian_kernel() -> None:
    uname = platform.uname()
    assert uname.release in installed_kernels(), (uname.release, installed_kernels())
    assert "Debian" in uname.version
    assert uname.node == "kmlbus-vm"


def test_project_is_shared_read_write_at_its_host_path(tmp_path: Path) -> None:
    assert Path.cwd() == project_root()
    probe = project_root() / "build" / "vm" / f"probe-{os.getpid()}"
    probe.write_text("ok")
    try:
        assert probe.read_text() == "ok"
    finally:
        probe.unlink()
    assert os.environ["KMLBUS_IN_VM"] == "1"


def test_kmlbus_module_loads_and_shows_in_sysfs(kmlbus_module: int) -> None:
    assert Path("/sys/module/kmlbus").is_dir()
    assert is_loaded("kmlbus")


def test_kmlbus_and_sample_load_and_unload_without_dmesg_noise() -> None:
    mark = dmesg_mark()
    for _ in range(2):  # twice: a second load catches leftovers of the first unload
        insmod(KMLBUS_KO)
        insmod(SAMPLE_KO)
        assert is_loaded("kmlbus") and is_loaded("kmlbus_sample")
        rmmod("kmlbus_sample")
        rmmod("kmlbus")
        assert not Path("/sys/module/kmlbus").exists()
    log = dmesg_since(mark)
    noisy = [line for line in log if any(w in line for w in ("WARNING", "BUG", "Oops", "Call Trace"))]
    assert not noisy, noisy


def test_dmesg_since_returns_only_new_records() -> None:
    mark = dmesg_mark()
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write("kmlbus-vm-smoke: hello\n")
    assert dmesg_since(mark) == ["kmlbus-vm-smoke: hello"]
