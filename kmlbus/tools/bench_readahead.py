"""Readahead benchmark: stock, static per-device windows, and the ``readahead`` proxy driven by the bus.

``python3 -m kmlbus.tools.bench_readahead [--reps N] [--quick]`` boots the VM
when this kernel cannot load modules (as here) and runs itself inside.  For
each null_blk device (2 ms per request; 200 us + 200 MB/s) with ext4 on it,
fio reads buffered with ``--fadvise_hint=0 --invalidate=1`` after the page
cache is dropped, in five workloads: sequential 4k and 64k, random psync,
random mmap, and a mixed run (a sequential 4k reader and a random mmap reader
at once, on two files of the same device).  Policies, all in the same run:

* ``static N KiB``: the device's ``read_ahead_kb`` on a grid from 0 to 8 MiB
  (0, 128, 1024, 8192 KiB; 128 is the stock default).  The best per stream is its oracle; the best
  single setting over the mixed run, by the geometric mean of its two
  streams' speedups over the default, is "best static".
* ``proxy``: read_ahead_kb at the default, ``kmlbus_readahead.ko
  devices=nullb0`` loaded, ``python -m kmlbus run`` serving a model, the proxy
  pinned in recommendation mode.  ``proxy rule`` serves `rule_model`, a
  hand-written baseline (8 MiB for sequential streams, 0 otherwise);
  ``proxy learned`` serves ``--model FILE``, e.g. a policy that
  ``python -m kmlbus.bus.treefit`` fitted from traces of ``--collect``.
  ``--rule-variant NAME:param=N[,param=N]`` adds ``proxy rule NAME``: the
  rule baseline with those module parameters of ``kmlbus_readahead.ko`` set
  (e.g. ``w0:warmup_accesses=0``), so settings compare in one run.

Prints MiB/s medians (min-max over the repetitions) and ratios to the
default.  Guest under TCG: compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["DEVICES", "GRID_KB", "WORKLOADS", "fio_args", "main", "parse_rule_variant",
           "rule_model", "summarize"]

#: Static per-device settings (read_ahead_kb); 128 is the stock default.
GRID_KB = (0, 128, 1024, 8192)
QUICK_GRID_KB = (0, 128, 8192)
DEFAULT_KB = 128
#: null_blk set-ups: completion latency (ns) and bandwidth cap (MB/s, 0 = none).
DEVICES = {"2ms": (2_000_000, 0), "200us+200MBps": (200_000, 200)}
#: workload -> its streams (fio job names); "mixed" runs both jobs at once.
WORKLOADS: dict[str, tuple[str, ...]] = {
    "seq4k": ("seq4k",), "seq64k": ("seq64k",), "rand_psync": ("rand_psync",),
    "rand_mmap": ("rand_mmap",), "mixed": ("seq4k", "rand_mmap"),
    # real applications (kmlbus.tools.ra_apps); LMDB's figure is thousands of lookups/s
    "lmdb": ("get_k/s",), "sha256sum": ("scan",),
}
#: fio's workloads (the others are real applications)
FIO_WORKLOADS = ("seq4k", "seq64k", "rand_psync", "rand_mmap", "mixed")
#: LMDB database size and the memory cgroup limit its lookups run under (MiB)
LMDB_MB, LMDB_MEMCG_MB = 160, 48
#: files sha256sum scans, MiB each
SHA_FILES, SHA_MB = 2, 64
_JOBS = {
    "seq4k": ("seq", "read", "4k", "psync"),
    "seq64k": ("seq", "read", "64k", "psync"),
    "rand_psync": ("rand", "randread", "4k", "psync"),
    "rand_mmap": ("rand", "randread", "4k", "mmap"),
}
DEV = "nullb0"
#: the policy name of the bus that learns live and climbs through the modes
LIVE = "proxy learned live"
#: features of proxy ``readahead`` (seq first; see kernel/readahead/kmlbus_readahead.c)
RA_FEATURES = 5


def fio_args(workload: str, files: dict[str, Path], runtime: float) -> list[str]:
    """The fio command line of *workload*: one job per stream, JSON output."""
    args = ["fio", "--output-format=json", "--fadvise_hint=0", "--invalidate=1", "--direct=0",
            "--time_based", f"--runtime={runtime:g}s", "--group_reporting=0"]
    for job in WORKLOADS[workload]:
        which, rw, bs, engine = _JOBS[job]
        args += [f"--name={job}", f"--filename={files[which]}", f"--rw={rw}", f"--bs={bs}",
                 f"--ioengine={engine}"]
    return args


_VARIANT_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_PARAM_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
#: module parameters a variant may not set: the benchmark's own scope, and read-only output
_NOT_VARIANT = ("devices", "stats")


def parse_rule_variant(text: str) -> tuple[str, dict[str, int]]:
    """``NAME:param=N[,param=N]`` -> (NAME, {param: N}): a rule-baseline run with those
    module parameters of kmlbus_readahead.ko.  Raises ValueError saying what is wrong."""
    name, sep, rest = text.partition(":")
    if not sep or not _VARIANT_NAME.match(name):
        raise ValueError(f"rule variant {text!r}: expected NAME:param=N[,param=N] with NAME of "
                         "letters, digits, '_', '.', '+' or '-' (e.g. w0:warmup_accesses=0)")
    params: dict[str, int] = {}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        if not eq or not _PARAM_NAME.match(key):
            raise ValueError(f"rule variant {text!r}: {item!r} is not param=N "
                             "(a module parameter's name, '=', an integer)")
        if key in _NOT_VARIANT:
            raise ValueError(f"rule variant {text!r}: {key} is not a setting to compare "
                             f"(the variants may set any parameter but {', '.join(_NOT_VARIANT)})")
        if key in params:
            raise ValueError(f"rule variant {text!r}: {key} is given twice")
        try:
            params[key] = int(value, 10)
        except ValueError:
            raise ValueError(f"rule variant {text!r}: {key}={value!r} is not an integer") from None
    return name, params


def rule_model() -> onnx.ModelProto:
    """Hand-written baseline (never a served learned model): 8 MiB if seq >= 0.5, else 0.

    Input float32 [N, RA_FEATURES] in the proxy's feature order (seq first), output float32
    [N, 1] pages.
    """
    pick = [[1.0]] + [[0.0]] * (RA_FEATURES - 1)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "pick"], ["seq"]),
         helper.make_node("GreaterOrEqual", ["seq", "half"], ["is_seq"]),
         helper.make_node("Cast", ["is_seq"], ["one"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["one", "big"], ["value"])],
        "readahead_rule",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", RA_FEATURES])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["N", 1])],
        initializer=[numpy_helper.from_array(_f32(pick), "pick"),
                     numpy_helper.from_array(_f32([0.5]), "half"),
                     numpy_helper.from_array(_f32([2048.0]), "big")])
    model = helper.make_model(graph, producer_name="kmlbus",
                              doc_string="readahead rule baseline: window = 2048 * (seq >= 0.5)",
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _f32(x: object) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


# ---- in the guest ---------------------------------------------------------------------

def _run_fio(workload: str, files: dict[str, Path], runtime: float) -> dict[str, float]:
    """MiB/s per stream of one fio run, caches dropped first."""
    from kmlbus.vm.nullblk import drop_caches

    drop_caches()
    out = subprocess.run(fio_args(workload, files, runtime), capture_output=True, text=True,
                         check=True).stdout
    data = json.loads(out[out.index("{"):])
    return {j["jobname"]: j["read"]["bw_bytes"] / 2**20 for j in data["jobs"]}


def _run(workload: str, files: dict[str, Path], runtime: float) -> dict[str, float]:
    """One run of *workload* (fio or a real application), caches dropped first: per stream,
    MiB/s (LMDB: thousands of lookups per second)."""
    from kmlbus.tools import ra_apps
    from kmlbus.vm.nullblk import drop_caches

    if workload in FIO_WORKLOADS:
        return _run_fio(workload, files, runtime)
    drop_caches()
    if workload == "lmdb":
        procs = files.get("lmdb_procs")
        return {"get_k/s": ra_apps.run_lmdb(files["lmdb"], ra_apps.lmdb_keys(LMDB_MB), runtime,
                                            procs)}
    if workload == "sha256sum":
        return {"scan": ra_apps.run_sha256([files[f"sha{i}"] for i in range(SHA_FILES)])}
    raise ValueError(f"unknown workload {workload!r}")


def _workloads(files: dict[str, Path], only: Sequence[str] = ()) -> list[str]:
    """The workloads *files* has data for (the applications' only outside ``--collect``),
    restricted to *only* when given."""
    return [wl for wl in WORKLOADS if (wl in FIO_WORKLOADS or "lmdb" in files)
            and (not only or wl in only)]


@contextmanager
def _apps(disk: Any, files: dict[str, Path], say: Callable[[str], None]) -> Iterator[None]:
    """The real applications' data on *disk*, into *files*; LMDB's memory cgroup while inside."""
    from kmlbus.tools import ra_apps

    try:
        import lmdb  # noqa: F401 - the guest shares this Python
    except ImportError as e:
        raise SystemExit("bench_readahead: py-lmdb is missing: pip install 'kmlbus[bench]'") from e
    t0 = time.monotonic()
    files["lmdb"] = disk.mountpoint / "lmdb"
    ra_apps.make_lmdb(files["lmdb"], LMDB_MB)
    for i in range(SHA_FILES):
        files[f"sha{i}"] = disk.make_file(f"sha{i}", SHA_MB)
    say(f"application data: LMDB {LMDB_MB} MiB (lookups under memory.max {LMDB_MEMCG_MB} MiB), "
        f"{SHA_FILES} x {SHA_MB} MiB for sha256sum; {time.monotonic() - t0:.0f} s")
    with ra_apps.memcg("kmlbus-bench-lmdb", LMDB_MEMCG_MB) as procs:
        files["lmdb_procs"] = procs
        yield


@dataclass
class Results:
    """MiB/s samples: (device, policy, workload, stream) -> list over repetitions."""

    runs: dict[tuple[str, str, str, str], list[float]]
    #: device -> proxy policy -> ns per decision spent in the proxy's entry handler
    decide_ns: dict[str, dict[str, float]] = field(default_factory=dict)
    #: device -> the mode the live learner had reached when it was measured
    reached: dict[str, str] = field(default_factory=dict)

    def add(self, device: str, policy: str, workload: str, got: dict[str, float]) -> None:
        for stream, mibs in got.items():
            self.runs.setdefault((device, policy, workload, stream), []).append(mibs)


@contextmanager
def _daemon(work: Path, proxy_body: str, mode: str | None, *, ttl_ms: int = 5000,
            trace: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``kmlbus run`` with ``[proxy.readahead]`` *proxy_body*, the proxy pinned in *mode*
    (None: not pinned, the bus moves it on evidence; returns once it is attached)."""
    from kmlbus.bus import pins
    from kmlbus.contract import spec
    from kmlbus.wire import netlink

    want = None if mode is None else spec.load().enums["mode"].value(mode)
    bus = f"[bus]\nttl_ms = {ttl_ms}\nlatency_budget_ms = 1000\n"
    if trace is not None:
        bus += f'trace = "{trace}"\n'
    (work / "bus.toml").write_text(f"{bus}\n[proxy.readahead]\n{proxy_body}")
    env = dict(os.environ, KMLBUS_STATE=str(work / "state.json"))
    os.environ["KMLBUS_STATE"] = env["KMLBUS_STATE"]
    if mode is not None:
        pins.pin("readahead", mode)
    log = open(work / "bus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "kmlbus", "run", "--config", str(work / "bus.toml")],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        end = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"kmlbus run exited {proc.returncode}: "
                                   f"{(work / 'bus.log').read_text()[-2000:]}")
            with netlink.Connection() as c:
                p = c.proxy("readahead")
            if p["bus-portid"] and (want is None or p["mode"] == want):
                break
            if time.monotonic() > end:
                raise RuntimeError(f"the bus did not take proxy readahead to {mode}: {p}")
            time.sleep(0.5)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _counters() -> dict[str, int]:
    from kmlbus.wire.netlink import Connection

    with Connection() as c:
        return dict(c.proxy("readahead")["counters"])


def _decide_stats() -> tuple[int, int]:
    """(windows applied, ns spent on them) from kmlbus_readahead's ``stats`` parameter.

    Every decision point applies a window, decided anew or held (see the module's
    ``hold_ms``): the cost on the I/O path is per decision point."""
    text = Path("/sys/module/kmlbus_readahead/parameters/stats").read_text()
    kv = dict(part.split("=") for part in text.split())
    return int(kv["windows"]), int(kv["decide_ns"])


RA_PARAMS = Path("/sys/module/kmlbus_readahead/parameters")


@contextmanager
def _module_params(params: dict[str, int]) -> Iterator[None]:
    """kmlbus_readahead.ko's *params* set through sysfs while inside, the previous values after."""
    before = {k: (RA_PARAMS / k).read_text().strip() for k in params}
    try:
        for k, v in params.items():
            try:
                (RA_PARAMS / k).write_text(f"{v}\n")
            except OSError as e:
                raise RuntimeError(f"kmlbus_readahead {k}={v} refused: {e}") from e
        yield
    finally:
        for k, old in before.items():
            (RA_PARAMS / k).write_text(f"{old}\n")


def _module_param_names(ko: Path) -> list[str]:
    """The parameters *ko* declares (``modinfo -F parm``: one "name:description" per line)."""
    out = subprocess.run(["modinfo", "-F", "parm", str(ko)], capture_output=True, text=True,
                         check=True).stdout
    return [line.split(":", 1)[0] for line in out.splitlines() if ":" in line]


def _mode() -> str:
    """The readahead proxy's mode, as the kernel has it."""
    from kmlbus.contract import spec
    from kmlbus.wire.netlink import Connection

    with Connection() as c:
        return spec.load().enums["mode"].name_of(int(c.proxy("readahead")["mode"]))


def _climb(files: dict[str, Path], runtime: float, limit_s: float,
           say: Callable[[str], None], label: str) -> str:
    """Run the mixed, random mmap and sequential workloads in turn until the bus has taken
    the proxy to recommendation on its evidence, or *limit_s* passed; the mode reached."""
    t0 = time.monotonic()
    mode = _mode()
    while mode != "recommendation" and time.monotonic() - t0 < limit_s:
        for wl in ("mixed", "rand_mmap", "seq4k"):
            _run_fio(wl, files, runtime)
        mode = _mode()
        say(f"{label} climbing: {mode} after {time.monotonic() - t0:.0f} s")
    return mode


def _show(got: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:7.1f}" for k, v in got.items())


def run_device(device: str, latency_ns: int, mbps: int, grid: Sequence[int], reps: int,
               runtime: float, res: Results, say: Callable[[str], None], *,
               models: dict[str, bytes], collect: Path | None = None,
               live: Path | None = None, climb_s: float = 600.0,
               params: dict[str, dict[str, int]] | None = None,
               only: Sequence[str] = ()) -> None:
    """Every policy on one null_blk set-up, into *res*.

    *models*: proxy policy name -> ONNX model the bus serves in recommendation;
    *params*: proxy policy name -> module parameters set for its run (the others
    run with the module's defaults).  *only*: these workloads (default: all).
    With *live* (a trace path), also ``proxy learned live``: a bus that learns
    (``learner = "tree"``) with no model and no pin; the workloads run in turn
    until it has taken the proxy to recommendation on the kernel's evidence
    (at most *climb_s*), then are measured like the others, in the mode reached;
    its trace (modes over time) goes to *live*.
    With *collect*, only the proxy runs, in learning with every decision
    explored by the bus (``learn = true``, ``learner = "tree"``: windows drawn
    uniformly from 0 and the powers of two up to 8 MiB, ``explore = 1000``),
    recorded to the trace *collect* for `kmlbus.bus.treefit`.
    """
    from kmlbus.vm.guest import KMLBUS_KO, insmod, is_loaded, rmmod
    from kmlbus.vm.kernels import project_root
    from kmlbus.vm.nullblk import NullBlk, set_read_ahead_kb

    ra_ko = project_root() / "kernel" / "readahead" / "kmlbus_readahead.ko"
    with NullBlk("/run/kmlbus-bench-ra", name=DEV, size_mb=1536, completion_nsec=latency_ns,
                 mbps=mbps) as disk, ExitStack() as apps:
        files = {"seq": disk.make_file("seq", 512), "rand": disk.make_file("rand", 256)}
        if collect is None and (not only or {"lmdb", "sha256sum"} & set(only)):
            apps.enter_context(_apps(disk, files, say))
        for rep in range(reps if collect is None else 0):
            for wl in _workloads(files, only):
                for kb in grid:
                    set_read_ahead_kb(DEV, kb)
                    got = _run(wl, files, runtime)
                    res.add(device, f"static {kb}", wl, got)
                    say(f"{device} rep {rep + 1} {wl:<10} static {kb:>4} KiB  {_show(got)}")
        set_read_ahead_kb(DEV, DEFAULT_KB)
        insmod(KMLBUS_KO)
        try:
            insmod(ra_ko, devices=DEV)
            runs: list[tuple[str, str, str | None, Path | None]] = []
            if collect is not None:
                runs.append(("explore", 'learn = true\nlearner = "tree"\nexplore = 1000\n'
                             "learn_every_s = 1000000\n",
                             "learning", collect))
            else:
                runs += [(name, 'model = "model.onnx"\n', "recommendation", None) for name in models]
                if live is not None:
                    runs.append((LIVE, 'learn = true\nlearner = "tree"\nexplore = 300\n'
                                 "learn_every_s = 10\n", None, live))
            for name, body, mode, trace in runs:
                try:
                    with _module_params((params or {}).get(name, {})):
                        _measure_proxy(device, name, body, mode, trace, models.get(name), files,
                                       reps, runtime, res, say, climb_s, only)
                except RuntimeError as e:  # a bus that died: say so, measure the rest
                    say(f"{device} {name}: not measured: {e}")
        finally:
            for name in ("kmlbus_readahead", "kmlbus"):
                if is_loaded(name):
                    rmmod(name)


def _measure_proxy(device: str, name: str, body: str, mode: str | None, trace: Path | None,
                   model: bytes | None, files: dict[str, Path], reps: int, runtime: float,
                   res: Results, say: Callable[[str], None], climb_s: float,
                   only: Sequence[str] = ()) -> None:
    """One proxy policy: its bus, (for the live learner) the climb, then the workloads."""
    work = Path(tempfile.mkdtemp(prefix="kmlbus-bench-ra-"))
    if model is not None:
        (work / "model.onnx").write_bytes(model)
    with _daemon(work, body, mode, trace=trace):
        if mode is None:
            res.reached[device] = _climb(files, runtime, climb_s, say,
                                         f"{device} {name}")
        c0, s0 = _counters(), _decide_stats()
        for rep in range(reps):
            for wl in _workloads(files, only):
                got = _run(wl, files, runtime)
                res.add(device, name, wl, got)
                say(f"{device} rep {rep + 1} {wl:<10} {name:<15} {_show(got)}"
                    + (f"  [{_mode()}]" if mode is None else ""))
        c1, s1 = _counters(), _decide_stats()
    n = max(s1[0] - s0[0], 1)
    say(f"{device} {name}: decisions model {c1['decisions-model'] - c0['decisions-model']}, "
        f"default {c1['decisions-default'] - c0['decisions-default']}, "
        f"telemetry drops {c1['drops'] - c0['drops']}; "
        f"{(s1[1] - s0[1]) / n:.0f} ns per decision point in the entry handler")
    res.decide_ns.setdefault(device, {})[name] = (s1[1] - s0[1]) / n
    shutil.rmtree(work, ignore_errors=True)


# ---- the table ---------------------------------------------------------------------------

def _med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(max(x, 1e-9)) for x in xs) / len(xs))


def _mixed_gain(res: Results, dev: str, policy: str) -> float:
    """Geometric mean over the mixed run's streams of median MiB/s / the default's."""
    default = f"static {DEFAULT_KB}"
    return _geomean([_med(res.runs.get((dev, policy, "mixed", s), []))
                     / _med(res.runs.get((dev, default, "mixed", s), [])) for s in WORKLOADS["mixed"]])


def _measured(res: Results, dev: str) -> list[tuple[str, str]]:
    """(workload, stream) pairs the default was measured on for *dev*, in table order."""
    default = f"static {DEFAULT_KB}"
    return [(wl, st) for wl, sts in WORKLOADS.items() for st in sts
            if res.runs.get((dev, default, wl, st))]


def summarize(res: Results, grid: Sequence[int]) -> str:
    """The result table: per device and stream, medians (min-max) and ratios to the default."""
    lines: list[str] = []
    devices = sorted({k[0] for k in res.runs}, key=list(DEVICES).index)
    default = f"static {DEFAULT_KB}"
    proxies = sorted({k[1] for k in res.runs if not k[1].startswith("static ")})
    for dev in devices:
        lines.append(f"\n== {dev}: MiB/s median (min-max) over repetitions; x = ratio to default "
                     f"({DEFAULT_KB} KiB); /or = ratio to the stream's oracle; lmdb: thousands of "
                     "lookups/s ==")
        head = f"{'workload/stream':<22}" + "".join(f"{f'static {kb}':>16}" for kb in grid)
        head += f"{'oracle':>16}" + "".join(f"{p:>29}" for p in proxies)
        lines.append(head)
        for wl, st in _measured(res, dev):
            row = f"{wl + '/' + st:<22}"
            base = _med(res.runs.get((dev, default, wl, st), []))
            meds = {kb: _med(res.runs.get((dev, f"static {kb}", wl, st), [])) for kb in grid}
            for kb in grid:
                row += f"{meds[kb]:>9.1f} {meds[kb] / base:>5.2f}x"
            okb = max(grid, key=lambda k: meds[k])
            row += f"{meds[okb]:>9.1f} @{okb:>5}"
            for p in proxies:
                xs = res.runs.get((dev, p, wl, st), [])
                pm = _med(xs)
                spread = f"({min(xs):.1f}-{max(xs):.1f})" if xs else ""
                row += f"{pm:>7.1f} {spread:>11} {pm / base:>4.2f}x {pm / meds[okb]:>4.2f}/or"
            lines.append(row)
        if any(wl == "mixed" for wl, _ in _measured(res, dev)):  # not with --workload
            static = {kb: _mixed_gain(res, dev, f"static {kb}") for kb in grid}
            best = max(grid, key=lambda k: static[k])
            lines.append(f"mixed, geometric mean of the two streams' speedups over the default: "
                         f"best static {best} KiB {static[best]:.2f}x")
            for p in proxies:
                g = _mixed_gain(res, dev, p)
                lines.append(f"  {p}: {g:.2f}x ({g / static[best]:.2f} x best static)")
        if dev in res.reached:
            lines.append(f"{LIVE}: learned from the kernel's feedback with no model and no pin; "
                         f"measured in {res.reached[dev]}")
        for p, ns in res.decide_ns.get(dev, {}).items():
            lines.append(f"decision cost, {p}: {ns:.0f} ns per decision in the entry handler "
                         "(stock: 0; the kretprobe trap and the return handler come on top)")
    return "\n".join(lines)


def load_results(path: str | Path) -> tuple[Results, list[int]]:
    """The :class:`Results` and grid a ``--json`` file holds."""
    data = json.loads(Path(path).read_text())
    res = Results({}, reached=dict(data.get("reached", {})))
    for r in data["runs"]:
        res.runs[(r["device"], r["policy"], r["workload"], r["stream"])] = list(r["mibs"])
    return res, list(data["grid"])


def draw(json_path: str | Path, out: str | Path, *, live: str | None = None) -> Path:
    """The benchmark as a PNG: per device, each stream's median MiB/s under every policy as a
    ratio to the default (the grid's best is the oracle), and, with *live*, the live learner's
    mode over time from its trace (:mod:`kmlbus.tools.plot`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from kmlbus.tools import plot

    res, grid = load_results(json_path)
    devices = sorted({k[0] for k in res.runs}, key=list(DEVICES).index)
    policies = [f"static {kb}" for kb in grid] + sorted(
        {k[1] for k in res.runs if not k[1].startswith("static ")})
    streams = sorted({ws for d in devices for ws in _measured(res, d)},
                     key=[(wl, st) for wl, sts in WORKLOADS.items() for st in sts].index)
    runs = {d: Path(f"{live}.{d}") for d in devices} if live else {}
    runs = {d: p for d, p in runs.items() if p.exists()}
    fig = Figure(figsize=(12, 4.2 * len(devices) + 2.6 * len(runs)), layout="constrained")
    axes = fig.subplots(len(devices) + len(runs), 1, squeeze=False)[:, 0]
    width = 0.8 / len(policies)
    for ax, dev in zip(axes, devices):
        for i, pol in enumerate(policies):
            ys = []
            for wl, st in streams:
                base = _med(res.runs.get((dev, f"static {DEFAULT_KB}", wl, st), []))
                ys.append(_med(res.runs.get((dev, pol, wl, st), [])) / base)
            ax.bar(np.arange(len(streams)) + (i - len(policies) / 2 + 0.5) * width, ys, width,
                   label=pol + (" KiB" if pol.startswith("static") else ""))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(streams)), [f"{wl}\n{st}" if wl == "mixed" else wl
                                                for wl, st in streams])
        ax.set_ylabel("MiB/s / default (median)")
        ax.set_title(f"readahead, null_blk {dev}: throughput per stream, ratio to the default "
                     f"{DEFAULT_KB} KiB")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for ax, (dev, path) in zip(axes[len(devices):], runs.items()):
        run = plot.load_run(path, "readahead")
        plot.mode_panel(ax, run)
        ax.set_xlabel("seconds since the live learner's bus started recording")
        ax.set_title(f"{LIVE}, {dev}: the proxy's mode over time (bus learning from the "
                     f"kernel's feedback, no pin)")
    FigureCanvasAgg(fig)
    fig.savefig(Path(out), format="png", dpi=110)
    return Path(out)


def _guest_main(args: argparse.Namespace) -> int:
    grid = args.grid or (QUICK_GRID_KB if args.quick else GRID_KB)
    if DEFAULT_KB not in grid:
        print(f"bench_readahead: --grid must hold the default {DEFAULT_KB} KiB", file=sys.stderr)
        return 2
    reps = args.reps if args.reps is not None else (1 if args.quick else 5)
    runtime = args.runtime if args.runtime is not None else 1.5
    res = Results({})
    t0 = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - t0:7.1f} s] {line}", flush=True)

    devices = args.device or (list(DEVICES)[:1] if args.quick and not args.all_devices
                              else list(DEVICES))
    models = {"proxy rule": rule_model().SerializeToString()}
    params: dict[str, dict[str, int]] = {}
    if args.rule_variant:
        from kmlbus.vm.kernels import project_root

        known = _module_param_names(project_root() / "kernel" / "readahead"
                                    / "kmlbus_readahead.ko")
        for vname, vparams in args.rule_variant:
            unknown = sorted(set(vparams) - set(known))
            if unknown:
                print(f"bench_readahead: --rule-variant {vname}: kmlbus_readahead.ko has no "
                      f"parameter {', '.join(unknown)} (it has {', '.join(known)})",
                      file=sys.stderr)
                return 2
            models[f"proxy rule {vname}"] = models["proxy rule"]
            params[f"proxy rule {vname}"] = vparams
    if args.model:
        models["proxy learned"] = Path(args.model).read_bytes()
    for dev in devices:
        lat, mbps = DEVICES[dev]
        collect = None if args.collect is None else Path(f"{args.collect}.{dev}").resolve()
        live = None if not args.live else Path(f"{args.live}.{dev}").resolve()
        if live is not None:
            live.unlink(missing_ok=True)
        run_device(dev, lat, mbps, grid, reps, runtime, res, say, models=models, collect=collect,
                   live=live, climb_s=args.climb_s, params=params, only=args.workload or ())
    print(summarize(res, grid) if args.collect is None else f"traces: {args.collect}.*")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"grid": list(grid), "reached": res.reached,
             "runs": [{"device": d, "policy": p, "workload": w, "stream": s, "mibs": v}
                      for (d, p, w, s), v in res.runs.items()]}, indent=1))
    print(f"\n{reps} repetition(s), fio runtime {runtime:g} s, grid {list(grid)} KiB; "
          f"total {time.monotonic() - t0:.0f} s in the guest (TCG: compare ratios, not MiB/s)")
    return 0


def _variant_arg(text: str) -> tuple[str, dict[str, int]]:
    try:
        return parse_rule_variant(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kmlbus.tools.bench_readahead",
                                 description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--reps", type=int, help="repetitions (default 5, --quick 1)")
    ap.add_argument("--quick", action="store_true",
                    help="CI variant: the 2 ms device, grid 0/128/8192 KiB, 1 repetition")
    ap.add_argument("--all-devices", action="store_true", help="with --quick: both devices")
    ap.add_argument("--device", action="append", choices=list(DEVICES),
                    help="only this null_blk set-up (repeatable; default: both)")
    ap.add_argument("--runtime", type=float, help="seconds per fio run (default 1.5)")
    ap.add_argument("--grid", type=lambda t: tuple(int(v) for v in t.split(",")),
                    help=f"static read_ahead_kb settings, comma-separated (default "
                         f"{','.join(map(str, GRID_KB))}; must hold {DEFAULT_KB})")
    ap.add_argument("--workload", action="append", choices=list(WORKLOADS),
                    help="only this workload (repeatable; default: all)")
    ap.add_argument("--rule-variant", action="append", type=_variant_arg,
                    metavar="NAME:param=N[,param=N]",
                    help="also the rule baseline with these kmlbus_readahead.ko parameters "
                         "(policy 'proxy rule NAME'; repeatable), e.g. w0:warmup_accesses=0")
    ap.add_argument("--json", help="also write every sample to this JSON file")
    ap.add_argument("--model", help="also serve this ONNX model (policy 'proxy learned')")
    ap.add_argument("--live", metavar="TRACE",
                    help="also a bus that learns live and climbs through the modes on evidence "
                         f"(policy '{LIVE}'); its traces go to TRACE.<device>")
    ap.add_argument("--climb-s", type=float, default=600.0,
                    help="longest time the live learner gets to reach recommendation (default 600)")
    ap.add_argument("--png", help="draw the results (and the live learner's modes) to this PNG; "
                                  "needs --json")
    ap.add_argument("--collect", metavar="TRACE",
                    help="instead: run the workloads with the bus exploring in learning, record "
                         "traces TRACE.<device> for python -m kmlbus.bus.treefit")
    ap.add_argument("--kver", help="kernel release the VM boots (default: newest installed)")
    ap.add_argument("--here", action="store_true", help="run in this kernel (root, modules loadable)")
    args = ap.parse_args(argv)
    names = [n for n, _ in args.rule_variant or ()]
    if len(set(names)) != len(names):
        ap.error(f"--rule-variant names must differ: {', '.join(names)}")
    if shutil.which("fio") is None:
        print("bench_readahead: fio not found: apt-get install -y fio", file=sys.stderr)
        return 2
    if args.png and not args.json:
        ap.error("--png needs --json (the picture is drawn from it)")
    if args.here or (Path("/proc/modules").exists() and os.geteuid() == 0):
        rc = _guest_main(args)
        if rc == 0 and args.png and not args.here:
            print(f"bench_readahead: {draw(args.json, args.png, live=args.live)}")
        return rc
    from kmlbus import vm

    print("bench_readahead: this kernel cannot load modules; booting the Debian kernel under QEMU",
          flush=True)
    fwd = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--here"]
    rc = vm.run([sys.executable, "-m", "kmlbus.tools.bench_readahead", "--here", *fwd],
                kver=args.kver, memory="3G", timeout=3600 if not args.quick else 900)
    if rc == 0 and args.png and args.json:
        print(f"bench_readahead: {draw(args.json, args.png, live=args.live)}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
