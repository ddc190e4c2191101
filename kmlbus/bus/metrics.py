"""Prometheus metrics of a running bus: ``kmlbus run --metrics ADDR:PORT``.

A collector, not a set of live metric objects: at each scrape it reads what
the daemon's loop last published (:attr:`kmlbus.bus.daemon.Bus.published`,
replaced whole once a second by housekeeping: the kernel's ``get`` dump and the
daemon's snapshot of the same moment), so the HTTP thread never touches state
the loop is changing, and the numbers agree with ``kmlbus status --json``.

What is exported (``proxy`` label = the proxy's name):

* ``kmlbus_proxy_<counter>_total``: every counter of the kernel's ``counters``
  attribute set, named and documented from the family spec (drops included);
* ``kmlbus_proxy_mode{mode}``: 1 for the kernel's current mode, 0 for the others;
* ``kmlbus_proxy_mode_seconds``: time in the current mode (the kernel's ``mode-ms``);
* ``kmlbus_proxy_attached``: 1 when this bus is the proxy's attached bus;
* ``kmlbus_proxy_efficiency{arm}``: the bus's mean efficiency per arm over its
  evidence window, in real units (the kernel's fixed point / ``efficiency-scale``);
* ``kmlbus_inference_latency_seconds``: histogram of the time from a telemetry
  batch to its recommendations, model inference included (the dispatcher's);
* ``kmlbus_dispatch_errors_total{kind}``, ``kmlbus_bus_errors_total{kind}``,
  ``kmlbus_bus_reconnects_total``: what went wrong, per proxy and for the bus.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from kmlbus.contract import spec as _spec

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer
    import threading

    from kmlbus.bus.daemon import Bus

__all__ = ["BusCollector", "MetricsError", "MetricsServer", "parse_address", "serve"]

log = logging.getLogger(__name__)

#: the dispatcher's counters that count failures (``kmlbus_dispatch_errors_total{kind}``)
DISPATCH_ERRORS = ("errors", "bad_keys", "nonfinite", "over_budget")
#: the daemon's stats that count failures (``kmlbus_bus_errors_total{kind}``)
BUS_ERRORS = ("malformed", "send_errors", "refused_moves", "socket_overruns")


class MetricsError(ValueError):
    """A metrics address that cannot be served (one line, for the operator)."""


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (all interfaces) -> (host, port)."""
    m = re.fullmatch(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:]*)):(?P<port>\d+)", text.strip())
    if m is None or not 0 <= int(m["port"]) <= 65535:
        raise MetricsError(f"metrics address {text!r}: expected HOST:PORT (e.g. 127.0.0.1:9464, "
                           "[::1]:9464 or :9464 for every interface)")
    return (m["v6"] or m["host"] or "0.0.0.0"), int(m["port"])


def _le(bound: float) -> str:
    """A bucket's upper bound as Prometheus writes it (``+Inf`` for the last)."""
    return "+Inf" if bound == float("inf") else repr(bound)


def _snake(name: str) -> str:
    return name.replace("-", "_")


class BusCollector(Collector):
    """Builds every metric family from the bus's last published state at scrape time."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        sp = _spec.load()
        self.counters = [a for a in sp.attr_sets["counters"].attrs if a.type != "pad"]
        self.modes = sp.enums["mode"].entries
        self.arms = sp.enums["arm"].entries

    def collect(self) -> Iterator[Metric]:
        pub = self.bus.published
        if pub is None:  # before the first housekeeping: nothing measured yet
            return
        kernel, snap = pub.kernel, pub.snapshot
        yield from self._kernel(kernel, self.bus.clock() - pub.at, int(snap.get("portid", 0)))
        yield from self._evidence(kernel, snap.get("proxies", {}))
        yield self._latency()
        stats = snap.get("stats", {})
        errs = CounterMetricFamily("kmlbus_bus_errors", "The daemon's failures by kind: malformed "
                                   "messages, refused sends, refused mode moves, socket overruns",
                                   labels=["kind"])
        for kind in BUS_ERRORS:
            errs.add_metric([kind], float(stats.get(kind, 0)))
        yield errs
        yield CounterMetricFamily("kmlbus_bus_reconnects", "Times the daemon lost the family and "
                                  "reconnected (module reloaded)", value=float(stats.get("reconnects", 0)))

    def _kernel(self, kernel: dict[str, dict[str, Any]], age: float, portid: int) -> Iterator[Metric]:
        """The kernel's own view of every proxy: counters, mode, time in mode, attachment."""
        fams = {a.name: CounterMetricFamily(f"kmlbus_proxy_{_snake(a.name)}",
                                            a.doc or f"kernel counter {a.name}", labels=["proxy"])
                for a in self.counters}
        mode = GaugeMetricFamily("kmlbus_proxy_mode", "1 for the proxy's current interaction mode "
                                 "(the kernel's), 0 for the others", labels=["proxy", "mode"])
        secs = GaugeMetricFamily("kmlbus_proxy_mode_seconds", "Seconds since the proxy's last "
                                 "mode change (the kernel's mode-ms)", labels=["proxy"])
        att = GaugeMetricFamily("kmlbus_proxy_attached", "1 when this bus is the proxy's attached "
                                "bus", labels=["proxy"])
        for name, a in sorted(kernel.items()):
            counters = a.get("counters", {})
            for c in self.counters:
                fams[c.name].add_metric([name], float(counters.get(c.name, 0)))
            current = int(a.get("mode", 0))
            for i, m in enumerate(self.modes):
                mode.add_metric([name, m], 1.0 if i == current else 0.0)
            secs.add_metric([name], int(a.get("mode-ms", 0)) / 1000.0 + age)
            att.add_metric([name], 1.0 if portid and int(a.get("bus-portid", 0)) == portid else 0.0)
        yield from fams.values()
        yield from (mode, secs, att)

    def _evidence(self, kernel: dict[str, dict[str, Any]], proxies: dict[str, Any]) -> Iterator[Metric]:
        """The daemon's per-arm efficiency and dispatch failures of the proxies it serves."""
        eff = GaugeMetricFamily("kmlbus_proxy_efficiency", "Mean efficiency of each arm's "
                                "decisions over the bus's evidence window (real units)",
                                labels=["proxy", "arm"])
        errs = CounterMetricFamily("kmlbus_dispatch_errors", "Dispatcher failures by kind: model "
                                   "errors, keys out of range, NaN outputs, batches over the "
                                   "latency budget", labels=["proxy", "kind"])
        for name, st in sorted(proxies.items()):
            scale = float(kernel.get(name, {}).get("efficiency-scale", 0)) or 1000.0
            ev = st.get("evidence", {})
            for arm in self.arms:
                mean = ev.get(f"{arm}_mean")
                if mean is not None:
                    eff.add_metric([name, arm], float(mean) / scale)
            d = st.get("dispatch", {})
            for kind in DISPATCH_ERRORS:
                errs.add_metric([name, kind], float(d.get(kind, 0)))
        yield eff
        yield errs

    def _latency(self) -> Metric:
        h = HistogramMetricFamily("kmlbus_inference_latency_seconds", "Time from a telemetry batch "
                                  "to its recommendations, model inference included",
                                  labels=["proxy"])
        for name, lat in sorted(dict(self.bus.dispatcher.latency).items()):
            cum = lat.cumulative()
            h.add_metric([name], [(_le(b), float(n)) for b, n in cum],
                         sum_value=lat.sum_ns / 1e9)
        return h


@dataclass
class MetricsServer:
    """A running endpoint; :meth:`close` stops it."""

    server: WSGIServer
    thread: threading.Thread
    host: str

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve(bus: Bus, address: str) -> MetricsServer:
    """Serve *bus*'s metrics on ``http://ADDRESS/metrics`` from a background thread.

    Port 0 picks a free port (:attr:`MetricsServer.port`).  Raises
    :class:`MetricsError` when the address is malformed or cannot be bound.
    """
    host, port = parse_address(address)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BusCollector(bus))
    try:
        server, thread = start_http_server(port, host, registry=registry)
    except OSError as e:
        raise MetricsError(f"metrics address {address}: cannot listen: {e.strerror or e}") from None
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return MetricsServer(server, thread, host)
