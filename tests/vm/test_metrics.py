"""``kmlbus run --metrics`` against the real module: a scrape over loopback agrees with
``kmlbus status --json``, and ``status --json`` behaves in a pipe (issue 13)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kmlbus.contract import spec

from .busproc import Daemon, kernel_proxy, wait_for
from .conftest import LoadedModules

pytestmark = pytest.mark.vm
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
COUNTERS = [a.name for a in spec.load().attr_sets["counters"].attrs if a.type != "pad"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(m: Samples, name: str, **labels: str) -> float:
    return m[(name, tuple(sorted(dict(labels, proxy="sample").items())))]


@pytest.fixture
def served(modules: LoadedModules, tmp_path: Path) -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    d = Daemon(tmp_path, run_args=("--metrics", f"127.0.0.1:{port}")).start()
    try:
        yield d, port
    finally:
        d.stop()
        print("---- kmlbus run log (tail) ----\n" + d.output()[-4000:])


def test_a_scrape_over_loopback_agrees_with_status_json(served: tuple[Daemon, int]) -> None:
    d, port = served
    for mode in ("learning", "collaboration"):  # pinned: both arms decide, the mode holds still
        r = d.cli("mode", "sample", mode, "--pin")
        assert r.returncode == 0, r.stderr
    wait_for("both arms' efficiency on the endpoint", lambda: all(
        ("kmlbus_proxy_efficiency", (("arm", arm), ("proxy", "sample"))) in scrape(port)
        for arm in ("default", "model")), 120, every=1.0)
    first = scrape(port)
    r = d.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    (v,) = [v for v in json.loads(r.stdout) if v["name"] == "sample"]
    time.sleep(2.5)  # past the daemon's next housekeeping (once a second)
    second = scrape(port)
    # the kernel's counters only grow: status's live read lies between the two scrapes
    for c in COUNTERS:
        name = f"kmlbus_proxy_{c.replace('-', '_')}_total"
        assert value(first, name) <= v["counters"][c] <= value(second, name), c
    assert value(second, "kmlbus_proxy_decisions_model_total") > 0
    for mode in spec.load().enums["mode"].entries:
        assert value(first, "kmlbus_proxy_mode", mode=mode) == value(second, "kmlbus_proxy_mode", mode=mode) \
            == (mode == v["mode"] == "collaboration")
    assert value(first, "kmlbus_proxy_attached") == 1 and v["bus_portid"] != 0
    assert value(first, "kmlbus_proxy_mode_seconds") - 2 <= v["mode_s"] <= value(second, "kmlbus_proxy_mode_seconds") + 2
    # the daemon's side, from the state file that housekeeping writes with each publication
    scale = int(kernel_proxy()["efficiency-scale"])
    for arm in ("default", "model"):
        shown = v["bus"]["evidence"][f"{arm}_mean"] / scale
        scraped = [value(m, "kmlbus_proxy_efficiency", arm=arm) for m in (first, second)]
        assert min(abs(shown - s) for s in scraped) <= 0.1 * shown, (arm, shown, scraped)
    batches = v["bus"]["dispatch"]["batches"]
    assert value(first, "kmlbus_inference_latency_seconds_count") <= batches \
        <= value(second, "kmlbus_inference_latency_seconds_count")
    assert value(second, "kmlbus_inference_latency_seconds_bucket", le="+Inf") \
        == value(second, "kmlbus_inference_latency_seconds_count") > 0
    d.check_alive()


def test_status_json_into_head_exits_quietly(served: tuple[Daemon, int]) -> None:
    d, _ = served
    r = subprocess.run(["bash", "-o", "pipefail", "-c",
                        f"{sys.executable} -m kmlbus status --json | head -c 600"],
                       capture_output=True, env=d.env, timeout=240, check=False)
    assert len(r.stdout) == 600 and r.stderr == b"", r.stderr.decode()
    assert r.returncode in (0, 128 + signal.SIGPIPE)
    rd, wr = os.pipe()
    os.close(rd)  # a reader that is already gone: the first write fails
    try:
        r = subprocess.run([sys.executable, "-m", "kmlbus", "status", "--json"], stdout=wr,
                           stderr=subprocess.PIPE, env=d.env, timeout=240, check=False)
    finally:
        os.close(wr)
    assert r.stderr == b"" and r.returncode == 128 + signal.SIGPIPE, r.stderr.decode()
