"""Learning from scratch against the real module (issue 3: the learner in the daemon).

``kmlbus run`` is given the sample proxy with ``learn = true`` and *no model*.
In learning the bus explores (the kernel applies its recommendations on the
``explore`` share only), fits a model from the kernel's feedback, and the
proxy climbs on that evidence.  The learned model must then beat the
kernel's own heuristic (the fixed 8-page window) in the kernel's own
measurements, taken in the same run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from kmlbus.contract import spec
from kmlbus.wire import codec, netlink

from .busproc import Daemon, kernel_mode, wait_for
from .conftest import LoadedModules

LEARN = 'learn = true\nexplore = 200\nlearn_every_s = 3\nlearned_model = "learned.onnx"\n'


def _efficiencies(conn: netlink.Connection, arm: int, n: int, timeout: float) -> np.ndarray:
    """At least *n* efficiencies of decisions made by *arm*, from the feedback stream."""
    got: list[np.ndarray] = []
    count, end = 0, time.monotonic() + timeout
    while count < n and time.monotonic() < end:
        for m in conn.recv(timeout=0.2):
            if m.op == "feedback":
                fb = m.attrs["feedback"]
                got.append(fb["efficiency"][fb["arm"] == arm].astype(np.float64))
                count += len(got[-1])
    return np.concatenate(got) if got else np.zeros(0)


def test_a_proxy_without_a_model_learns_one_that_beats_the_default(
        modules: LoadedModules, tmp_path: Path) -> None:
    sp = spec.load()
    arm_model = sp.enums["arm"].value("model")
    arm_default = sp.enums["arm"].value("default")
    assert kernel_mode() == "emergency"
    with netlink.Connection(groups=("telemetry",)) as tel:
        default = _efficiencies(tel, arm_default, 2000, 120)  # no bus: the heuristic alone
    assert len(default) >= 2000
    seen: list[tuple[str, str]] = []
    with netlink.Connection(groups=("events",)) as ev:
        d = Daemon(tmp_path, proxy=LEARN).start()
        try:
            def at_recommendation() -> bool:
                for m in ev.recv(timeout=0.1):
                    if m.op == "mode-event":
                        seen.append((codec.enum_name("mode", int(m.attrs["mode"])),
                                     codec.enum_name("reason", int(m.attrs.get("reason", 0)))))
                d.check_alive()
                return bool(seen) and seen[-1][0] == "recommendation"
            wait_for("the climb to recommendation on a learned model", at_recommendation, 420)
            assert [m for m, _ in seen[-3:]] == ["learning", "collaboration", "recommendation"], seen
            assert [r for _, r in seen[-2:]] == ["promotion", "promotion"], seen

            with netlink.Connection(groups=("telemetry",)) as tel:
                learned = _efficiencies(tel, arm_model, 2000, 120)
            assert kernel_mode() == "recommendation"
            assert len(learned) >= 2000, f"only {len(learned)} decisions by the learned model"
            # the sample's default (window 8) scores ~0.58; a learned w ~ 1 + 63 seq_ratio ~0.95
            assert learned.mean() > 1.2 * default.mean(), (learned.mean(), default.mean())

            views = json.loads(d.cli("status", "--json").stdout)
            bus = next(v for v in views if v["name"] == "sample")["bus"]
            assert bus["learning"]["fits"] >= 1, bus["learning"]
            assert str(bus["model"]).startswith("learned("), bus["model"]
            w = bus["learning"]["last_fit"]["weights"]
            assert w[0] > 20, w  # seq_ratio drives the window; the learner found it
            assert (tmp_path / "learned.onnx").stat().st_size > 0
        finally:
            d.stop()
