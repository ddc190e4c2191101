"""Every command behaves in a pipe: a reader that stops early ends it quietly, as Unix tools do.

The commands run as real processes writing into a real pipe whose reading end is
already closed, so their first write that reaches the pipe fails with EPIPE.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kmlbus.bus.tracefile import TraceWriter
from kmlbus.wire import codec

ROOT = Path(__file__).resolve().parent.parent


def run_into_closed_pipe(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """``python -m kmlbus ARGV`` with stdout a pipe nobody reads any more."""
    r, w = os.pipe()
    os.close(r)
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        return subprocess.run([sys.executable, "-m", "kmlbus", *argv], stdout=w,
                              stderr=subprocess.PIPE, env=env, timeout=120, check=False)
    finally:
        os.close(w)


def big_trace(path: Path, proxies: int = 200) -> None:
    """A trace whose ``show`` summary runs to many kilobytes (one entry per proxy)."""
    tel = np.zeros(3, codec.struct_dtype("sample"))
    with TraceWriter(path) as w:
        for i in range(proxies):
            w.telemetry(f"proxy-{i:04d}", tel, ts=i + 1)


def test_a_command_whose_reader_went_away_exits_quietly(tmp_path: Path) -> None:
    trace = tmp_path / "t.kmltrace"
    big_trace(trace)
    done = run_into_closed_pipe("trace", "show", str(trace))
    assert done.stderr == b"", done.stderr.decode()
    assert done.returncode == 128 + signal.SIGPIPE


@pytest.mark.parametrize("argv", [["--help"], ["status", "--help"], ["trace", "--help"]])
def test_help_into_a_closed_pipe_says_nothing(argv: list[str]) -> None:
    done = run_into_closed_pipe(*argv)
    assert done.stderr == b"", done.stderr.decode()
    assert done.returncode in (0, 128 + signal.SIGPIPE)


def test_the_same_command_into_a_reader_that_stays_exits_zero(tmp_path: Path) -> None:
    trace = tmp_path / "t.kmltrace"
    big_trace(trace)
    done = subprocess.run([sys.executable, "-m", "kmlbus", "trace", "show", str(trace)],
                          capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          timeout=120, check=False)
    assert done.returncode == 0 and b"proxy-0199" in done.stdout, done.stderr.decode()


def test_head_takes_the_start_and_the_command_says_nothing(tmp_path: Path) -> None:
    """The shell form of the issue: ``kmlbus trace show T | head -c 600``."""
    trace = tmp_path / "t.kmltrace"
    big_trace(trace, proxies=2000)
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c",
         f"{sys.executable} -m kmlbus trace show {trace} | head -c 600"],
        capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120, check=False)
    assert len(done.stdout) == 600
    assert done.stderr == b"", done.stderr.decode()
    assert done.returncode in (0, 128 + signal.SIGPIPE)
