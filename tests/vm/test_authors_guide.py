"""The author's guide's example, exactly as the page has it, against the real kmlbus.ko.

The blocks of ``docs/authors-guide.md`` marked ``file=NAME`` are written to a
folder; the module is built there with the guide's own command against the
running kernel's headers, loaded, its model made by the guide's script, and
``kmlbus run`` started with the guide's configuration.  The kernel must then
show the proxy ``hello`` attached to the bus, deciding, and applying the
model's recommendations.

The build and the model are made on the host by ``tests/support/guide_build.py``
when ``tests/run`` prepared the page's current text for this kernel (two steps
that took most of this test's two minutes under TCG); otherwise here.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kmlbus.vm import project_root
from kmlbus.vm.guest import insmod, is_loaded, rmmod
from kmlbus.wire import codec, netlink
from tests.support import guide_build
from tests.support.mdblocks import file_blocks

pytestmark = pytest.mark.vm

GUIDE = guide_build.GUIDE
#: Python, numpy and onnxruntime start slowly under QEMU's TCG; the climb takes its evidence.
CLIMB_S = 400.0


def hello() -> dict[str, Any] | None:
    """The kernel's view of proxy ``hello``, or None while it is not there."""
    try:
        with netlink.Connection() as c:
            return c.proxy("hello")
    except netlink.KmlbusError:
        return None


def mode(p: dict[str, Any]) -> str:
    return codec.enum_name("mode", int(p["mode"]))


def test_the_guides_module_builds_loads_and_takes_the_models_recommendations(
        kmlbus_module: int, tmp_path: Path) -> None:
    # the guide's commands run in its own folder: kmlbus must import from there as an installed
    # package would, whether this checkout is installed or only on the test's path
    path = os.pathsep.join(p for p in (str(project_root()), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, K=str(project_root() / "kernel"), PYTHONPATH=path)
    host_built = guide_build.prepared(os.uname().release)
    if guide_build.is_current(host_built):  # tests/run built the page's current text on the host
        shutil.copytree(host_built, tmp_path, dirs_exist_ok=True)
        built = (tmp_path / guide_build.BUILD_LOG).read_text()
    else:
        for name, text in file_blocks(GUIDE).items():
            (tmp_path / name).write_text(text, encoding="utf-8")
        build = subprocess.run(["sh", "build.sh"], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=600)
        built = build.stdout + build.stderr
        assert build.returncode == 0, built[-6000:]
        subprocess.run([sys.executable, "make_model.py"], cwd=tmp_path, env=env, check=True,
                       timeout=600)
    assert "warning:" not in built, built
    assert (tmp_path / "hello.onnx").is_file()
    insmod(tmp_path / "kmlbus_hello.ko")
    bus: subprocess.Popen[bytes] | None = None
    log = tmp_path / "bus.log"
    try:
        p = hello()
        assert p is not None and mode(p) == "emergency" and p["nkeys"] == 16
        assert [f["name"] for f in p["feature"]] == ["load"]
        assert p["recommendation"] == {"name": "window", "scale": 1, "min": 1, "max": 64}
        with open(log, "wb") as out:
            bus = subprocess.Popen([sys.executable, "-m", "kmlbus", "run", "--config", "hello.toml"],
                                   cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                   env=dict(env, KMLBUS_STATE=str(tmp_path / "state.json")))
        end = time.monotonic() + CLIMB_S
        seen: set[str] = set()
        while True:
            assert bus.poll() is None, f"kmlbus run exited {bus.returncode}:\n{log.read_text()[-3000:]}"
            p = hello()
            assert p is not None
            seen.add(mode(p))
            c = p["counters"]
            if (p["bus-portid"] and mode(p) in ("collaboration", "recommendation")
                    and c["decisions-model"] > 0 and c["recs-applied"] > 0):
                break
            assert time.monotonic() < end, (
                f"proxy hello did not take model decisions in {CLIMB_S:.0f} s: modes seen {seen}, "
                f"now {mode(p)}, counters {c}\n{log.read_text()[-3000:]}")
            time.sleep(1.0)
        assert c["decisions-default"] > 0 and c["feedback"] > 0
    finally:
        if bus is not None and bus.poll() is None:
            bus.send_signal(signal.SIGTERM)
            bus.wait(timeout=120)
        if is_loaded("kmlbus_hello"):
            rmmod("kmlbus_hello")
    assert hello() is None
