"""The modules DKMS built and installed load with modprobe, as on an operator's machine.

``tests/dkms.sh`` runs ``dkms add/install`` on the host (whose root the guest
shares) and then this file with ``KMLBUS_DKMS=1``; in the plain VM suite the
DKMS build has not been done, so the test says so and skips.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from kmlbus.wire.netlink import Connection

from kmlbus.vm.guest import dmesg_mark, dmesg_problems, is_loaded, rmmod


def _modprobe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["modprobe", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def dkms_modules() -> Iterator[int]:
    if os.environ.get("KMLBUS_DKMS") != "1":
        pytest.skip("needs the DKMS install that tests/dkms.sh does first")
    for name in ("kmlbus_sample", "kmlbus"):
        if is_loaded(name):
            rmmod(name)
    mark = dmesg_mark()
    yield mark
    _modprobe("-r", "kmlbus_sample", "kmlbus")
    assert not is_loaded("kmlbus")
    assert not dmesg_problems(mark)


def test_modprobe_loads_the_dkms_built_modules_with_their_dependency(dkms_modules: int) -> None:
    kver = os.uname().release
    path = subprocess.run(["modinfo", "-n", "kmlbus_sample"], capture_output=True, text=True,
                          check=True).stdout.strip()
    # DKMS compresses the module as the kernel's own are (6.12: .ko.xz; 6.1: plain .ko)
    assert path.removesuffix(".xz").removesuffix(".zst").removesuffix(".gz") == \
        f"/lib/modules/{kver}/updates/dkms/kmlbus_sample.ko", path
    r = _modprobe("kmlbus_sample")  # pulls in kmlbus.ko through depmod's dependency
    assert r.returncode == 0, r.stderr
    assert is_loaded("kmlbus") and is_loaded("kmlbus_sample")
    with Connection() as c:
        names = [p["name"] for p in c.proxies()]
    assert "sample" in names
