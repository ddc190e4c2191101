"""The log-structured target kmlbus-lsd on a RAM disk, against the real kernel.

fio writes random 4 KiB blocks with crc32c verification until the cleaner has
run (the target's own counters say write amplification > 1), bad table lines
are refused with a message in the kernel log and leave no device behind, the
module cannot go while a target uses it, and ext4 on top survives file churn
with a clean fsck.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kmlbus.contract import graph as mgraph
from kmlbus.contract import spec as kspec
from kmlbus.vm.guest import (
    dmesg_mark,
    dmesg_problems,
    dmesg_since,
    insmod,
    is_loaded,
    rmmod,
)
from kmlbus.vm.kernels import project_root
from kmlbus.wire.netlink import Connection
from modes.machine import shortest_path

pytestmark = pytest.mark.vm

LSD_KO = project_root() / "kernel" / "lsd" / "kmlbus_lsd.ko"
KMLBUS_KO = project_root() / "kernel" / "kmlbus.ko"
RAM_MIB = 64
SEG_BLOCKS = 64                 # 256 KiB segments -> 256 segments on the RAM disk
VICTIM_CANDS = 8                # candidates a cleaning pass scores (LSD_VICTIM_CANDS)
NAME = "lsdtest"
# no udev in the guest: libdevmapper makes the /dev/mapper nodes itself
DM_ENV = {**os.environ, "DM_DISABLE_UDEV": "1"}


def _run(*cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=DM_ENV, check=False,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                             f"{proc.stdout.strip()} {proc.stderr.strip()}")
    return proc


def _sectors(mib: float) -> int:
    """Sectors of *mib* MiB rounded down to whole 4 KiB blocks."""
    return int(mib * 2048) // 8 * 8


@dataclass
class Lsd:
    """A live kmlbus-lsd device."""

    name: str
    sectors: int

    @property
    def path(self) -> str:
        return f"/dev/mapper/{self.name}"

    def status(self) -> dict[str, str]:
        """The target's counters from ``dmsetup status`` as key -> text."""
        line = _run("dmsetup", "status", self.name).stdout.strip()
        return dict(re.findall(r"(\w+)=(\S+)", line))


def _create(name: str, table: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run("dmsetup", "create", name, "--table", table, check=check)


def _remove(name: str) -> None:
    _run("dmsetup", "remove", name)


@pytest.fixture
def lsd_module() -> Iterator[int]:
    """dm-mod, brd (one RAM disk) and kmlbus_lsd.ko; afterwards all gone, dmesg clean."""
    mark = dmesg_mark()
    _run("modprobe", "dm-mod")
    _run("modprobe", "brd", "rd_nr=1", f"rd_size={RAM_MIB * 1024}")
    if not is_loaded("kmlbus"):
        insmod(KMLBUS_KO)
    insmod(LSD_KO)
    try:
        yield mark
    finally:
        for dev in _run("dmsetup", "ls", check=False).stdout.split("\n"):
            if dev.startswith(NAME):
                _run("dmsetup", "remove", dev.split()[0], check=False)
        rmmod("kmlbus_lsd")
        rmmod("kmlbus")
        _run("rmmod", "brd", check=False)
    assert not is_loaded("kmlbus_lsd")
    noise = dmesg_problems(mark)
    assert not noise, f"kernel log problems during the test: {noise[:5]}"


def _make(utilization: float, streams: int = 1, opts: str = "") -> Lsd:
    sectors = _sectors(RAM_MIB * utilization)
    table = f"0 {sectors} kmlbus-lsd /dev/ram0 {SEG_BLOCKS} {streams}{opts}"
    _create(NAME, table)
    return Lsd(NAME, sectors)


def _fio_verify(dev: Lsd, loops: int, extra: tuple[str, ...] = ()) -> str:
    """Random 4 KiB writes over the whole device, *loops* passes, each verified (crc32c)."""
    proc = _run("fio", "--name=lsd", f"--filename={dev.path}", "--rw=randwrite", "--bs=4k",
                "--direct=1", "--ioengine=psync", f"--size={dev.sectors * 512}",
                f"--loops={loops}", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
                "--randrepeat=0", "--output-format=terse", *extra, check=False, timeout=600)
    assert proc.returncode == 0, f"fio failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    assert "verify" not in proc.stderr.lower(), proc.stderr
    return proc.stdout


@pytest.mark.parametrize("victim,placement,streams", [
    ("greedy", "single", 1),
    ("cost-benefit", "hot-cold", 3),
])
def test_random_writes_verify_while_the_cleaner_runs(lsd_module: int, victim: str,
                                                     placement: str, streams: int) -> None:
    dev = _make(0.8, streams, f" 2 victim={victim} placement={placement}")
    before = dev.status()
    assert before["user_writes"] == "0" and before["victim"] == victim
    _fio_verify(dev, loops=3)
    st = dev.status()
    user, gc = int(st["user_writes"]), int(st["gc_writes"])
    assert user >= 3 * dev.sectors // 8, st
    assert int(st["segs_cleaned"]) > 0 and gc > 0, st
    assert float(st["wa"]) > 1.0, st
    assert float(st["wa"]) == pytest.approx((user + gc) / user, abs=1e-3)
    # no bus: both proxies stay in emergency, so the default made every decision
    assert st["victim_proxy"].startswith("lsd") and st["victim_proxy"].endswith(".victim")
    assert int(st["cleaned_default"]) == int(st["segs_cleaned"]), st
    assert int(st["moved_default"]) == gc and st["cleaned_model"] == "0", st
    # the victim arms' own WA: blocks written per block reclaimed by the victims each chose
    seg_total = int(st["cleaned_default"]) * SEG_BLOCKS
    assert float(st["wa_default"]) == pytest.approx(seg_total / (seg_total - gc), abs=1e-3)
    assert float(st["wa_default"]) > 1.0 and st["wa_model"] == "0.000", st
    if streams > 1:
        assert int(st["placed_default"]) > 0 and st["placed_model"] == "0", st
    else:
        assert "place_proxy" not in st, st
    # one decision per cleaning pass (plus the passes of a victim that changed under it,
    # which the default takes unrecorded), and a bounded candidate set published per pass
    with Connection() as c:
        counters = c.proxy(st["victim_proxy"])["counters"]
    cleaned = int(dev.status()["segs_cleaned"])  # read after: the cleaner may be in a pass
    assert 0 < counters["decisions-default"] <= cleaned + 1 and counters["decisions-model"] == 0
    assert counters["samples"] <= VICTIM_CANDS * counters["decisions-default"], counters
    _remove(NAME)
    assert _run("dmsetup", "info", NAME, check=False).returncode != 0


def test_unwritten_blocks_read_as_zeros_and_discard_forgets(lsd_module: int) -> None:
    dev = _make(0.5)
    with open(dev.path, "rb") as f:
        assert f.read(1 << 20) == bytes(1 << 20)
    pattern = bytes(range(256)) * 16 * 4
    fd = os.open(dev.path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(pattern))
        buf.write(pattern)
        os.pwrite(fd, buf, 8192)
    finally:
        os.close(fd)
    _run("blockdev", "--flushbufs", dev.path)
    with open(dev.path, "rb") as f:
        f.seek(8192)
        assert f.read(len(pattern)) == pattern
    assert dev.status()["user_writes"] == str(len(pattern) // 4096)
    _run("blkdiscard", "-o", "8192", "-l", str(len(pattern)), dev.path)
    _run("blockdev", "--flushbufs", dev.path)
    assert dev.status()["discarded"] == str(len(pattern) // 4096)
    with open(dev.path, "rb") as f:
        f.seek(8192)
        assert f.read(len(pattern)) == bytes(len(pattern))
    _remove(NAME)


BAD_TABLES = [
    ("0 8192 kmlbus-lsd /dev/ram0 64", "Expected <dev> <segment_blocks> <streams>"),
    ("0 8192 kmlbus-lsd /dev/nonexistent 64 1", "cannot open backing device"),
    ("0 8192 kmlbus-lsd /dev/ram0 3 1", "Invalid segment size"),
    ("0 8192 kmlbus-lsd /dev/ram0 64 0", "Invalid number of streams"),
    ("0 8192 kmlbus-lsd /dev/ram0 64 9", "Invalid number of streams"),
    ("0 8193 kmlbus-lsd /dev/ram0 64 1", "multiples of 8 sectors"),
    (f"0 {RAM_MIB * 2048} kmlbus-lsd /dev/ram0 64 1", "no over-provisioning left"),
    ("0 8192 kmlbus-lsd /dev/ram0 64 1 1 victim=oracle", "unknown victim policy 'oracle'"),
    ("0 8192 kmlbus-lsd /dev/ram0 64 1 1 placement=random", "unknown placement policy"),
    ("0 8192 kmlbus-lsd /dev/ram0 64 1 1 colour=blue", "unknown option 'colour=blue'"),
    ("0 8192 kmlbus-lsd /dev/ram0 64 1 2 victim=greedy", "Invalid number of optional arguments"),
    ("0 8192 kmlbus-lsd /dev/ram0 64 1 1 victim=greedy extra", "Too many arguments"),
]


def test_bad_table_lines_are_refused_with_a_message(lsd_module: int) -> None:
    problems = []
    for table, message in BAD_TABLES:
        mark = dmesg_mark()
        proc = _create(NAME, table, check=False)
        log = "\n".join(dmesg_since(mark))
        if proc.returncode == 0:
            problems.append(f"accepted: {table}")
            _remove(NAME)
        elif message.lower() not in log.lower():
            problems.append(f"{table}: no {message!r} in the kernel log: {log!r}")
        if _run("dmsetup", "info", NAME, check=False).returncode == 0:
            problems.append(f"{table}: device left behind")
            _run("dmsetup", "remove", NAME, check=False)
    assert not problems, "\n".join(problems)
    with Connection() as c:
        assert not _lsd_proxies(c), "a refused table left kmlbus proxies registered"


def _lsd_proxies(c: Connection) -> list[str]:
    return [str(p["name"]) for p in c.proxies() if str(p["name"]).startswith("lsd")]


def test_module_stays_while_a_target_exists(lsd_module: int) -> None:
    _make(0.5)
    assert _run("rmmod", "kmlbus_lsd", check=False).returncode != 0
    assert is_loaded("kmlbus_lsd")
    with Connection() as c:
        assert len(_lsd_proxies(c)) == 1  # one stream: the victim proxy only
    _remove(NAME)
    with Connection() as c:
        assert not _lsd_proxies(c), "dmsetup remove left kmlbus proxies registered"
    rmmod("kmlbus_lsd")
    insmod(LSD_KO)  # the fixture unloads it again


def test_ext4_on_top_survives_churn_and_fscks_clean(lsd_module: int, tmp_path: Path) -> None:
    dev = _make(0.8)
    _run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev.path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _run("mount", "-o", "discard", dev.path, str(mnt))
    cleaned_at = None
    try:
        # create, overwrite and delete files until the target has cleaned, then two rounds more
        for rnd in range(40):
            for i in range(12):
                (mnt / f"f{i}").write_bytes(os.urandom(1 << 20))
            for i in range(0, 12, 2 + rnd % 2):
                (mnt / f"f{i}").unlink()
            os.sync()
            if cleaned_at is None and int(dev.status()["segs_cleaned"]) > 0:
                cleaned_at = rnd
            if cleaned_at is not None and rnd >= cleaned_at + 2:
                break
        kept = {p.name: p.read_bytes() for p in mnt.iterdir() if p.is_file()}
    finally:
        _run("umount", str(mnt))
    assert cleaned_at is not None, dev.status()
    _run("fsck.ext4", "-f", "-n", dev.path)
    _run("mount", "-o", "ro", dev.path, str(mnt))
    try:
        for name, data in kept.items():
            assert (mnt / name).read_bytes() == data
    finally:
        _run("umount", str(mnt))
    _remove(NAME)


def _to_mode(c: Connection, pid: int, mode: str) -> None:
    names = kspec.load().enums["mode"]
    for m in shortest_path(mgraph.load(), names.name_of(c.proxy(pid)["mode"]), mode):
        c.set_mode(pid, m)


def test_fresh_model_decisions_choose_victims_and_streams_and_data_stays_intact(
        lsd_module: int) -> None:
    dev = _make(0.8, 2)
    st = dev.status()
    nr_segs = int(st["free_segs"].split("/")[1])
    with Connection() as c:
        vid = int(c.proxy(st["victim_proxy"])["id"])
        pid = int(c.proxy(st["place_proxy"])["id"])
        for proxy in (vid, pid):
            c.attach(proxy)
            _to_mode(c, proxy, "recommendation")
        fio = subprocess.Popen(
            ["fio", "--name=lsd", f"--filename={dev.path}", "--rw=randwrite", "--bs=4k",
             "--direct=1", "--ioengine=psync", f"--size={dev.sectors * 512}", "--loops=3",
             "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--randrepeat=0",
             "--output-format=terse"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # a model that does what greedy would not: the highest-numbered candidate
        # wins, and every block goes to the second stream; resent well within the ttl
        while True:
            c.recommend(vid, [(k, k, 20_000) for k in range(nr_segs)])
            c.recommend(pid, [(k, 1, 20_000) for k in range(1024)])
            try:
                out, err = fio.communicate(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        st = dev.status()
        counters = c.proxy(vid)["counters"]
    assert fio.returncode == 0, f"fio failed: {out[-2000:]} {err[-2000:]}"
    assert int(st["cleaned_model"]) > 0 and int(st["placed_model"]) > 0, st
    assert int(st["cleaned_model"]) + int(st["cleaned_default"]) == int(st["segs_cleaned"]), st
    assert float(st["wa"]) > 1.0 and float(st["wa_model"]) > 1.0, st
    # in recommendation every candidate of a pass is decided by the model, at most 8 a pass
    assert counters["decisions-model"] <= VICTIM_CANDS * int(st["segs_cleaned"]), counters
    assert counters["decisions-model"] > int(st["cleaned_model"]), counters
    _remove(NAME)


_FROZEN_BUS = """
import os, signal, sys
from kmlbus.contract import graph, spec
from kmlbus.wire.netlink import Connection
from modes.machine import shortest_path
names = spec.load().enums["mode"]
c = Connection(groups=("telemetry",))
for name, value, keys in ((sys.argv[1], 1, 1024), (sys.argv[2], 0, int(sys.argv[3]))):
    pid = int(c.proxy(name)["id"])
    c.attach(pid)
    for m in shortest_path(graph.load(), names.name_of(c.proxy(pid)["mode"]), "recommendation"):
        c.set_mode(pid, m)
    c.recommend(pid, [(k, value if value else k, 60_000) for k in range(keys)])
print("ready", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_io_goes_on_while_the_bus_is_frozen_then_killed(lsd_module: int) -> None:
    dev = _make(0.8, 2)
    st = dev.status()
    nr_segs = st["free_segs"].split("/")[1]
    bus = subprocess.Popen([sys.executable, "-c", _FROZEN_BUS, st["place_proxy"],
                            st["victim_proxy"], nr_segs], stdout=subprocess.PIPE, text=True)
    try:
        assert bus.stdout is not None and bus.stdout.readline().strip() == "ready"
        _, status = os.waitpid(bus.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), "the bus did not stop itself"
        # the bus holds both proxies in recommendation and reads nothing: I/O must not care
        _fio_verify(dev, loops=2)
        frozen = dev.status()
        assert float(frozen["wa"]) > 1.0 and int(frozen["cleaned_model"]) > 0, frozen
    finally:
        bus.kill()
        bus.wait()
    with Connection() as c:
        for name in (st["victim_proxy"], st["place_proxy"]):
            assert kspec.load().enums["mode"].name_of(c.proxy(name)["mode"]) == "emergency"
    _fio_verify(dev, loops=1)
    after = dev.status()
    assert int(after["cleaned_default"]) > int(frozen["cleaned_default"]), after
    _remove(NAME)


def test_the_bus_learns_a_placement_from_death_times_and_the_data_stays_intact(
        lsd_module: int, tmp_path: Path) -> None:
    """``kmlbus run`` with ``learner = "choice"`` on the placement proxy and no model: it explores
    in learning, fits a tree from the kernel's death-time feedback, installs it, and the
    model's placements reach the target, while fio verifies every pass it writes."""
    from .busproc import START_S, wait_for

    dev = _make(0.8, 3, " 2 victim=cost-benefit placement=hot-cold")
    place, victim = dev.status()["place_proxy"], dev.status()["victim_proxy"]
    work = tmp_path / "bus"
    work.mkdir()
    (work / "bus.toml").write_text(
        "[bus]\nttl_ms = 2000\nlatency_budget_ms = 1000\n"
        f'[proxy."{place}"]\nlearn = true\nlearner = "choice"\nexplore = 200\nlearn_every_s = 3\n'
        'efficiency = "class-match"\n'
        f'[proxy."{victim}"]\nefficiency = "reclaimed"\n')  # watched only: no model, no learning
    env = dict(os.environ, KMLBUS_STATE=str(work / "state.json"))
    hot = ("--random_distribution=zoned:90/10:10/90",)  # a hot tenth: its blocks die young
    with open(work / "bus.log", "wb") as log:
        bus = subprocess.Popen([sys.executable, "-m", "kmlbus", "run", "--config",
                                str(work / "bus.toml")], stdout=log, stderr=subprocess.STDOUT,
                               env=env)
    try:
        def bus_view() -> dict[str, Any]:
            assert bus.poll() is None, (work / "bus.log").read_text(errors="replace")[-3000:]
            try:
                state = json.loads((work / "state.json").read_text())
            except (OSError, ValueError):
                return {}
            return dict(state.get("proxies", {}).get(place) or {})

        wait_for("the bus to take the placement proxy into learning",
                 lambda: bus_view().get("mode") == "learning", START_S)
        deadline = time.monotonic() + 900
        while not (bus_view().get("learning") or {}).get("fits"):
            assert time.monotonic() < deadline, bus_view()
            _fio_verify(dev, loops=1, extra=hot)
        view = bus_view()
        assert str(view["model"]).startswith("learned("), view
        pre = dev.status()
        _fio_verify(dev, loops=1, extra=hot)  # a whole verified pass with the learned model served
        st = dev.status()
        assert int(st["placed_model"]) > int(pre["placed_model"]), st
        assert float(st["wa"]) > 1.0, st
        _per_arm_readings_agree_with_the_target(work, victim, pre, st)
        _placement_reads_as_class_error(work, place, lambda: _fio_verify(dev, loops=1, extra=hot))
    finally:
        bus.terminate()
        bus.wait(timeout=120)
    _remove(NAME)


def _status(work: Path, *args: str) -> str:
    """The output of ``kmlbus status ARGS`` against the test's bus (its state file)."""
    env = dict(os.environ, KMLBUS_STATE=str(work / "state.json"))
    return subprocess.run([sys.executable, "-m", "kmlbus", "status", *args], env=env,
                          capture_output=True, text=True, check=True, timeout=120).stdout


def _per_arm_readings_agree_with_the_target(work: Path, victim: str,
                                            pre: dict[str, str], st: dict[str, str]) -> None:
    """``kmlbus status`` reads the victim proxy's arms as cleaning WA ("reclaimed"), in the
    table and in ``--json``.

    The bus's WA is 1 / the mean freed share over its evidence window (the last 400
    cleanings the bus heard of, about the last fio pass); the target's ``wa_default`` is
    the same ratio from its counters.  Over equal segments the two formulas agree, so the
    check compares the bus's reading with the target's counters over the last pass (within
    10%: the window and the pass need not cover exactly the same cleanings); a wrong
    conversion (the raw mean, or its inverse off by the scale) would be off by 2x or more.
    No model decided any victim, so both sides have nothing for the model arm.
    """
    deadline = time.monotonic() + 60
    while True:  # the daemon writes its state file every second or so
        views = {v["name"]: v for v in json.loads(_status(work, "--json"))}
        per = ((views[victim].get("bus") or {}).get("evidence") or {}).get("per_arm") or {}
        if per.get("default_count", 0) >= 100 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert per.get("efficiency") == "reclaimed" and per.get("label") == "WA", views[victim]
    cleaned = (int(st["cleaned_default"]) - int(pre["cleaned_default"])) * SEG_BLOCKS
    moved = int(st["moved_default"]) - int(pre["moved_default"])
    assert cleaned > moved > 0, (pre, st)
    assert per["default"] == pytest.approx(cleaned / (cleaned - moved), rel=0.10), (per, pre, st)
    assert 1.0 < per["default"] < 1.5 * float(st["wa_default"]), (per, st)
    assert per["model"] is None and st["wa_model"] == "0.000", (per, st)
    table = _status(work)
    shown = re.search(rf"  {re.escape(victim)}: WA per arm: default ([0-9.]+), model -\n", table)
    assert shown, table  # (read anew: the state file may have moved on since the --json)
    assert float(shown.group(1)) == pytest.approx(cleaned / (cleaned - moved), rel=0.10), table


def _placement_reads_as_class_error(work: Path, place: str, more_io: Callable[[], object]) -> None:
    """``kmlbus status`` reads the placement proxy's arms as class error ("class-match").

    Evidence windows start empty at every mode change, and placement feedback comes only when
    written blocks die: if the learned model has just climbed, the window can be empty after
    the pass, so another verified pass (*more_io*) feeds it, up to three times.
    """
    for _ in range(4):
        views = {v["name"]: v for v in json.loads(_status(work, "--json"))}
        pl = views[place]["bus"]["evidence"]["per_arm"]
        assert pl["efficiency"] == "class-match" and pl["label"] == "class error", pl
        # The learned model may decide every placement (recommendation): then only its arm
        # has evidence.  Whichever arms have it are read.
        heard = {arm: pl[arm] for arm in ("default", "model") if pl.get(f"{arm}_count", 0) > 0}
        if heard:
            break
        more_io()
    assert heard, pl
    assert all(0.0 <= v <= 2.0 for v in heard.values()), pl  # three streams: at most two classes off
    assert f"  {place}: class error per arm: " in _status(work), place
