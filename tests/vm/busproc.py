"""Run ``kmlbus run`` as a real daemon process for the VM tests.

The tests drive the daemon exactly as an operator would: a config file, a
model file, ``python -m kmlbus run`` in its own process, signals to stop it,
and the kernel's own counters and modes to judge it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kmlbus.bus import models
from kmlbus.wire import codec, netlink

__all__ = ["Daemon", "kernel_proxy", "wait_for"]

#: Python, numpy and onnxruntime start slowly under QEMU's TCG.
START_S = 240.0


def wait_for(what: str, cond: Callable[[], Any], timeout: float, every: float = 0.25) -> Any:
    """Poll *cond* until it returns something truthy; fail naming *what* on timeout."""
    end = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def kernel_proxy(name: str = "sample") -> dict[str, Any]:
    """The kernel's current view of proxy *name* (a fresh socket each time)."""
    with netlink.Connection() as c:
        return c.proxy(name)


def kernel_mode(name: str = "sample") -> str:
    return codec.enum_name("mode", int(kernel_proxy(name)["mode"]))


class Daemon:
    """``python -m kmlbus run`` with a model of our choosing, in *workdir*."""

    def __init__(self, workdir: Path, model: bytes | None = None, *, extra: str = "",
                 proxy: str | None = None, run_args: tuple[str, ...] = ()) -> None:
        """*extra*: more ``[bus]`` keys; *proxy*: the ``[proxy.sample]`` table's body
        instead of ``model = "model.onnx"`` (the model file is written either way);
        *run_args*: more arguments of ``kmlbus run`` (``--metrics ...``)."""
        self.run_args = run_args
        self.workdir = workdir
        self.model = workdir / "model.onnx"
        self.model.write_bytes(model if model is not None else models.to_bytes(models.sample_good_model()))
        self.config = workdir / "bus.toml"
        body = proxy if proxy is not None else 'model = "model.onnx"\n'
        self.config.write_text(
            "[bus]\nttl_ms = 300\nlatency_budget_ms = 500\n" + extra +
            "\n[proxy.sample]\n" + body, encoding="utf-8")
        self.log = workdir / "bus.log"
        self.env = dict(os.environ, KMLBUS_STATE=str(workdir / "state.json"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_attached: bool = True) -> Daemon:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "kmlbus", "run", "--config", str(self.config),
                                          *self.run_args],
                                         stdout=out, stderr=subprocess.STDOUT, env=self.env)
        if wait_attached:
            self.wait_attached()
        return self

    def wait_attached(self, timeout: float = START_S) -> int:
        """Wait until the kernel shows the sample proxy attached to some bus; its port id."""
        def attached() -> int:
            self.check_alive()
            try:
                return int(kernel_proxy().get("bus-portid", 0))
            except netlink.KmlbusError:
                return 0
        return int(wait_for("the daemon to attach to proxy sample", attached, timeout))

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"kmlbus run exited with {self.proc.returncode}:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def signal(self, sig: int) -> int:
        """Send *sig* and wait for the exit status."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=60)

    def cli(self, *args: str, timeout: float = START_S) -> subprocess.CompletedProcess[str]:
        """Run ``python -m kmlbus ARGS`` with this daemon's state file."""
        return subprocess.run([sys.executable, "-m", "kmlbus", *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout, check=False)
