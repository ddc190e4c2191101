"""``kmlbus plot TRACE -o FILE.png``: one proxy's run as a picture.

A trace (:mod:`kmlbus.bus.tracefile`) is read into a :class:`Run` (plain
arrays on one time axis, seconds since the first record), and :func:`draw`
makes three stacked panels that share that axis:

* per-arm efficiency over time (the kernel's feedback records, by their arm);
* decisions per second (telemetry records, by the arm that decided);
* the mode as a step line, with every transition annotated by its reason.

The mode is also shaded behind every panel, so a change in efficiency or
rate can be read against the mode it happened in.  The mode comes from the
telemetry itself (each sample carries the mode it was decided in) and from the
recorded mode events, so a run whose bus was restarted in between still shows
what the kernel did; stretches with no records at all are left unshaded.

The figure is drawn with matplotlib's object API (no pyplot, no global
backend; imported only when drawing), so benchmarks can call :func:`draw` or the panel helpers
(:func:`shade_modes`, :func:`efficiency_panel`, ...) on their own figures.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from kmlbus.bus.tracefile import TraceError, open_trace
from kmlbus.contract import spec as _spec

if TYPE_CHECKING:  # matplotlib is imported when drawing, so the CLI starts without it
    from matplotlib.axes import Axes

__all__ = [
    "MODE_COLOURS",
    "Run",
    "Transition",
    "decisions_panel",
    "draw",
    "efficiency_panel",
    "load_run",
    "main",
    "mode_panel",
    "shade_modes",
]

#: Shading of each mode (the spec's mode names), from "the kernel alone" to "the model alone".
MODE_COLOURS = {"emergency": "#e45756", "learning": "#f2cf5b", "collaboration": "#76b7b2",
                "recommendation": "#59a14f"}
ARM_COLOURS = {"default": "#4e79a7", "model": "#f28e2b"}
#: Records further apart than this (seconds) leave a gap in the mode bands (no bus, no data).
GAP_S = 3.0
#: Width of the bins efficiency and rates are averaged over (seconds).
BIN_S = 1.0


@dataclass(frozen=True)
class Transition:
    """A recorded mode change: seconds into the run, from, to, the kernel's reason."""

    t: float
    old: str
    new: str
    reason: str


@dataclass
class Run:
    """One proxy's recorded run, ready to draw; times are seconds since ``t0_ns``."""

    proxy: str
    t0_ns: int
    #: (start, end, mode) stretches where the mode is known
    spans: list[tuple[float, float, str]] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    #: per feedback record: time, arm name, efficiency (real value, scale applied)
    fb_t: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    fb_arm: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    fb_eff: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    #: per telemetry record: time and the arm that decided
    dec_t: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    dec_arm: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def duration(self) -> float:
        """Seconds from the first to the last record."""
        ends = [s[1] for s in self.spans] + [float(a.max()) for a in (self.fb_t, self.dec_t) if len(a)]
        return max(ends, default=0.0)

    def modes_seen(self) -> list[str]:
        """The modes the run spent time in, in the spec's order."""
        seen = {m for _, _, m in self.spans}
        return [m for m in _spec.load().enums["mode"].entries if m in seen]


def load_run(path: str | Path, proxy: str | None = None) -> Run:
    """Read a trace into a :class:`Run` of *proxy* (default: the first one recorded).

    Raises :class:`~kmlbus.bus.tracefile.TraceError` for an unreadable trace or one
    without records of *proxy*.
    """
    sp = _spec.load()
    modes, reasons = sp.enums["mode"], sp.enums["reason"]
    reader = open_trace(path)
    scale = 1000.0
    points: list[tuple[int, int]] = []  # (ts ns, mode number) in record order
    events: list[tuple[int, int, int, int]] = []  # (ts, old, new, reason)
    fb: list[tuple[int, npt.NDArray[np.void]]] = []
    tel: list[tuple[int, npt.NDArray[np.void]]] = []
    for ev in reader:
        if proxy is None:
            proxy = ev.proxy
        if ev.proxy != proxy:
            continue
        if ev.kind == "telemetry" and len(ev.data):
            tel.append((ev.ts, ev.data))
            points.append((ev.ts, int(ev.data["mode"][-1])))
        elif ev.kind == "feedback" and len(ev.data):
            fb.append((ev.ts, ev.data))
        elif ev.kind == "mode" and len(ev.data):
            row = ev.data[0]
            events.append((ev.ts, int(row["old_mode"]), int(row["mode"]), int(row["reason"])))
            points.append((ev.ts, int(row["mode"])))
    if proxy is None or not (tel or fb or events):
        raise TraceError(f"{path}: no records of proxy {proxy or '(any)'} to plot")
    sch = reader.schemas.get(proxy)
    if sch is not None:
        scale = float(sch.efficiency_scale) or 1000.0
    stamps = [t for t, _ in points] + [t for t, _ in fb] + [t for t, _ in tel]
    t0 = min(stamps)
    run = Run(proxy, t0)
    run.spans = _spans([((t - t0) / 1e9, modes.name_of(m)) for t, m in sorted(points)])
    run.transitions = [Transition((t - t0) / 1e9, modes.name_of(o), modes.name_of(n),
                                  reasons.name_of(r)) for t, o, n, r in events]
    if fb:
        run.fb_t = np.concatenate([np.full(len(a), (t - t0) / 1e9) for t, a in fb])
        run.fb_arm = np.concatenate([a["arm"].astype(np.int64) for _, a in fb])
        run.fb_eff = np.concatenate([a["efficiency"].astype(np.float64) for _, a in fb]) / scale
    if tel:
        run.dec_t = np.concatenate([np.full(len(a), (t - t0) / 1e9) for t, a in tel])
        run.dec_arm = np.concatenate([a["arm"].astype(np.int64) for _, a in tel])
    return run


def _spans(points: Sequence[tuple[float, str]]) -> list[tuple[float, float, str]]:
    """Collapse (time, mode) points into stretches; a silence over :data:`GAP_S` ends one."""
    out: list[tuple[float, float, str]] = []
    for i, (t, mode) in enumerate(points):
        nxt = points[i + 1][0] if i + 1 < len(points) else t
        end = nxt if nxt - t <= GAP_S else t
        if out and out[-1][2] == mode and out[-1][1] >= t:
            out[-1] = (out[-1][0], max(out[-1][1], end), mode)
        else:
            out.append((t, end, mode))
    return [s for s in out if s[1] > s[0]] or out[:1]


# -- panels ---------------------------------------------------------------------------------


def shade_modes(ax: Axes, spans: Iterable[tuple[float, float, str]], alpha: float = 0.18) -> None:
    """Shade each (start, end, mode) stretch in its mode's colour behind *ax*'s data."""
    for start, end, mode in spans:
        ax.axvspan(start, max(end, start + 1e-3), color=MODE_COLOURS.get(mode, "#bbbbbb"),
                   alpha=alpha, lw=0, zorder=0)


def _bins(end: float) -> npt.NDArray[np.float64]:
    """Edges of :data:`BIN_S` bins from 0 past *end*."""
    return np.arange(0.0, max(end, BIN_S) + BIN_S, BIN_S)


def efficiency_panel(ax: Axes, run: Run) -> None:
    """Mean efficiency per arm in :data:`BIN_S` bins (the kernel's feedback)."""
    arms = _spec.load().enums["arm"]
    edges = _bins(run.duration)
    mid = (edges[:-1] + edges[1:]) / 2
    for name in arms.entries:
        sel = run.fb_arm == arms.value(name)
        if not sel.any():
            continue
        n, _ = np.histogram(run.fb_t[sel], edges)
        s, _ = np.histogram(run.fb_t[sel], edges, weights=run.fb_eff[sel])
        mean = np.divide(s, n, out=np.full(len(n), np.nan), where=n > 0)
        ax.plot(mid, mean, ".-", ms=3, lw=1.2, color=ARM_COLOURS.get(name), label=f"{name} arm")
    ax.set_ylabel("efficiency")
    ax.legend(loc="upper left", fontsize="small")


def decisions_panel(ax: Axes, run: Run) -> None:
    """Decisions per second, by the arm that made them (the telemetry records)."""
    arms = _spec.load().enums["arm"]
    edges = _bins(run.duration)
    mid = (edges[:-1] + edges[1:]) / 2
    total, _ = np.histogram(run.dec_t, edges)
    for name in arms.entries:
        n, _ = np.histogram(run.dec_t[run.dec_arm == arms.value(name)], edges)
        # a bin without any telemetry is a silence of the trace (no bus), not an idle kernel
        rate = np.where(total > 0, n / BIN_S, np.nan)
        ax.plot(mid, rate, lw=1.2, color=ARM_COLOURS.get(name), label=f"by {name}")
    ax.set_ylabel("decisions/s")
    ax.legend(loc="upper left", fontsize="small")


def mode_panel(ax: Axes, run: Run) -> None:
    """The mode as a step line over the spec's modes, each transition annotated with its reason."""
    names = list(_spec.load().enums["mode"].entries)
    level = {m: i for i, m in enumerate(names)}
    for start, end, mode in run.spans:
        ax.plot([start, end], [level[mode]] * 2, lw=4, color=MODE_COLOURS.get(mode, "k"),
                solid_capstyle="butt")
    for i, tr in enumerate(run.transitions):
        ax.axvline(tr.t, color="#555555", lw=0.6, ls="--")
        ax.annotate(f"{tr.old}\u2192{tr.new}\n({tr.reason})", (tr.t, level.get(tr.new, 0)),
                    xytext=(4, (-22, 10, 24)[i % 3]), textcoords="offset points", fontsize=7,
                    color="#333333")
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(-0.7, len(names) - 0.3)
    ax.set_ylabel("mode")


def draw(run: Run, out: str | Path, *, title: str | None = None,
         size: tuple[float, float] = (12.0, 8.0), dpi: int = 100) -> Path:
    """Draw *run* into the PNG *out* (``size`` inches at ``dpi``); returns its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2, 2]})
    efficiency_panel(axes[0], run)
    decisions_panel(axes[1], run)
    mode_panel(axes[2], run)
    for ax in axes:
        shade_modes(ax, run.spans)
        ax.grid(True, alpha=0.3)
    axes[2].set_xlabel("seconds since the first record")
    axes[0].set_xlim(0, max(run.duration, BIN_S))
    fig.suptitle(title or f"kmlbus: proxy {run.proxy}, {run.duration:.0f} s, "
                 f"modes {', '.join(run.modes_seen()) or '-'}")
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, format="png")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``kmlbus plot TRACE -o FILE.png [--proxy NAME]``; prints the PNG's path."""
    ap = argparse.ArgumentParser(prog="kmlbus plot", description=__doc__.split("\n")[0])
    add_arguments(ap)
    return run_command(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The command's arguments (shared by ``kmlbus plot`` and ``python -m kmlbus.tools.plot``)."""
    ap.add_argument("trace", help="a trace written by the bus ([bus] trace in its config)")
    ap.add_argument("-o", "--output", required=True, help="PNG file to write")
    ap.add_argument("--proxy", help="proxy to draw (default: the first recorded)")
    ap.add_argument("--title", help="figure title")


def run_command(args: argparse.Namespace) -> int:
    """Draw the trace named by *args*; a bad trace is one line on stderr, exit 1."""
    import sys

    try:
        run = load_run(args.trace, args.proxy)
    except TraceError as e:
        print(f"kmlbus plot: {e}", file=sys.stderr)
        return 1
    print(draw(run, args.output, title=args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
