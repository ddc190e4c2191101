"""``kmlbus demo``: watch the bus drive the sample proxy through its modes.

Three phases against the real ``kmlbus.ko`` and ``kmlbus_sample.ko``:

1. ``kmlbus run`` starts with a good ONNX model (window = 1 + 63 * seq_ratio):
   the proxy should climb emergency -> learning -> collaboration ->
   recommendation on its own, on measured evidence;
2. the model file is replaced by a bad one (always 64 pages); the bus
   hot-swaps it, the model arm's efficiency falls, and the proxy should be
   demoted;
3. the daemon is killed with SIGKILL; the kernel, not the daemon, puts the
   proxy in emergency (reason bus-gone);
4. a new bus starts with ``learn = true`` and *no model*: it explores in
   learning, fits a model from the kernel's feedback, and the proxy should
   climb again on that learned model;
5. the learned model serves in recommendation for a few seconds, measured
   against the default of phase 1.

Each kernel mode event is printed as it arrives with its reason, the bus's
own transition log (with its evidence) is relayed, and every two seconds a
line shows the per-arm efficiency measured from the kernel's feedback
records by this independent observer.  A summary table ends the run.  Both
buses record one trace (``[bus] trace``), and the demo draws it as a PNG
(:mod:`kmlbus.tools.plot`) and prints its path.

On a machine whose kernel cannot load modules (like the CI hosts), the demo
boots the installed Debian kernel under QEMU (:mod:`kmlbus.vm`) and runs
itself there with ``--here``; the trace is written into the work folder the
guest shares, and the host draws it (matplotlib is slow to start under TCG).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kmlbus.bus import atomic, models
from kmlbus.vm import guest
from kmlbus.wire import codec, netlink

__all__ = ["main"]

#: Decisions per second of the sample workload during the demo.
RATE = 1000
#: How long the bus may take to start and attach (Python under TCG is slow).
BUS_START_S = 180.0
#: Seconds the learned model is watched serving in recommendation (phase 5).
LEARNED_WATCH_S = 8.0
#: Seconds between the demotion and the kill: the bus flushes its trace once a second.
TRACE_FLUSH_S = 1.5


class _Stop(Exception):
    """A phase failed; later phases make no sense."""


@dataclass
class Phase:
    """What the observer saw during one phase of the demo."""

    name: str
    goal: str
    start: float = field(default_factory=time.monotonic)
    end: float = 0.0
    reached: bool = False
    path: list[str] = field(default_factory=list)
    eff: dict[int, list[float]] = field(default_factory=lambda: {0: [], 1: []})

    def mean(self, arm: int) -> float | None:
        """Mean efficiency of *arm* (0 default, 1 model) over the phase."""
        v = self.eff[arm]
        return float(np.mean(v)) if v else None


def can_load_modules() -> bool:
    """True where this kernel takes modules and we may load them."""
    return Path("/proc/modules").exists() and os.geteuid() == 0


_OUT = threading.Lock()


def say(line: str) -> None:
    """Print one whole line; the relay thread and the observer share the terminal."""
    with _OUT:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def load_modules() -> bool:
    """Load kmlbus.ko and the sample if the family is absent; True if we loaded them."""
    try:
        netlink.Connection().close()
        return False
    except netlink.ModuleNotLoaded:
        pass
    try:
        guest.insmod(guest.KMLBUS_KO)
        guest.insmod(guest.SAMPLE_KO, rate=RATE)
    except guest.ModuleError as e:
        raise SystemExit(f"kmlbus: {e}") from None
    return True


def unload_modules() -> None:
    """Remove the sample and the core module (best effort, errors printed)."""
    for name in ("kmlbus_sample", "kmlbus"):
        try:
            guest.rmmod(name)
        except guest.ModuleError as e:
            print(f"demo: {e}")


def _relay(stream: object, out: Callable[[str], None], ready: threading.Event) -> None:
    """Print the bus's transition log and problems; set *ready* once it attached."""
    for line in stream:  # type: ignore[attr-defined]
        if ": attached in " in line:
            ready.set()
        # The daemon's own one-line account of each move; modes.machine repeats it with the
        # whole evidence dict, which belongs in the log, not on a person's screen.
        if "modes.machine" in line:
            continue
        if " -> " in line or ": attached in " in line or "error" in line.lower() \
                or "refused" in line or "Traceback" in line or "reload" in line \
                or "learned model" in line:
            out("  bus | " + line.rstrip())


class Observer:
    """A second, independent subscriber: kernel mode events and feedback per arm."""

    def __init__(self, proxy: str) -> None:
        self.conn = netlink.Connection(groups=("events", "telemetry"))
        self.proxy = proxy
        p = self.conn.proxy(proxy)
        self.id = int(p["id"])
        self.mode = codec.enum_name("mode", int(p["mode"]))
        self.scale = float(p.get("efficiency-scale", 1000)) or 1000.0
        self.t0 = time.monotonic()
        self.window: dict[int, list[float]] = {0: [], 1: []}

    def poll(self, phase: Phase, timeout: float = 0.2) -> None:
        """Take what arrived: print mode events, collect efficiencies."""
        for m in self.conn.recv(timeout=timeout):
            if int(m.attrs.get("id", -1)) != self.id:
                continue
            if m.op == "mode-event":
                old = codec.enum_name("mode", int(m.attrs.get("old-mode", 0)))
                self.mode = codec.enum_name("mode", int(m.attrs["mode"]))
                why = codec.enum_name("reason", int(m.attrs.get("reason", 0)))
                phase.path.append(self.mode)
                say(f"[{self.elapsed():6.1f}s] kernel: {self.proxy} {old} -> {self.mode} (reason: {why})")
            elif m.op == "feedback":
                fb = m.attrs["feedback"]
                for arm in (0, 1):
                    e = fb["efficiency"][fb["arm"] == arm] / self.scale
                    self.window[arm].extend(e.tolist())
                    phase.eff[arm].extend(e.tolist())

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def report(self) -> None:
        """One line: mode and per-arm efficiency since the last line."""
        parts = []
        for arm, name in ((0, "default"), (1, "model")):
            v = self.window[arm]
            parts.append(f"{name} {np.mean(v):.3f} ({len(v)} dec)" if v else f"{name} -")
        say(f"[{self.elapsed():6.1f}s] {self.proxy}: {self.mode:<14} efficiency  " + "  ".join(parts))
        self.window = {0: [], 1: []}


def _wait(obs: Observer, phase: Phase, until: Callable[[], bool], seconds: float) -> None:
    next_report = time.monotonic() + 2.0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        obs.poll(phase)
        if time.monotonic() >= next_report:
            obs.report()
            next_report += 2.0
        if until():
            phase.reached = True
            break
    phase.end = time.monotonic()


def _write_config(d: Path, trace: Path) -> Path:
    cfg = d / "demo.toml"
    cfg.write_text(
        "# kmlbus demo configuration\n"
        f"[bus]\nttl_ms = 300\nlatency_budget_ms = 200\ntrace = {json.dumps(str(trace))}\n\n"
        "[proxy.sample]\nmodel = \"sample.onnx\"\nfeatures = [\"seq_ratio\", \"req_size\", \"noise\"]\n",
        encoding="utf-8")
    return cfg


def _write_learn_config(d: Path, trace: Path) -> Path:
    cfg = d / "learn.toml"
    cfg.write_text(
        "# kmlbus demo: learn the sample proxy's model from scratch\n"
        f"[bus]\nttl_ms = 300\nlatency_budget_ms = 200\ntrace = {json.dumps(str(trace))}\n\n"
        "[proxy.sample]\nlearn = true\nexplore = 200\nlearn_every_s = 3\n"
        "learned_model = \"learned.onnx\"\n", encoding="utf-8")
    return cfg


def _start_bus(cfg: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """``kmlbus run`` with its log relayed; returns once it attached (or exits the demo)."""
    bus = subprocess.Popen([sys.executable, "-m", "kmlbus", "run", "--config", str(cfg)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    ready = threading.Event()
    threading.Thread(target=_relay, args=(bus.stdout, say, ready), daemon=True).start()
    # Python and onnxruntime start slowly under QEMU's TCG; phases start once the bus is attached.
    if not ready.wait(BUS_START_S):
        bus.kill()
        raise SystemExit(f"kmlbus demo: the bus did not attach within {BUS_START_S:.0f} s")
    return bus


def _swap_model(path: Path, model: bytes) -> None:
    atomic.write_bytes(path, model)


def run_here(seconds: float, trace: Path) -> int:
    """The demo on this kernel (root, module loadable or loaded); both buses record *trace*."""
    loaded = load_modules()
    work = Path(tempfile.mkdtemp(prefix="kmlbus-demo-"))
    model_path = work / "sample.onnx"
    _swap_model(model_path, models.to_bytes(models.sample_good_model()))
    trace.parent.mkdir(parents=True, exist_ok=True)
    trace.unlink(missing_ok=True)  # the first bus starts it, the second appends
    cfg = _write_config(work, trace)
    env = dict(os.environ, KMLBUS_STATE=str(work / "state.json"))
    obs = Observer("sample")
    print(f"demo: proxy sample (id {obs.id}) starts in {obs.mode}; bus config {cfg}", flush=True)
    bus = _start_bus(cfg, env)
    phases = [
        Phase("good model", "reach recommendation"),
        Phase("bad model", "demoted out of recommendation"),
        Phase("bus killed", "emergency, reason bus-gone"),
        Phase("no model", "learn one, reach recommendation"),
        Phase("learned", "serve in recommendation"),
    ]
    try:
        say("\n== phase 1: good model; the bus should promote the proxy on evidence ==")
        _wait(obs, phases[0], lambda: obs.mode == "recommendation", seconds)
        if not phases[0].reached:
            raise _Stop("the proxy did not reach recommendation with the good model")
        say("\n== phase 2: the model file is replaced by a bad one (always 64 pages) ==")
        phases[1].start = time.monotonic()
        _swap_model(model_path, models.to_bytes(models.sample_bad_model()))
        _wait(obs, phases[1], lambda: obs.mode != "recommendation", seconds)
        # The bus's trace reaches the disk once a second: let the demotion get there before SIGKILL.
        _wait(obs, phases[1], lambda: False, TRACE_FLUSH_S)
        say("\n== phase 3: the bus is killed (SIGKILL); the kernel falls back by itself ==")
        phases[2].start = time.monotonic()
        bus.send_signal(signal.SIGKILL)
        bus.wait()
        _wait(obs, phases[2], lambda: obs.mode == "emergency", 10.0)
        if not phases[2].reached:
            raise _Stop("the kernel did not put the proxy in emergency")
        say("\n== phase 4: a new bus with learn = true and no model file: explore, fit, climb ==")
        bus = _start_bus(_write_learn_config(work, trace), env)
        phases[3].start = time.monotonic()
        _wait(obs, phases[3], lambda: obs.mode == "recommendation", 2 * seconds)
        if not phases[3].reached:
            raise _Stop("the proxy did not reach recommendation on a learned model")
        say("\n== phase 5: the learned model serves; the kernel measures it ==")
        phases[4].start = time.monotonic()
        _wait(obs, phases[4], lambda: obs.mode != "recommendation", LEARNED_WATCH_S)
        phases[4].reached = obs.mode == "recommendation"
        bus.send_signal(signal.SIGTERM)
        bus.wait(timeout=60)
    except _Stop as e:
        print(f"\ndemo stopped early: {e}", flush=True)
    finally:
        if bus.poll() is None:
            bus.kill()
            bus.wait()
        counters = obs.conn.proxy(obs.id).get("counters", {})
        obs.conn.close()
        if loaded:
            unload_modules()
    print("\n== summary ==")
    hdr = f"{'phase':<12} {'goal':<32} {'reached':<8} {'secs':>6}  {'default eff':>11} {'model eff':>9}  path"
    print(hdr)
    print("-" * len(hdr))
    for ph in phases:
        d, m = ph.mean(0), ph.mean(1)
        print(f"{ph.name:<12} {ph.goal:<32} {'yes' if ph.reached else 'NO':<8} {ph.end - ph.start:6.1f}  "
              f"{'-' if d is None else f'{d:.3f}':>11} {'-' if m is None else f'{m:.3f}':>9}  "
              f"{' -> '.join(ph.path) or '-'}")
    d, m = phases[0].mean(0), phases[0].mean(1)
    if d and m:
        print(f"good model vs the kernel's default: efficiency {m:.3f} vs {d:.3f} ({m / d:.2f}x), "
              "both measured by the kernel in the same run")
    learned = phases[4].mean(1)
    if d and learned:
        print(f"learned model (no model file given) vs the kernel's default: efficiency "
              f"{learned:.3f} vs {d:.3f} ({learned / d:.2f}x)")
    print("kernel counters: " + ", ".join(f"{k} {v}" for k, v in sorted(counters.items())))
    print("(efficiency is 1 for the optimal window; the default is the sample's fixed 8-page window)")
    return 0 if all(ph.reached for ph in phases) else 1


def picture_path(args: argparse.Namespace) -> Path:
    """Where the demo's PNG goes: ``--plot``, else ``vm-out/demo.png`` in the work folder."""
    if args.plot:
        return Path(args.plot).resolve()
    from kmlbus.vm import project_root

    return project_root() / "vm-out" / "demo.png"


def draw_picture(trace: Path, png: Path) -> None:
    """Draw the demo's trace and print where the picture is (a failure is one line)."""
    from kmlbus.bus.tracefile import TraceError
    from kmlbus.tools import plot

    try:
        run = plot.load_run(trace, "sample")
    except TraceError as e:
        print(f"demo: no picture: {e}", flush=True)
        return
    plot.draw(run, png, title=f"kmlbus demo: proxy sample, {run.duration:.0f} s, "
                              f"modes {', '.join(run.modes_seen())}")
    print(f"demo: picture of the run (modes, per-arm efficiency, decisions/s): {png}", flush=True)


def main(args: argparse.Namespace) -> int:
    """``kmlbus demo``: here if this kernel can take the module, else inside the VM."""
    png = picture_path(args)
    if args.here or can_load_modules():
        trace = Path(args.trace).resolve() if args.trace else png.with_suffix(".kmltrace")
        code = run_here(args.seconds, trace)
    else:
        from kmlbus import vm

        trace = vm.project_root() / "vm-out" / "demo.kmltrace"  # a folder the guest shares
        print("kmlbus demo: this kernel cannot load modules; booting the Debian kernel under QEMU",
              flush=True)
        code = vm.run([sys.executable, "-m", "kmlbus", "demo", "--here", "--seconds", str(args.seconds),
                       "--trace", str(trace), "--no-picture"], timeout=args.seconds * 4 + 500)
    if not args.no_picture:
        if trace.exists():
            draw_picture(trace, png)
        else:
            print(f"demo: no trace was recorded at {trace}, so no picture", flush=True)
    return code
