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


# ---- defect 7: expiry kept in 32 bits of jiffies --------------------------------------------

@pytest.mark.sample_params(rate=0)
def test_stale_slots_are_swept_without_any_decision_reading_them(modules: Any) -> None:
    # A slot was only cleared when a decision read it, so one left unread for
    # 2^31 jiffies looked fresh again.  The sweep clears (and counts) it unread.
    with Connection() as c:
        pid = int(c.proxy("sample")["id"])
        before = c.proxy(pid)["counters"]
        c.recommend(pid, [(k, 5, 1) for k in range(64)])
        end = time.monotonic() + 30
        while time.monotonic() < end:
            cnt = c.proxy(pid)["counters"]
            if cnt["recs-expired"] - before["recs-expired"] == 64:
                break
            time.sleep(0.2)
        assert cnt["samples"] == before["samples"], "the sample decided although rate=0"
        assert cnt["recs-expired"] - before["recs-expired"] == 64, cnt


# ---- defect 10: reserved header bytes -------------------------------------------------------

def test_a_request_with_the_reserved_genl_header_byte_set_is_refused(modules: Any) -> None:
    # resv_start_op past the last op left reserved bytes unchecked; a new family leaves it 0
    with Connection() as c:
        pid = int(c.proxy("sample")["id"])
        attrs = codec.pack_attr(SPEC.attr_sets["proxy"].by_name["id"].value, struct.pack("=I", pid))
        get = SPEC.op_by_name["get"].value
        for reserved, want in ((0, 0), (1, -errno.EINVAL)):
            seq = c.next_seq()
            req = codec.pack_nlmsg(c.family_id, codec.NLM_F_REQUEST | codec.NLM_F_ACK, seq,
                                   struct.pack("=BBH", get, SPEC.version, reserved) + attrs)
            answers = c.transact(req, seq)
            assert answers[-1].error == want, (reserved, answers[-1])
