"""``kmlbus watch`` against the real module: a table in a pseudo-terminal, plain lines in a pipe."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import pytest

from .conftest import LoadedModules

pytestmark = pytest.mark.vm


def test_watch_draws_a_table_in_a_terminal_and_lines_in_a_pipe(modules: LoadedModules) -> None:
    master, slave = os.openpty()
    env = dict(os.environ, COLUMNS="140", TERM="xterm-256color")
    got = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    proc = subprocess.run([sys.executable, "-m", "kmlbus", "watch", "--seconds", "4"], stdout=slave,
                          stderr=subprocess.PIPE, env=env, timeout=240, check=False)
    os.close(slave)
    reader.join(timeout=10)
    os.close(master)
    assert proc.returncode == 0, proc.stderr.decode()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", got.decode("utf-8", "replace"))
    assert "\x1b[" in got.decode("utf-8", "replace")
    assert re.search(r"PROXY\s.*MODE\s.*FOR\s.*EFF default", text), text[-2000:]
    assert re.search(r"\bsample\b.*\bemergency\b", text), text[-2000:]

    piped = subprocess.run([sys.executable, "-m", "kmlbus", "watch", "--seconds", "3.5"], capture_output=True,
                           text=True, timeout=240, check=False)
    assert piped.returncode == 0, piped.stderr
    assert "\x1b[" not in piped.stdout
    lines = piped.stdout.splitlines()
    assert lines and all(re.fullmatch(r"\d\d:\d\d:\d\d sample: emergency for \S+s, efficiency default \S+ "
                                      r"model -, \d+ samples/s, \d+ feedback/s, \d+ drops", ln) for ln in lines), lines
