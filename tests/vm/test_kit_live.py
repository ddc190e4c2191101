"""The test kit's state machine (kmlbus.testing.machine) against the real module.

One machine class, two proxies: the sample (its timer decides by itself) and
the readahead consumer on a null_blk disk (it decides when a file is read, so
the machine's ``decide`` reads one).  Short in CI; with
``KMLBUS_HYPOTHESIS_PROFILE=soak`` 20x longer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from kmlbus.testing import profiles
from kmlbus.testing.machine import LiveTarget, ProxyMachine, proxy_machine
from kmlbus.vm import project_root
from kmlbus.vm.guest import KMLBUS_KO, dmesg_mark, dmesg_problems, insmod, is_loaded, rmmod
from kmlbus.vm.nullblk import NullBlk

from .conftest import LoadedModules

pytestmark = pytest.mark.vm

RA_KO = project_root() / "kernel" / "readahead" / "kmlbus_readahead.ko"


def _run(machine: type[ProxyMachine], examples: int, steps: int) -> list[int]:
    judged: list[int] = []

    class Counting(machine):  # type: ignore[valid-type,misc]
        def teardown(self) -> None:
            super().teardown()
            judged.append(self.judged)

    run_state_machine_as_test(Counting, settings=settings(
        settings.get_profile(profiles.load_profile()),
        max_examples=profiles.scaled(examples), stateful_step_count=steps))
    return judged


@pytest.mark.sample_params(rate=500)
def test_the_kit_machine_holds_on_the_sample_proxy(modules: LoadedModules) -> None:
    judged = _run(proxy_machine(LiveTarget(), "sample", decide_s=0.2), examples=2, steps=15)
    # the runs compared decisions with the recommendations sent (not an empty pass)
    assert sum(judged) > 50, judged


class Reader:
    """Sequential passes over one file kept open (its readahead state is one stream, one key),
    with the file's pages evicted before each pass so that every pass reads the disk."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)

    def __call__(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
            off = 0
            while time.monotonic() < end and (n := len(os.pread(self.fd, 65536, off))):
                off += n

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def readahead() -> Iterator[Path]:
    for name in ("kmlbus_readahead", "kmlbus_sample", "kmlbus"):
        if is_loaded(name):
            rmmod(name)
    with NullBlk("/run/kmlbus-kit", name="nullb0", size_mb=64, completion_nsec=200_000) as d:
        path = d.make_file("data", 8)
        mark = dmesg_mark()
        insmod(KMLBUS_KO)
        try:
            insmod(RA_KO, devices="nullb0")
            yield path
        finally:
            for name in ("kmlbus_readahead", "kmlbus"):
                if is_loaded(name):
                    rmmod(name)
        assert not dmesg_problems(mark), dmesg_problems(mark)[:5]


def test_the_kit_machine_holds_on_the_readahead_consumer(readahead: Path) -> None:
    reader = Reader(readahead)
    try:
        m = proxy_machine(LiveTarget(workload=reader), "readahead", decide_s=0.3)
        judged = _run(m, examples=2, steps=12)
    finally:
        reader.close()
    assert sum(judged) > 0, judged
