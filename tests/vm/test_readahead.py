"""kmlbus_readahead.ko on a real disk: stock in emergency, recommendations change real reads, clean exits.

Runs inside the guest (``python -m kmlbus.vm test tests/vm/test_readahead.py``).
A null_blk disk (memory backed, 2 ms per request) carries ext4 and one 16 MiB
file; the block layer's read counters (``/sys/block/nullb0/stat``) show what
the page cache asked of the disk.  Reads are made with the file's pages
evicted first, so every pass goes to the disk.  The patterns measured with no
module loaded are "stock": in emergency, after rmmod and after the bus is
killed, the same reads must issue the same requests.
"""

from __future__ import annotations

import mmap
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmlbus.contract import graph as mgraph
from kmlbus.contract import spec as kspec
from kmlbus.vm import project_root
from kmlbus.vm.guest import dmesg_mark, dmesg_problems, insmod, is_loaded, rmmod
from kmlbus.vm.nullblk import DiskStat, NullBlk, drop_file
from kmlbus.wire.netlink import Connection
from modes.machine import shortest_path

pytestmark = pytest.mark.vm

RA_KO = project_root() / "kernel" / "readahead" / "kmlbus_readahead.ko"
KMLBUS_KO = project_root() / "kernel" / "kmlbus.ko"
DEV = "nullb0"
NKEYS = 256
FILE_MB = 16
TOUCHES = 150
SPEC = kspec.load()
MODE = SPEC.enums["mode"]
REASON = SPEC.enums["reason"]
KPROBES_LIST = Path("/sys/kernel/debug/kprobes/list")
PROBED = ("page_cache_sync_ra", "page_cache_async_ra", "filemap_fault", "filemap_read",
          "file_ra_state_init")


@dataclass(frozen=True)
class Pattern:
    """What the disk saw for each access pattern."""

    seq4k: DiskStat
    seq64k: DiskStat
    mmap_random: DiskStat
    pread_random: DiskStat


def read_seq(disk: NullBlk, path: Path, bs: int) -> DiskStat:
    drop_file(path)
    before = disk.stat()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", f"bs={bs}"], check=True,
                   capture_output=True)
    return disk.stat() - before


def touch_mmap_random(disk: NullBlk, path: Path) -> DiskStat:
    drop_file(path)
    rng = random.Random(10)
    before = disk.stat()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        pages = len(m) // 4096
        for _ in range(TOUCHES):
            m[rng.randrange(pages) * 4096]
    return disk.stat() - before


def pread_random(disk: NullBlk, path: Path) -> DiskStat:
    drop_file(path)
    rng = random.Random(11)
    before = disk.stat()
    fd = os.open(path, os.O_RDONLY)
    try:
        pages = os.fstat(fd).st_size // 4096
        for _ in range(TOUCHES):
            os.pread(fd, 4096, rng.randrange(pages) * 4096)
    finally:
        os.close(fd)
    return disk.stat() - before


def pattern(disk: NullBlk, path: Path) -> Pattern:
    return Pattern(read_seq(disk, path, 4096), read_seq(disk, path, 65536),
                   touch_mmap_random(disk, path), pread_random(disk, path))


# A reader holding one file open across the events under test.  Commands on
# stdin: "pass" (one sequential pass with the file's pages evicted first),
# "loop" (passes until "stop"), "stop"; it answers each with "ok".
_READER = r"""
import os, sys, threading
fd = os.open(sys.argv[1], os.O_RDONLY)
def one():
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    off = 0
    while os.pread(fd, 4096, off):
        off += 4096
go = threading.Event()
def loop():
    while go.is_set():
        one()
t = None
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "pass":
        one()
    elif cmd == "loop":
        go.set(); t = threading.Thread(target=loop); t.start()
    elif cmd == "stop":
        go.clear(); t.join()
    print("ok", flush=True)
"""


class Reader:
    """The `_READER` child process on *path*."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _READER, str(path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def cmd(self, what: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok", f"reader failed on {what!r}"

    def measured_pass(self, disk: NullBlk) -> DiskStat:
        before = disk.stat()
        self.cmd("pass")
        return disk.stat() - before

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


# The bus stand-in for test (d): attaches, climbs to recommendation, recommends
# window 0 for every key, prints its port id and sleeps until killed.
_BUS = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from kmlbus.contract import graph as mgraph
from kmlbus.wire.netlink import Connection
from modes.machine import shortest_path
c = Connection()
pid = c.proxy("readahead")["id"]
c.attach(pid)
for m in shortest_path(mgraph.load(), "emergency", "recommendation"):
    c.set_mode(pid, m)
c.recommend(pid, [(k, 0, 60000) for k in range(256)])
print(c.portid, flush=True)
time.sleep(600)
"""


def _unload() -> None:
    for name in ("kmlbus_readahead", "kmlbus_sample", "kmlbus"):
        if is_loaded(name):
            rmmod(name)


@pytest.fixture(scope="module")
def disk() -> Iterator[tuple[NullBlk, Path]]:
    _unload()
    with NullBlk("/run/kmlbus-ra", name=DEV, size_mb=64, completion_nsec=2_000_000) as d:
        yield d, d.make_file("data", FILE_MB)


@pytest.fixture(scope="module")
def stock(disk: tuple[NullBlk, Path]) -> Pattern:
    """The request patterns with no kmlbus module loaded."""
    _unload()
    d, path = disk
    return pattern(d, path)


@pytest.fixture
def readahead(stock: Pattern) -> Iterator[int]:
    """kmlbus.ko + kmlbus_readahead.ko devices=nullb0; yields the dmesg mark before loading."""
    _unload()
    mark = dmesg_mark()
    insmod(KMLBUS_KO)
    try:
        insmod(RA_KO, devices=DEV)
        yield mark
    finally:
        _unload()
    noise = dmesg_problems(mark)
    assert not noise, f"kernel log problems during the test: {noise[:5]}"


def to_mode(c: Connection, pid: int, mode: str) -> None:
    for m in shortest_path(mgraph.load(), MODE.name_of(c.proxy(pid)["mode"]), mode):
        c.set_mode(pid, m)


def recommend_all(c: Connection, pid: int, window: int) -> None:
    c.recommend(pid, [(k, window, 60000) for k in range(NKEYS)])


HOLD = Path("/sys/module/kmlbus_readahead/parameters/hold_ms")
WARMUP = Path("/sys/module/kmlbus_readahead/parameters/warmup_accesses")


def ra_stats() -> dict[str, int]:
    """kmlbus_readahead's read-only ``stats`` parameter: windows, decisions, warmup, decide_ns."""
    text = Path("/sys/module/kmlbus_readahead/parameters/stats").read_text()
    return {k: int(v) for k, v in (part.split("=") for part in text.split())}


def decisions_taken() -> int:
    """Decisions kmlbus_readahead asked of kmlbus (held windows are not decisions)."""
    return ra_stats()["decisions"]


def next_period() -> None:
    """Wait out the hold: a file opened where a closed one's readahead state was
    inherits that stream's held decision until its period ends."""
    time.sleep(int(HOLD.read_text()) / 1000 + 0.1)


def probed_symbols() -> list[str]:
    """Symbols of ours still in the kernel's kprobe list (debugfs)."""
    if not KPROBES_LIST.exists():
        subprocess.run(["mount", "-t", "debugfs", "none", "/sys/kernel/debug"], check=True)
    text = KPROBES_LIST.read_text()
    return [s for s in PROBED if s in text]


# ---- (a) emergency is stock -------------------------------------------------------------

def test_stock_patterns_differ_between_access_kinds(stock: Pattern) -> None:
    # the comparisons below can only fail if the patterns carry readahead's mark
    assert stock.seq4k.sectors == FILE_MB * 2048
    assert stock.seq4k.ios < FILE_MB * 256 // 4, "stock sequential reads should be batched"
    assert stock.mmap_random.sectors > 8 * TOUCHES, "stock mmap read-around reads extra pages"
    assert stock.pread_random.sectors <= 8 * TOUCHES


def test_emergency_issues_the_same_requests_as_no_module(
        readahead: int, disk: tuple[NullBlk, Path], stock: Pattern) -> None:
    d, path = disk
    with Connection() as c:
        p = c.proxy("readahead")
        assert p["mode"] == MODE.value("emergency")
        taken = decisions_taken()
        got = pattern(d, path)
        counters = c.proxy(p["id"])["counters"]
        taken = decisions_taken() - taken
    assert got == stock
    assert taken == counters["decisions-default"] > 0
    # the proxy was on the path: it decided (by default) at the readahead points
    assert counters["decisions-default"] > 0 and counters["decisions-model"] == 0
    assert [f["name"] for f in p["feature"]][:2] == ["seq", "req_pages"]
    assert p["recommendation"] == {"name": "window_pages", "scale": 1, "min": 0, "max": 2048}


def test_files_on_other_devices_are_not_touched(readahead: int) -> None:
    f = Path("/dev/shm/kmlbus-ra-other")
    f.write_bytes(b"x" * (1 << 20))
    try:
        with Connection() as c:
            before = c.proxy("readahead")["counters"]["samples"]
            with open(f, "rb") as fh:
                while fh.read(65536):
                    pass
            after = c.proxy("readahead")["counters"]["samples"]
    finally:
        f.unlink()
    assert after == before


def test_a_stream_keeps_one_decision_per_hold_period(
        readahead: int, disk: tuple[NullBlk, Path], stock: Pattern) -> None:
    d, path = disk
    assert HOLD.read_text().strip() == "1000"
    with pytest.raises(OSError):
        HOLD.write_text("60001")
    assert HOLD.read_text().strip() == "1000", "a rejected hold_ms changed the value"
    try:
        s0, t0 = ra_stats(), time.monotonic()
        held = read_seq(d, path, 4096)
        elapsed, s1 = time.monotonic() - t0, ra_stats()
        HOLD.write_text("0")
        next_period()
        s2 = ra_stats()
        each = read_seq(d, path, 4096)
        s3 = ra_stats()
    finally:
        HOLD.write_text("1000")
    windows, decisions = s1["windows"] - s0["windows"], s1["decisions"] - s0["decisions"]
    warm = s1["warmup"] - s0["warmup"]
    # dd's stream is new: its first accesses (warmup_accesses) decide unheld; then
    # one decision per period begun, the other decision points hold it
    assert 1 <= warm <= 8
    assert 1 <= decisions - warm <= elapsed / 1.0 + 1 < windows - warm
    # hold_ms=0: every decision point is a decision
    assert s3["decisions"] - s2["decisions"] == s3["windows"] - s2["windows"] > decisions
    # in emergency the held arm is the default: stock requests either way
    assert held == each == stock.seq4k


def fresh_streams(path: Path, streams: int, reads: int, seed: int, *, mmap_: bool = False) -> None:
    """*streams* new streams one after the other, each *reads* accesses long: open *path*,
    read single pages 64 pages apart (none the first page; pread, or with *mmap_* a touch
    of the mapped page) with the file's pages evicted first, close.  Each access misses
    the cache and is not sequential, so it reaches exactly one decision point
    (page_cache_sync_ra, or filemap_fault on a missing page)."""
    rng = random.Random(seed)
    for _ in range(streams):
        drop_file(path)
        pages = rng.sample(range(64, FILE_MB * 256, 64), reads)
        with open(path, "rb") as f:
            if mmap_:
                with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                    for page in pages:
                        m[page * 4096]
            else:
                for page in pages:
                    assert len(os.pread(f.fileno(), 4096, page * 4096)) == 4096


def test_a_new_streams_first_accesses_are_decided_unheld_and_not_reported(
        readahead: int, disk: tuple[NullBlk, Path]) -> None:
    _, path = disk
    assert WARMUP.read_text().strip() == "8"
    for bad in ("1025", "-1"):
        with pytest.raises(OSError):
            WARMUP.write_text(bad)
    assert WARMUP.read_text().strip() == "8", "a rejected warmup_accesses changed the value"
    streams, short, long = 4, 4, 8 + 4
    got: dict[str, dict[str, int]] = {}
    # a telemetry listener: decisions are recorded, so ended ones are reported as feedback
    with Connection(groups=("telemetry",)) as c:
        pid = int(c.proxy("readahead")["id"])

        def measure(name: str, warmup: int, n: int, reads: int, mmap_: bool = False) -> None:
            WARMUP.write_text(str(warmup))
            s0, f0 = ra_stats(), c.proxy(pid)["counters"]["feedback"]
            fresh_streams(path, n, reads, seed=len(got), mmap_=mmap_)
            s1, f1 = ra_stats(), c.proxy(pid)["counters"]["feedback"]
            got[name] = {k: s1[k] - s0[k] for k in ("windows", "decisions", "warmup")}
            got[name]["feedback"] = f1 - f0

        try:
            # hold_ms=0: every decision point decides, and each would report the one before
            HOLD.write_text("0")
            measure("short", 8, streams, short)
            measure("short mmap", 8, streams, short, mmap_=True)
            measure("long", 8, 1, long)
            measure("no warm-up", 0, streams, short)
        finally:
            HOLD.write_text("1000")
            WARMUP.write_text("8")
    # short fresh streams (the file opened anew each time, so also where a closed
    # one's readahead state was): every decision is warm-up, none is reported
    assert got["short"] == {"windows": streams * short, "decisions": streams * short,
                            "warmup": streams * short, "feedback": 0}, got
    # the same for streams of mmap faults (an open begins a stream, not only a first read())
    assert got["short mmap"] == got["short"], got
    # warm-up ends after 8 accesses; the first decision after it is not reported either
    assert got["long"] == {"windows": long, "decisions": long, "warmup": 8,
                           "feedback": long - 8 - 1}, got
    # warmup_accesses=0: no warm-up, each decision after a stream's first reports the one before
    assert got["no warm-up"] == {"windows": streams * short, "decisions": streams * short,
                                 "warmup": 0, "feedback": streams * (short - 1)}, got


# ---- (b) recommendations change real reads ----------------------------------------------

def test_recommended_windows_change_request_sizes_and_pages_read(
        readahead: int, disk: tuple[NullBlk, Path], stock: Pattern) -> None:
    d, path = disk
    with Connection() as c:
        pid = int(c.proxy("readahead")["id"])
        c.attach(pid)
        to_mode(c, pid, "recommendation")

        recommend_all(c, pid, 4)
        small = read_seq(d, path, 4096)
        recommend_all(c, pid, 0)
        next_period()
        none_mmap = touch_mmap_random(d, path)
        recommend_all(c, pid, 2048)
        next_period()
        big = read_seq(d, path, 4096)
        big_mmap = touch_mmap_random(d, path)
        counters = c.proxy(pid)["counters"]
        c.detach(pid)

    assert small.sectors == big.sectors == stock.seq4k.sectors
    # window 4 pages: no request above 16 KiB, so at least 4x the stock request count
    assert small.ios >= FILE_MB * 256 // 4 > stock.seq4k.ios
    # window 8 MiB: fewer, larger requests than the stock 128 KiB window
    assert big.ios < stock.seq4k.ios
    # window 0: each fault reads its own page only; 8 MiB: read-around pulls the file in
    assert none_mmap.sectors <= 8 * TOUCHES < stock.mmap_random.sectors
    assert big_mmap.sectors > stock.mmap_random.sectors
    assert counters["decisions-model"] > 0 and counters["recs-applied"] > 0


# ---- (c) rmmod under I/O ----------------------------------------------------------------

def test_rmmod_under_io_is_clean_and_leaves_open_files_stock(
        readahead: int, disk: tuple[NullBlk, Path]) -> None:
    d, path = disk
    reader = Reader(path)
    try:
        rmmod("kmlbus_readahead")
        reader.cmd("pass")
        stock_pass = reader.measured_pass(d)  # this open file, no proxy
        insmod(RA_KO, devices=DEV)
        with Connection() as c:
            pid = int(c.proxy("readahead")["id"])
            c.attach(pid)
            to_mode(c, pid, "recommendation")
            recommend_all(c, pid, 4)
            steered = reader.measured_pass(d)
            reader.cmd("loop")
            time.sleep(1.0)
            rmmod("kmlbus_readahead")  # under I/O, with windows in place
            reader.cmd("stop")
        after = reader.measured_pass(d)
    finally:
        reader.close()
    assert steered.ios > stock_pass.ios, "the recommendation did not reach this reader"
    assert after == stock_pass
    assert probed_symbols() == []


# ---- (d) killing the bus under I/O ------------------------------------------------------

def test_killed_bus_under_io_gives_emergency_and_stock_reads(
        readahead: int, disk: tuple[NullBlk, Path], stock: Pattern) -> None:
    d, path = disk
    reader = Reader(path)
    bus = subprocess.Popen([sys.executable, "-c", _BUS, str(project_root())],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert bus.stdout is not None
        portid = int(bus.stdout.readline())
        with Connection() as c:
            p = c.proxy("readahead")
            assert p["bus-portid"] == portid and p["mode"] == MODE.value("recommendation")
            reader.cmd("loop")
            time.sleep(1.0)
            applied = c.proxy(p["id"])["counters"]["decisions-model"]
            bus.send_signal(signal.SIGKILL)
            bus.wait(timeout=30)
            p = c.proxy(p["id"])
            reader.cmd("stop")
            assert p["mode"] == MODE.value("emergency") and p["bus-portid"] == 0
            assert p["reason"] == REASON.value("bus-gone")
            got = read_seq(d, path, 4096)
    finally:
        bus.kill()
        bus.wait(timeout=30)
        reader.close()
    assert applied > 0, "the bus's window 0 was never applied while it lived"
    assert got == stock.seq4k
