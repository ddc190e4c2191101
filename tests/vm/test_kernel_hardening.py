"""kmlbus.ko's answers to the review defects of issue 11, each shown against the real kernel.

Uses ``kernel/testmod/kmlbus_testmod.ko`` (proxy ``testmod``) where the
in-kernel API must be driven from where user space cannot reach it: a hard
interrupt, a module that leaks its proxy.
"""

from __future__ import annotations

import errno
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from kmlbus import codec
from kmlbus import spec as kspec
from kmlbus.netlink import Connection
from kmlbus.vm import project_root
from kmlbus.vm.guest import KMLBUS_KO, dmesg_mark, dmesg_since, insmod, is_loaded, rmmod

pytestmark = pytest.mark.vm

SPEC = kspec.load()
MODE = SPEC.enums["mode"]
REASON = SPEC.enums["reason"]
TESTMOD_KO = project_root() / "kernel" / "testmod" / "kmlbus_testmod.ko"
TESTMOD_PARAMS = Path("/sys/module/kmlbus_testmod/parameters")


def _names(c: Connection) -> list[str]:
    return [p["name"] for p in c.proxies()]


# ---- defect 9: a module that leaves its proxy behind --------------------------------------

def test_a_proxy_left_behind_by_its_module_is_destroyed_and_kmlbus_unloads(kmlbus_module: int) -> None:
    insmod(TESTMOD_KO, leak=1)
    with Connection() as c:
        assert "testmod" in _names(c)
    mark = dmesg_mark()
    rmmod("kmlbus_testmod")
    with Connection() as c:
        assert "testmod" not in _names(c), "the leaked proxy outlived its module"
    assert any("left proxy testmod" in m for m in dmesg_since(mark)), dmesg_since(mark)
    # the fixture's rmmod kmlbus and its log check follow: no WARN for a leftover proxy
