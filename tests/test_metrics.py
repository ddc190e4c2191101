"""``kmlbus run --metrics``: the Prometheus endpoint, scraped over loopback, says what the bus knows.

The daemon runs against the user-space stand-in in simulated time (as in
test_daemon_standin.py); between two steps nothing moves, so a scrape can be
compared number for number with :meth:`Bus.snapshot` and the stand-in's own
``get`` reply.  tests/vm/test_metrics.py does the same against the real module.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from kmlbus.bus import metrics, models
from kmlbus.bus.config import loads
from kmlbus.bus.daemon import Bus
from kmlbus.bus.latency import BOUNDS_NS, LatencyHistogram
from kmlbus.contract import spec
from kmlbus.tools import cli
from tests.support.standin import StandinKernel, StandinLink

SP = spec.load()
COUNTERS = [a.name for a in SP.attr_sets["counters"].attrs if a.type != "pad"]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``GET /metrics`` on 127.0.0.1:*port* -> {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def one(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return m[(name, tuple(sorted(labels.items())))]


class Served:
    """The daemon on a stand-in kernel, its metrics endpoint, and an observer link."""

    def __init__(self, tmp_path: Path) -> None:
        models.save(models.sample_good_model(), tmp_path / "model.onnx")
        cfg = loads('[bus]\nttl_ms = 300\nlatency_budget_ms = 500\n\n[proxy.sample]\nmodel = "model.onnx"\n',
                    tmp_path / "bus.toml")
        self.k = StandinKernel(seed=1)
        self.bus = Bus(cfg, clock=self.k.clock.now, opener=self.k.open, state_path=tmp_path / "state.json")
        self.watch: StandinLink = self.k.open(())
        self.endpoint = metrics.serve(self.bus, "127.0.0.1:0")

    def run(self, seconds: float, mode: str | None = None) -> None:
        end = self.k.clock.now() + seconds
        while self.k.clock.now() < end and (mode is None or self.k.find("sample").mode_name != mode):
            self.bus.step()

    def close(self) -> None:
        self.endpoint.close()
        self.bus.shutdown()


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    monkeypatch.setenv("KMLBUS_STATE", str(tmp_path / "state.json"))
    s = Served(tmp_path)
    yield s
    s.close()


def test_a_scrape_equals_the_kernels_counters_and_the_daemons_snapshot(served: Served) -> None:
    served.run(40, "recommendation")
    served.run(2.0)
    served.bus.housekeeping()  # publishes; nothing moves until the next step
    m = scrape(served.endpoint.port)
    kernel = served.watch.proxy("sample")
    snap = served.bus.snapshot()
    mine = snap["proxies"]["sample"]
    for c in COUNTERS:
        assert one(m, f"kmlbus_proxy_{c.replace('-', '_')}_total", proxy="sample") == kernel["counters"][c], c
    assert one(m, "kmlbus_proxy_decisions_model_total", proxy="sample") > 1000
    for mode in SP.enums["mode"].entries:
        assert one(m, "kmlbus_proxy_mode", proxy="sample", mode=mode) == (mode == mine["mode"] == "recommendation")
    assert one(m, "kmlbus_proxy_mode_seconds", proxy="sample") == pytest.approx(kernel["mode-ms"] / 1000, abs=1e-3)
    assert one(m, "kmlbus_proxy_mode_seconds", proxy="sample") == pytest.approx(mine["in_mode_s"], abs=0.2)
    assert one(m, "kmlbus_proxy_attached", proxy="sample") == 1
    scale = kernel["efficiency-scale"]
    for arm in ("default", "model"):  # an arm without decisions in the window has no mean
        mean = mine["evidence"][f"{arm}_mean"]
        key = ("kmlbus_proxy_efficiency", (("arm", arm), ("proxy", "sample")))
        assert m.get(key) == (None if mean is None else pytest.approx(mean / scale)), arm
    assert one(m, "kmlbus_proxy_efficiency", proxy="sample", arm="model") > 0.9
    batches = mine["dispatch"]["batches"]
    assert batches > 100
    assert one(m, "kmlbus_inference_latency_seconds_count", proxy="sample") == batches
    assert one(m, "kmlbus_inference_latency_seconds_bucket", proxy="sample", le="+Inf") == batches
    assert 0 < one(m, "kmlbus_inference_latency_seconds_sum", proxy="sample") <= (
        batches * mine["dispatch"]["max_batch_ns"] / 1e9)
    for kind in metrics.DISPATCH_ERRORS:
        assert one(m, "kmlbus_dispatch_errors_total", proxy="sample", kind=kind) == mine["dispatch"][kind]
    for kind in metrics.BUS_ERRORS:
        assert one(m, "kmlbus_bus_errors_total", kind=kind) == snap["stats"].get(kind, 0)
    assert one(m, "kmlbus_bus_reconnects_total") == snap["stats"]["reconnects"] == 0


def test_the_numbers_follow_the_bus_from_one_scrape_to_the_next(served: Served) -> None:
    served.run(3.0)
    served.bus.housekeeping()
    first = scrape(served.endpoint.port)
    served.run(3.0)
    served.bus.housekeeping()
    second = scrape(served.endpoint.port)
    key = ("kmlbus_proxy_samples_total", (("proxy", "sample"),))
    assert second[key] > first[key] > 0
    assert second[key] == served.watch.proxy("sample")["counters"]["samples"]


def test_before_the_first_housekeeping_the_endpoint_answers_without_proxies(served: Served) -> None:
    m = scrape(served.endpoint.port)
    assert not [k for k in m if k[0].startswith("kmlbus_proxy")]


@pytest.mark.parametrize("text, want", [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:0", ("::1", 0)), (":9464", ("0.0.0.0", 9464)),
    ("localhost:80", ("localhost", 80))])
def test_metrics_addresses(text: str, want: tuple[str, int]) -> None:
    assert metrics.parse_address(text) == want


@pytest.mark.parametrize("text", ["9464", "127.0.0.1", "127.0.0.1:port", "::1:9464", "h:70000", ""])
def test_a_malformed_metrics_address_is_refused_in_one_line(text: str) -> None:
    with pytest.raises(metrics.MetricsError, match="expected HOST:PORT"):
        metrics.parse_address(text)


def test_kmlbus_run_with_an_unusable_metrics_address_says_so_and_exits_2(
        served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bus.toml"
    cfg.write_text('[proxy.sample]\nmodel = "model.onnx"\n')
    busy = f"127.0.0.1:{served.endpoint.port}"  # already taken by the fixture's endpoint
    assert cli.main(["run", "--config", str(cfg), "--metrics", busy]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"metrics address {busy}: cannot listen" in out
    assert cli.main(["run", "--config", str(cfg), "--metrics", "nowhere"]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().out


@given(st.lists(st.integers(0, 3 * BOUNDS_NS[-1]), max_size=50))
def test_the_latency_histogram_counts_each_duration_in_every_bucket_at_or_above_it(durations: list[int]) -> None:
    h = LatencyHistogram()
    for d in durations:
        h.observe(d)
    cum = h.cumulative()
    assert [b for b, _ in cum[:-1]] == [b / 1e9 for b in BOUNDS_NS] and cum[-1] == (float("inf"), len(durations))
    for bound, n in cum:
        assert n == sum(1 for d in durations if d / 1e9 <= bound)
    assert h.sum_ns == sum(durations) and h.count == len(durations)
