"""Write amplification of kmlbus-lsd's cleaners and placements, human-made and learned, under fio.

Needs ``kernel/lsd/kmlbus_lsd.ko``, brd, device-mapper and fio; on a kernel that cannot
load modules it boots the Debian kernel under QEMU and runs itself there (``--here`` inside)::

    python3 -m kmlbus.tools.bench_gc [--reps 3] [--utilization 0.8 0.9] [--workload uniform 80/20 ...]
        [--policy greedy learned ...] [--png vm-out/gc.png] [--rows vm-out/gc.jsonl [--first-rep 1]]
    python3 -m kmlbus.tools.bench_gc --from-rows vm-out/gc-*.jsonl [--png vm-out/gc.png]

``--rows`` appends every run as one JSON line as soon as it is measured, so
repetitions can be split over several shorter invocations (``--first-rep``
numbers them on, and seeds follow the repetition's number) and merged into one
table with ``--from-rows`` (no measurement, no VM).

For every workload, utilization and policy it creates a fresh target on a RAM
disk, fills it once sequentially, then writes ``--multiple`` times its logical
size with fio (random 4 KiB, direct I/O) and reads the target's own counters
before and after: WA = (user + cleaner writes) / user writes over the measured
phase.  Every combination is repeated ``--reps`` times; the table shows the
median and each policy's ratio to greedy measured in the same run.  Numbers are
printed, never asserted.

The ``learned`` policy is cost-benefit + hot-cold streams (the best human-made
pair) with a bus: a fresh ``kmlbus run`` starts after the fill with its
placement proxy set to learn from scratch (``learner = "choice"``,
:mod:`kmlbus.bus.placefit`), so the measured phase includes its exploration in
learning and whatever climb the mode machine allows on evidence.  The PNG
shows cumulative WA against logical sizes written for the first repetition of
every policy, with the learned policy's placement mode shaded behind it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kmlbus.vm.guest import KMLBUS_KO, insmod, is_loaded, rmmod
from kmlbus.vm.kernels import project_root

__all__ = ["POLICIES", "WORKLOADS", "Policy", "Run", "load_rows", "main", "measure",
           "moving_hot_set", "row"]

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
    #: a bus learns the placement from scratch during the measured phase
    learned: bool = False


POLICIES = [
    Policy("greedy", "greedy", "single", 1),
    Policy("cost-benefit", "cost-benefit", "single", 1),
    Policy("cb+hot-cold", "cost-benefit", "hot-cold", 3),
    Policy("learned", "cost-benefit", "hot-cold", 3, learned=True),
]


@dataclass
class Run:
    """One measured phase: its WA and how WA and the placement mode went along the way."""

    wa: float
    seconds: float
    #: logical sizes written so far, cumulative WA then, the placement proxy's mode then
    written: list[float] = field(default_factory=list)
    wa_so_far: list[float] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)
    #: the placement proxy's mode changes: (logical sizes written, mode)
    transitions: list[tuple[float, str]] = field(default_factory=list)
    #: logical sizes written when the bus had installed each new learned model (refits)
    fits: list[float] = field(default_factory=list)


def row(workload: str, utilization: float, policy: str, rep: int, run: Run) -> dict[str, object]:
    """One measured run as a JSON-ready row (``--rows``), everything the table and PNG need."""
    return {"workload": workload, "utilization": utilization, "policy": policy, "rep": rep,
            "wa": run.wa, "seconds": run.seconds, "written": run.written,
            "wa_so_far": run.wa_so_far, "modes": run.modes,
            "transitions": [list(t) for t in run.transitions], "fits": run.fits}


def load_rows(paths: Sequence[Path]) -> dict[tuple[str, float, str], list[Run]]:
    """Runs saved by ``--rows`` in *paths*, by (workload, utilization, policy), in repetition
    order.  Raises ValueError naming the file and line of a row that is not one."""
    keyed: dict[tuple[str, float, str], list[tuple[int, Run]]] = {}
    for path in paths:
        for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not text.strip():
                continue
            try:
                r = json.loads(text)
                run = Run(float(r["wa"]), float(r["seconds"]),
                          [float(x) for x in r.get("written", [])],
                          [float(x) for x in r.get("wa_so_far", [])],
                          [str(m) for m in r.get("modes", [])],
                          [(float(x), str(m)) for x, m in r.get("transitions", [])],
                          [float(x) for x in r.get("fits", [])])
                key = (str(r["workload"]), float(r["utilization"]), str(r["policy"]))
                keyed.setdefault(key, []).append((int(r.get("rep", 0)), run))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a bench_gc row: {type(e).__name__}: {e}") from None
    return {k: [run for _, run in sorted(v, key=lambda x: x[0])] for k, v in keyed.items()}


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


def _fio_cmd(size: int, dist: str, io_size: int, seed: int, iops: int = 0) -> list[str]:
    return ["fio", "--name=gc", f"--filename=/dev/mapper/{DM_NAME}", "--rw=randwrite", "--bs=4k",
            "--direct=1", "--ioengine=psync", f"--size={size}", f"--io_size={io_size}",
            f"--random_distribution={dist}", "--norandommap", f"--randseed={seed}",
            "--output-format=terse", *([f"--rate_iops={iops}"] if iops else [])]


def _place_mode(proxy: str | None) -> str:
    """The placement proxy's mode as the kernel has it ('' without one)."""
    if proxy is None:
        return ""
    from kmlbus.wire import codec, netlink

    with netlink.Connection() as c:
        return codec.enum_name("mode", int(c.proxy(proxy)["mode"]))


class _Bus:
    """``python -m kmlbus run`` learning one placement proxy from scratch, in a temporary dir."""

    def __init__(self, proxy: str, log_to: Path | None) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="kmlbus-gc-")
        work = Path(self.dir.name)
        (work / "bus.toml").write_text(
            "[bus]\nttl_ms = 2000\nlatency_budget_ms = 1000\n"
            f'[proxy."{proxy}"]\nlearn = true\nlearner = "choice"\nlearn_every_s = 5\n',
            encoding="utf-8")
        self.log = log_to if log_to is not None else work / "bus.log"
        self.log_from = self.log.stat().st_size if self.log.exists() else 0  # this bus's part
        self.state = work / "state.json"
        env = dict(os.environ, KMLBUS_STATE=str(self.state))
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kmlbus", "run", "--config", str(work / "bus.toml")],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        self.proxy = proxy

    def wait_learning(self, timeout: float = 300) -> None:
        """Until the bus has taken the proxy out of emergency (it explores from then on) and can
        fit (its learner's imports, a minute or more in an emulated guest, are done)."""
        from kmlbus.bus.placefit import READY

        end = time.monotonic() + timeout
        while (_place_mode(self.proxy) == "emergency"
               or READY not in self._output()):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"the bus did not take {self.proxy} into learning: "
                                   f"{self._output()[-2000:]}")
            time.sleep(0.5)

    def _output(self) -> str:
        with open(self.log, "rb") as f:
            f.seek(self.log_from)
            return f.read().decode(errors="replace")

    def fits(self) -> int:
        """Learned models the bus has installed for the proxy so far (its state file)."""
        try:
            view = json.loads(self.state.read_text())["proxies"][self.proxy]
            return int((view.get("learning") or {}).get("fits", 0))
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.dir.cleanup()


def measure(workload: str, utilization: float, policy: Policy, *, ram_mib: int, seg_blocks: int,
            multiple: float, seed: int, phases: int = 8, poll_s: float = 1.0,
            bus_log: Path | None = None, learned_iops: int = 0) -> Run:
    """One run: fill, then write *multiple* x the logical size with *workload*, sampled as it goes.

    *learned_iops* caps the write rate of a learned run (0: none): the target's
    WA depends on the order of writes, not their pace, but the bus needs wall time
    to explore, fit and climb, which an emulated guest makes slow."""
    with _target(ram_mib, utilization, seg_blocks, policy) as size:
        _fio(size, "random", size, seed, rw="write")  # sequential fill
        place = re.search(r"place_proxy=(\S+)", _run("dmsetup", "status", DM_NAME))
        proxy = place.group(1) if place and policy.learned else None
        bus = _Bus(proxy, bus_log) if proxy is not None else None
        try:
            if bus is not None:
                bus.wait_learning()
            before = _status()
            nblocks = size // 4096
            total = int(size * multiple) // 4096 * 4096
            dist = WORKLOADS[workload]
            iops = learned_iops if bus is not None else 0
            if dist is None:
                step = total // phases // 4096 * 4096
                jobs = [_fio_cmd(size, moving_hot_set(ph), step, seed + ph, iops)
                        for ph in range(phases)]
            else:
                jobs = [_fio_cmd(size, dist, total, seed, iops)]
            run = Run(float("nan"), 0.0)
            start = time.monotonic()
            for cmd in jobs:
                fio = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       text=True, env=DM_ENV)
                while True:
                    try:
                        _, err = fio.communicate(timeout=poll_s)
                        break
                    except subprocess.TimeoutExpired:
                        _sample(run, before, nblocks, proxy, bus)
                if fio.returncode != 0:
                    raise RuntimeError(f"fio failed ({fio.returncode}): {err[-500:]}")
            after = _sample(run, before, nblocks, proxy, bus)
            run.seconds = time.monotonic() - start
        finally:
            if bus is not None:
                bus.stop()
    user = after["user_writes"] - before["user_writes"]
    gc = after["gc_writes"] - before["gc_writes"]
    run.wa = (user + gc) / user if user else float("nan")
    return run


def _sample(run: Run, before: dict[str, int], nblocks: int, proxy: str | None,
            bus: _Bus | None) -> dict[str, int]:
    """Append the counters' state now to *run*; returns the counters."""
    now = _status()
    user = now["user_writes"] - before["user_writes"]
    gc = now["gc_writes"] - before["gc_writes"]
    mode = _place_mode(proxy)
    written = user / nblocks
    if user:
        run.written.append(written)
        run.wa_so_far.append((user + gc) / user)
        run.modes.append(mode)
    if mode and (not run.transitions or run.transitions[-1][1] != mode):
        run.transitions.append((written, mode))
    if bus is not None:
        run.fits.extend([written] * (bus.fits() - len(run.fits)))
    return now


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


def _table(results: dict[tuple[str, float, str], list[Run]], workloads: Sequence[str],
           utils: Sequence[float], policies: Sequence[Policy]) -> str:
    lines = ["| workload | util | " + " | ".join(p.name for p in policies) + " |",
             "|---|---|" + "---|" * len(policies)]
    for w in workloads:
        for u in utils:
            base = statistics.median(r.wa for r in results[(w, u, policies[0].name)])
            cells = []
            for p in policies:
                vals = [r.wa for r in results[(w, u, p.name)] if r.wa == r.wa]  # NaN: failed
                if not vals:
                    cells.append("failed")
                    continue
                med = statistics.median(vals)
                spread = f"{min(vals):.2f}-{max(vals):.2f}"
                cells.append(f"{med:.2f} ({spread}; {med / base:.2f}x)")
            lines.append(f"| {w} | {u:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _timelines(results: dict[tuple[str, float, str], list[Run]]) -> str:
    """The learned runs' placement modes, as 'mode@logical sizes written' per run."""
    lines = []
    for (w, u, p), runs in results.items():
        for i, r in enumerate(runs):
            if r.transitions:
                steps = " -> ".join(f"{m}@{x:.2f}" for x, m in r.transitions)
                fits = ", ".join(f"{x:.2f}" for x in r.fits) or "none"
                lines.append(f"{p} {w} {u:.0%} rep {i}: {steps}; learned models installed at "
                             f"{fits} (WA {r.wa:.3f}, {r.seconds:.0f} s)")
    return "\n".join(lines)


def _mode_spans(run: Run) -> list[tuple[float, float, str]]:
    """Contiguous stretches of one mode along the written axis."""
    spans: list[tuple[float, float, str]] = []
    for x, m in zip(run.written, run.modes):
        if not m:
            continue
        if spans and spans[-1][2] == m:
            spans[-1] = (spans[-1][0], x, m)
        else:
            spans.append((spans[-1][1] if spans else 0.0, x, m))
    return spans


def draw(results: dict[tuple[str, float, str], list[Run]], workloads: Sequence[str],
         utils: Sequence[float], policies: Sequence[Policy], out: Path) -> None:
    """One panel per (workload, utilization): cumulative WA of every policy's first repetition
    against logical sizes written, the learned policy's placement mode shaded behind and its
    refits (learned models installed) as dotted lines."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from kmlbus.tools.plot import MODE_COLOURS, shade_modes

    cells = [(w, u) for w in workloads for u in utils]
    fig = Figure(figsize=(7.5, 2.6 * len(cells)), layout="constrained")
    axes = fig.subplots(len(cells), 1, squeeze=False)[:, 0]
    for ax, (w, u) in zip(axes, cells):
        for p in policies:
            run = results[(w, u, p.name)][0]
            if p.learned:
                shade_modes(ax, _mode_spans(run))
                for x in run.fits:
                    ax.axvline(x, color="#555555", linewidth=0.6, linestyle=":")
            ax.plot(run.written, run.wa_so_far, label=f"{p.name} ({run.wa:.2f})",
                    linewidth=2.0 if p.learned else 1.2)
        ax.set_title(f"{w} at {u:.0%} utilization", fontsize=10)
        ax.set_ylabel("WA so far")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        modes = [Patch(color=c, alpha=0.3, label=m) for m, c in MODE_COLOURS.items()]
        ax.legend(handles + modes, labels + list(MODE_COLOURS), fontsize=7, ncol=2, loc="best")
    axes[-1].set_xlabel("logical sizes written (measured phase)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the grid and print a table of median WA (range; ratio to the first policy)."""
    names = [p.name for p in POLICIES]
    ap = argparse.ArgumentParser(prog="python -m kmlbus.tools.bench_gc",
                                 description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="repetitions per cell (default 3)")
    ap.add_argument("--utilization", type=float, nargs="+", default=[0.8, 0.9])
    ap.add_argument("--workload", choices=list(WORKLOADS), nargs="+", default=list(WORKLOADS))
    ap.add_argument("--policy", choices=names, nargs="+", default=names,
                    help="policies to measure (the first is the ratios' baseline)")
    ap.add_argument("--ram-mib", type=int, default=64, help="RAM disk size (default 64)")
    ap.add_argument("--segment-blocks", type=int, default=64, help="4 KiB blocks per segment")
    ap.add_argument("--multiple", type=float, default=3.0,
                    help="logical sizes written in the measured phase (default 3)")
    ap.add_argument("--learned-iops", type=int, default=1500,
                    help="write rate of learned runs, to give the bus wall time (default 1500; "
                         "0: as fast as the others)")
    ap.add_argument("--png", type=Path, help="draw WA over time per policy into this PNG")
    ap.add_argument("--bus-log", type=Path, help="append the learned runs' bus output here")
    ap.add_argument("--json", action="store_true", help="print the raw runs as JSON")
    ap.add_argument("--rows", type=Path,
                    help="append each run to this file as a JSON line as soon as it is measured")
    ap.add_argument("--first-rep", type=int, default=0,
                    help="number of this invocation's first repetition (seed 1000 + number)")
    ap.add_argument("--from-rows", type=Path, nargs="+", metavar="FILE",
                    help="measure nothing: the table (and --png) of runs saved with --rows")
    ap.add_argument("--here", action="store_true", help="run on this kernel, do not boot a VM")
    args = ap.parse_args(argv)
    policies = [p for p in POLICIES if p.name in args.policy]
    policies.sort(key=lambda p: args.policy.index(p.name))

    if args.from_rows:
        return _from_rows(args.from_rows, args, policies)

    from kmlbus.tools import demo

    if not (args.here or demo.can_load_modules()):
        from kmlbus import vm

        print("bench_gc: this kernel cannot load modules; booting the Debian kernel under QEMU",
              file=sys.stderr, flush=True)
        rest = list(sys.argv[1:] if argv is None else argv)
        return int(vm.run([sys.executable, "-m", "kmlbus.tools.bench_gc", "--here", *rest],
                          timeout=3600))

    results: dict[tuple[str, float, str], list[Run]] = {}
    with _modules(args.ram_mib):
        for rep in range(args.first_rep, args.first_rep + args.reps):
            for w in args.workload:
                for u in args.utilization:
                    for p in policies:  # interleaved, so drift falls on every policy
                        try:
                            run = measure(w, u, p, ram_mib=args.ram_mib,
                                          seg_blocks=args.segment_blocks, multiple=args.multiple,
                                          seed=1000 + rep, bus_log=args.bus_log,
                                          learned_iops=args.learned_iops)
                        except RuntimeError as e:
                            if not p.learned:
                                raise
                            # the bus failed: say so, keep the human-made measurements
                            print(f"rep {rep} {w} {u:.0%} {p.name}: failed: {e}", file=sys.stderr)
                            run = Run(float("nan"), 0.0)
                        results.setdefault((w, u, p.name), []).append(run)
                        if args.rows is not None:
                            args.rows.parent.mkdir(parents=True, exist_ok=True)
                            with open(args.rows, "a", encoding="utf-8") as f:
                                f.write(json.dumps(row(w, u, p.name, rep, run)) + "\n")
                        print(f"rep {rep} {w} {u:.0%} {p.name}: WA {run.wa:.3f} "
                              f"({run.seconds:.0f} s)", file=sys.stderr, flush=True)
                        if run.transitions:
                            print(_timelines({(w, u, p.name): [run]}).replace(" rep 0:", f" rep {rep}:"),
                                  file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps([{"workload": w, "utilization": u, "policy": p, "wa": r.wa,
                           "seconds": r.seconds, "transitions": r.transitions, "fits": r.fits}
                          for (w, u, p), runs in results.items() for r in runs]))
    else:
        print(_table(results, args.workload, args.utilization, policies))
        timelines = _timelines(results)
        if timelines:
            print("\nplacement mode of the learned runs (mode@logical sizes written):")
            print(timelines)
    if args.png is not None:
        draw(results, args.workload, args.utilization, policies, args.png)
        print(f"\n{args.png}: WA over time per policy", file=sys.stderr)
    return 0


def _from_rows(paths: Sequence[Path], args: argparse.Namespace, policies: list[Policy]) -> int:
    """The table, timelines and PNG of saved runs: the cells and policies the rows have, in
    the order of --workload, --utilization and --policy (the first policy present is the base)."""
    try:
        results = load_rows(paths)
    except (OSError, ValueError) as e:
        print(f"bench_gc: {e}", file=sys.stderr)
        return 2
    workloads = [w for w in args.workload if any(k[0] == w for k in results)]
    utils = sorted({k[1] for k in results if k[0] in workloads},
                   key=lambda u: args.utilization.index(u) if u in args.utilization else 99)
    have = [p for p in policies
            if all((w, u, p.name) in results for w in workloads for u in utils)]
    if not workloads or not have:
        print("bench_gc: the rows have no cell with every policy asked for", file=sys.stderr)
        return 2
    print(_table(results, workloads, utils, have))
    timelines = _timelines({k: v for k, v in results.items() if k[0] in workloads})
    if timelines:
        print("\nplacement mode of the learned runs (mode@logical sizes written):")
        print(timelines)
    if args.png is not None:
        draw(results, workloads, utils, have, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
