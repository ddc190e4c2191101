"""``kmlbus watch``: one row per proxy on a terminal (through a pseudo-terminal), plain lines in a pipe.

The view watches the user-space stand-in of the family in simulated time: the
sample proxy decides 2000 times a second, and an operator's mode change is
announced on the events group, as the real module does.
"""

from __future__ import annotations

import fcntl
import io
import os
import re
import struct
import termios
import threading

import numpy as np
import pytest

from kmlbus.contract import spec
from kmlbus.tools import watch
from kmlbus.wire import codec
from tests.support.standin import StandinKernel

ARM = spec.load().enums["arm"]


def stand_in() -> tuple[StandinKernel, object]:
    """A stand-in kernel whose sample proxy an operator has just moved to learning."""
    k = StandinKernel(seed=1)
    link = k.open(("events", "telemetry"))
    with k.open(()) as ctl:
        ctl.set_mode(k.find("sample").id, "learning", "operator")
    return k, link


def test_plain_lines_say_each_transition_and_each_proxy_once_a_second() -> None:
    k, link = stand_in()
    out = io.StringIO()
    assert watch.run(link, out, seconds=3.05, clock=k.clock.now) == 0  # type: ignore[arg-type]
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d sample: emergency -> learning \(operator\)", lines[0]), lines[0]
    rows = lines[1:]
    assert len(rows) == 3, rows
    m = re.fullmatch(r"\d\d:\d\d:\d\d sample: learning for (\S+)s, efficiency default (\S+) model -, "
                     r"(\d+) samples/s, (\d+) feedback/s, 0 drops", rows[-1])
    assert m is not None, rows[-1]
    assert float(m[1]) == pytest.approx(3.0, abs=0.3)
    assert 0 < float(m[2]) <= 1
    assert int(m[3]) == pytest.approx(2000, rel=0.1) and int(m[4]) == pytest.approx(2000, rel=0.1)


def test_only_the_named_proxy_is_watched() -> None:
    k, link = stand_in()
    out = io.StringIO()
    watch.run(link, out, only="nosuch", seconds=2.05, clock=k.clock.now)  # type: ignore[arg-type]
    assert out.getvalue() == ""


def test_per_arm_efficiency_and_rates_come_from_the_last_window() -> None:
    now = [100.0]
    st = watch.WatchState(lambda: now[0], window_s=5.0)
    st.poll([{"id": 3, "name": "p", "mode": 2, "mode-ms": 4000, "efficiency-scale": 1000,
              "counters": {"drops": 7, "feedback-drops": 1}}])
    fb = np.zeros(4, codec.struct_dtype("feedback"))
    fb["arm"] = [ARM.value("default"), ARM.value("model"), ARM.value("model"), ARM.value("default")]
    fb["efficiency"] = [400, 900, 700, 600]
    for _ in range(6):  # six seconds of one feedback batch a second
        now[0] += 1.0
        st.take(codec.Message(0, 0, 0, 0, 0, "feedback", {"id": 3, "feedback": fb}))
    (r,) = st.rows()
    assert (r.name, r.mode, r.drops) == ("p", "collaboration", 8)
    assert r.in_mode_s == pytest.approx(10.0)
    assert r.efficiency == {"default": pytest.approx(0.5), "model": pytest.approx(0.8)}
    assert r.feedback_s == pytest.approx(5 * 4 / 5.0)  # the oldest batch fell out of the window


def test_a_terminal_gets_a_refreshing_table_of_proxies_and_transitions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "140")
    monkeypatch.setenv("TERM", "xterm-256color")
    k, link = stand_in()
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    got = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO once the slave side is closed
                return
            if not chunk:
                return
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    with os.fdopen(slave, "w", encoding="utf-8") as tty:
        assert tty.isatty()
        watch.run(link, tty, seconds=3.05, clock=k.clock.now)  # type: ignore[arg-type]
    reader.join(timeout=10)
    os.close(master)
    text = got.decode("utf-8", "replace")
    assert "\x1b[" in text  # colour and cursor movement: the live view, not lines
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert re.search(r"PROXY\s.*MODE\s.*FOR\s.*EFF default\s.*EFF model\s.*SAMPLES/s\s.*DROPS", plain), plain[-2000:]
    assert re.search(r"\bsample\b.*\blearning\b", plain)
    assert "sample: emergency -> learning (operator)" in plain
    assert plain.count("kmlbus proxies") >= 3  # redrawn once a second
