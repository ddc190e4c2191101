"""``kmlbus watch``: every proxy live, as a refreshing table or as plain lines.

An independent observer of the family (any user may subscribe): it joins the
``events`` and ``telemetry`` groups and asks the kernel for its proxies once a
second.  :class:`WatchState` folds both into one row per proxy (mode, time in
it, per-arm efficiency and rates over the last few seconds, drops) plus the
latest transitions; :func:`run` shows it with rich on a terminal and, when
stdout is not a terminal (a pipe, a file, a log), as plain lines: each mode
event as it comes and one line per proxy per second, so ``grep`` and ``tail -f``
work on it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

import numpy as np

from kmlbus.contract import spec as _spec
from kmlbus.wire import codec

__all__ = ["Row", "Source", "Transition", "WatchState", "plain_line", "render", "run"]

#: Seconds of telemetry and feedback the rates and efficiencies are computed over.
WINDOW_S = 5.0
#: Latest transitions kept for the view.
TRANSITIONS = 8
MODE_STYLES = {"emergency": "bold red", "learning": "yellow", "collaboration": "cyan",
               "recommendation": "bold green"}


class Source(Protocol):
    """What the view needs of a connection joined to ``events`` and ``telemetry``."""

    def recv(self, timeout: float | None = None) -> list[codec.Message]: ...
    def proxies(self) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class Transition:
    """A mode change as announced by the kernel (``at``: wall-clock time)."""

    at: float
    proxy: str
    old: str
    new: str
    reason: str


@dataclass(frozen=True)
class Row:
    """One proxy as shown; efficiencies in real units, None when an arm made no decision."""

    id: int
    name: str
    mode: str
    in_mode_s: float
    efficiency: dict[str, float | None]
    samples_s: float
    feedback_s: float
    drops: int


@dataclass
class _Proxy:
    id: int
    name: str
    mode: str = "?"
    mode_since: float = 0.0  # on the state's clock
    scale: float = 1000.0
    drops: int = 0
    #: (time, samples) per telemetry batch; (time, arm number, count, efficiency sum) per feedback arm
    telemetry: deque[tuple[float, int]] = field(default_factory=deque)
    feedback: deque[tuple[float, int, int, float]] = field(default_factory=deque)


class WatchState:
    """What the observer knows; fed by :meth:`poll` (the kernel's dump) and :meth:`take` (messages)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, only: str | None = None,
                 window_s: float = WINDOW_S) -> None:
        self.clock = clock
        self.only = only
        self.window_s = window_s
        self.proxies: dict[int, _Proxy] = {}
        self.transitions: deque[Transition] = deque(maxlen=TRANSITIONS)
        sp = _spec.load()
        self._modes, self._reasons, self._arms = sp.enums["mode"], sp.enums["reason"], sp.enums["arm"]
        self._started = clock()

    @property
    def arms(self) -> tuple[str, ...]:
        """The spec's arm names, in order (the view's efficiency columns)."""
        return self._arms.entries

    def _wanted(self, pid: int, name: str) -> bool:
        return self.only is None or self.only in (name, str(pid))

    def poll(self, proxies: list[dict[str, Any]]) -> None:
        """The kernel's current view: names, modes, time in mode, drop counters."""
        now = self.clock()
        seen = set()
        for a in proxies:
            pid, name = int(a.get("id", 0)), str(a.get("name", ""))
            if not self._wanted(pid, name):
                continue
            seen.add(pid)
            p = self.proxies.setdefault(pid, _Proxy(pid, name))
            p.name = name
            p.mode = self._modes.name_of(int(a.get("mode", 0)))
            p.mode_since = now - int(a.get("mode-ms", 0)) / 1000.0
            p.scale = float(a.get("efficiency-scale", 0)) or 1000.0
            c = a.get("counters", {})
            p.drops = int(c.get("drops", 0)) + int(c.get("feedback-drops", 0))
        for gone in set(self.proxies) - seen:
            del self.proxies[gone]

    def take(self, m: codec.Message) -> Transition | None:
        """Fold one message in; returns the transition it announced, if it was a mode event."""
        pid = m.attrs.get("id")
        if not isinstance(pid, int):
            return None
        p = self.proxies.get(pid)
        now = self.clock()
        if m.op == "mode-event":
            name = str(m.attrs.get("name", p.name if p else pid))
            if not self._wanted(pid, name):
                return None
            if p is None:
                p = self.proxies[pid] = _Proxy(pid, name)
            p.mode = self._modes.name_of(int(m.attrs.get("mode", 0)))
            p.mode_since = now
            t = Transition(time.time(), name, self._modes.name_of(int(m.attrs.get("old-mode", 0))), p.mode,
                           self._reasons.name_of(int(m.attrs.get("reason", 0))))
            self.transitions.append(t)
            return t
        if p is None:
            return None
        if m.op == "telemetry":
            p.telemetry.append((now, len(m.attrs.get("records", ()))))
        elif m.op == "feedback":
            fb = m.attrs.get("feedback")
            if isinstance(fb, np.ndarray) and len(fb):
                for arm in np.unique(fb["arm"]):
                    eff = fb["efficiency"][fb["arm"] == arm]
                    p.feedback.append((now, int(arm), len(eff), float(eff.sum())))
        return None

    def rows(self) -> list[Row]:
        """Every watched proxy, by id, with rates and efficiencies over the last window."""
        now = self.clock()
        span = max(min(self.window_s, now - self._started), 1e-3)
        out = []
        for p in sorted(self.proxies.values(), key=lambda p: p.id):
            for q in (p.telemetry, p.feedback):
                while q and q[0][0] <= now - self.window_s:  # keep (now - window, now]
                    q.popleft()
            n: dict[int, int] = {}
            total: dict[int, float] = {}
            for _, arm, k, s in p.feedback:
                n[arm] = n.get(arm, 0) + k
                total[arm] = total.get(arm, 0.0) + s
            eff = {a: (total[self._arms.value(a)] / n[self._arms.value(a)] / p.scale
                       if n.get(self._arms.value(a)) else None) for a in self._arms.entries}
            out.append(Row(p.id, p.name, p.mode, max(now - p.mode_since, 0.0), eff,
                           sum(k for _, k in p.telemetry) / span,
                           sum(k for _, _, k, _ in p.feedback) / span, p.drops))
        return out


def _eff(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def plain_line(r: Row) -> str:
    """One proxy as one line (the view when stdout is not a terminal)."""
    effs = " ".join(f"{a} {_eff(e)}" for a, e in r.efficiency.items())
    return (f"{time.strftime('%H:%M:%S')} {r.name}: {r.mode} for {r.in_mode_s:.1f}s, efficiency {effs}, "
            f"{r.samples_s:.0f} samples/s, {r.feedback_s:.0f} feedback/s, {r.drops} drops")


def transition_line(t: Transition) -> str:
    return f"{time.strftime('%H:%M:%S', time.localtime(t.at))} {t.proxy}: {t.old} -> {t.new} ({t.reason})"


def render(state: WatchState) -> Any:
    """The terminal view: a table of proxies above the latest transitions (a rich renderable)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    arms = list(state.arms)
    t = Table(title="kmlbus proxies", title_justify="left", expand=False)
    for col in ("ID", "PROXY", "MODE", "FOR", *(f"EFF {a}" for a in arms), "SAMPLES/s", "FEEDBACK/s", "DROPS"):
        t.add_column(col, justify="left" if col in ("PROXY", "MODE") else "right")
    for r in state.rows():
        t.add_row(str(r.id), r.name, Text(r.mode, style=MODE_STYLES.get(r.mode, "")), f"{r.in_mode_s:.1f}s",
                  *(_eff(r.efficiency[a]) for a in arms), f"{r.samples_s:.0f}", f"{r.feedback_s:.0f}",
                  Text(str(r.drops), style="red" if r.drops else ""))
    if not state.rows():
        t.add_row("-", "no proxies", "", "", *("" for _ in arms), "", "", "")
    moves = Text("latest transitions:\n" if state.transitions else "no transitions yet", style="dim")
    for tr in reversed(state.transitions):
        moves.append(transition_line(tr) + "\n", style=MODE_STYLES.get(tr.new, ""))
    return Group(t, moves)


def run(conn: Source, out: TextIO, *, only: str | None = None, seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic, terminal: bool | None = None,
        refresh_s: float = 1.0) -> int:
    """Watch until *seconds* have passed (forever if None): a live table when *out* is a
    terminal (or *terminal* says so), else plain lines."""
    state = WatchState(clock, only=only)
    state.poll(conn.proxies())
    end = None if seconds is None else clock() + seconds
    tty = out.isatty() if terminal is None else terminal

    def loop(show: Callable[[], None], on_move: Callable[[Transition], None]) -> None:
        due = clock() + refresh_s
        while end is None or clock() < end:
            for m in conn.recv(timeout=0.2):
                t = state.take(m)
                if t is not None:
                    on_move(t)
            if clock() >= due:
                due += refresh_s
                state.poll(conn.proxies())
                show()

    if tty:
        from rich.console import Console
        from rich.live import Live

        console = Console(file=out, force_terminal=True)
        with Live(render(state), console=console, auto_refresh=False) as live:
            loop(lambda: live.update(render(state), refresh=True),
                 lambda _t: live.update(render(state), refresh=True))
        return 0

    def lines() -> None:
        for r in state.rows():
            print(plain_line(r), file=out, flush=True)

    loop(lines, lambda t: print(transition_line(t), file=out, flush=True))
    return 0
