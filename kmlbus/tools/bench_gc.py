"""Write amplification of kmlbus-lsd's human-made cleaners and placements under fio workloads.

Needs ``kernel/lsd/kmlbus_lsd.ko``, brd, device-mapper and fio; on a kernel that cannot
load modules it boots the Debian kernel under QEMU and runs itself there (``--here`` inside)::

    python3 -m kmlbus.tools.bench_gc [--reps 3] [--utilization 0.8 0.9] [--workload uniform 80/20 ...]

For every workload, utilization and policy it creates a fresh target on a RAM
disk, fills it once sequentially, then writes ``--multiple`` times its logical
size with fio (random 4 KiB, direct I/O) and reads the target's own counters
before and after: WA = (user + cleaner writes) / user writes over the measured
phase.  Every combination is repeated ``--reps`` times; the table shows the
median and each policy's ratio to greedy measured in the same run.  Numbers are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from kmlbus.vm.guest import KMLBUS_KO, insmod, is_loaded, rmmod
from kmlbus.vm.kernels import project_root

__all__ = ["POLICIES", "WORKLOADS", "Policy", "main", "measure", "moving_hot_set"]

LSD_KO = project_root() / "kernel" / "lsd" / "kmlbus_lsd.ko"
DM_NAME = "lsdbench"
DM_ENV = {**os.environ, "DM_DISABLE_UDEV": "1"}  # no udev in the guest


@dataclass(frozen=True)
class Policy:
    """A human-made cleaner + placement pair, as table options."""

    name: str
    victim: str
    placement: str
    streams: int


POLICIES = [
    Policy("greedy", "greedy", "single", 1),
    Policy("cost-benefit", "cost-benefit", "single", 1),
    Policy("cb+hot-cold", "cost-benefit", "hot-cold", 3),
]

#: workload name -> fio --random_distribution (None: the moving hot set, run in phases)
WORKLOADS: dict[str, str | None] = {
    "uniform": "random",
    "80/20": "zoned:80/20:20/80",
    "90/10": "zoned:90/10:10/90",
    "zipf1.2": "zipf:1.2",
    "moving-hot": None,
}


def moving_hot_set(phase: int, positions: int = 9) -> str:
    """fio distribution with 90% of writes on a 10% hot set at position *phase* (mod *positions*)."""
    k = phase % positions
    zones = []
    if k:
        zones.append(f"{k}/{10 * k}")
    zones.append("90/10")
    if k < 9:
        zones.append(f"{10 - k}/{90 - 10 * k}")
    return "zoned:" + ":".join(zones)


def _run(*cmd: str, timeout: float = 1800) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=DM_ENV, check=False,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                           f"{proc.stdout.strip()[-500:]} {proc.stderr.strip()[-500:]}")
    return proc.stdout


def _status() -> dict[str, int]:
    line = _run("dmsetup", "status", DM_NAME)
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)\b(?![./])", line)}


@contextmanager
def _target(ram_mib: int, utilization: float, seg_blocks: int, policy: Policy) -> Iterator[int]:
    """A fresh kmlbus-lsd on /dev/ram0 (its map starts empty); yields its size in bytes."""
    sectors = int(ram_mib * 2048 * utilization) // 8 * 8
    _run("dmsetup", "create", DM_NAME, "--table",
         f"0 {sectors} kmlbus-lsd /dev/ram0 {seg_blocks} {policy.streams} "
         f"2 victim={policy.victim} placement={policy.placement}")
    try:
        yield sectors * 512
    finally:
        _run("dmsetup", "remove", DM_NAME)


def _fio(size: int, dist: str, io_size: int, seed: int, rw: str = "randwrite") -> None:
    _run("fio", "--name=gc", f"--filename=/dev/mapper/{DM_NAME}", f"--rw={rw}", "--bs=4k",
         "--direct=1", "--ioengine=psync", f"--size={size}", f"--io_size={io_size}",
         f"--random_distribution={dist}", "--norandommap", f"--randseed={seed}",
         "--output-format=terse")


def measure(workload: str, utilization: float, policy: Policy, *, ram_mib: int, seg_blocks: int,
            multiple: float, seed: int, phases: int = 8) -> float:
    """WA of one run: fill, then write *multiple* x the logical size with *workload*."""
    with _target(ram_mib, utilization, seg_blocks, policy) as size:
        _fio(size, "random", size, seed, rw="write")  # sequential fill
        before = _status()
        total = int(size * multiple) // 4096 * 4096
        dist = WORKLOADS[workload]
        if dist is None:
            step = total // phases // 4096 * 4096
            for phase in range(phases):
                _fio(size, moving_hot_set(phase), step, seed + phase)
        else:
            _fio(size, dist, total, seed)
        after = _status()
    user = after["user_writes"] - before["user_writes"]
    gc = after["gc_writes"] - before["gc_writes"]
    return (user + gc) / user if user else float("nan")


@contextmanager
def _modules(ram_mib: int) -> Iterator[None]:
    _run("modprobe", "dm-mod")
    _run("modprobe", "brd", "rd_nr=1", f"rd_size={ram_mib * 1024}")
    mine = not is_loaded("kmlbus")
    if mine:
        insmod(KMLBUS_KO)
    insmod(LSD_KO)
    try:
        yield
    finally:
        rmmod("kmlbus_lsd")
        if mine:
            rmmod("kmlbus")
        subprocess.run(["rmmod", "brd"], check=False)


def _table(results: dict[tuple[str, float, str], list[float]], workloads: Sequence[str],
           utils: Sequence[float]) -> str:
    lines = ["| workload | util | " + " | ".join(p.name for p in POLICIES) + " |",
             "|---|---|" + "---|" * len(POLICIES)]
    for w in workloads:
        for u in utils:
            base = statistics.median(results[(w, u, POLICIES[0].name)])
            cells = []
            for p in POLICIES:
                vals = results[(w, u, p.name)]
                med = statistics.median(vals)
                spread = f"{min(vals):.2f}-{max(vals):.2f}"
                cells.append(f"{med:.2f} ({spread}; {med / base:.2f}x)")
            lines.append(f"| {w} | {u:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the grid and print a table of median WA (range; ratio to greedy)."""
    ap = argparse.ArgumentParser(prog="python -m kmlbus.tools.bench_gc",
                                 description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="repetitions per cell (default 3)")
    ap.add_argument("--utilization", type=float, nargs="+", default=[0.8, 0.9])
    ap.add_argument("--workload", choices=list(WORKLOADS), nargs="+", default=list(WORKLOADS))
    ap.add_argument("--ram-mib", type=int, default=64, help="RAM disk size (default 64)")
    ap.add_argument("--segment-blocks", type=int, default=64, help="4 KiB blocks per segment")
    ap.add_argument("--multiple", type=float, default=3.0,
                    help="logical sizes written in the measured phase (default 3)")
    ap.add_argument("--json", action="store_true", help="print the raw WA values as JSON")
    ap.add_argument("--here", action="store_true", help="run on this kernel, do not boot a VM")
    args = ap.parse_args(argv)

    from kmlbus.tools import demo

    if not (args.here or demo.can_load_modules()):
        from kmlbus import vm

        print("bench_gc: this kernel cannot load modules; booting the Debian kernel under QEMU",
              file=sys.stderr, flush=True)
        rest = list(sys.argv[1:] if argv is None else argv)
        return int(vm.run([sys.executable, "-m", "kmlbus.tools.bench_gc", "--here", *rest],
                          timeout=3600))

    results: dict[tuple[str, float, str], list[float]] = {}
    with _modules(args.ram_mib):
        for rep in range(args.reps):
            for w in args.workload:
                for u in args.utilization:
                    for p in POLICIES:  # interleaved, so drift falls on every policy
                        wa = measure(w, u, p, ram_mib=args.ram_mib, seg_blocks=args.segment_blocks,
                                     multiple=args.multiple, seed=1000 + rep)
                        results.setdefault((w, u, p.name), []).append(wa)
                        print(f"rep {rep} {w} {u:.0%} {p.name}: WA {wa:.3f}", file=sys.stderr,
                              flush=True)
    if args.json:
        print(json.dumps([{"workload": w, "utilization": u, "policy": p, "wa": v}
                          for (w, u, p), v in results.items()]))
    else:
        print(_table(results, args.workload, args.utilization))
    return 0


if __name__ == "__main__":
    sys.exit(main())
