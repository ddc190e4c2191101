"""A fixed-bucket latency histogram the dispatcher fills on its hot path.

Each telemetry batch costs one :func:`bisect.bisect_left` and two additions;
readers (the metrics endpoint, ``kmlbus status``) take :meth:`LatencyHistogram.cumulative`,
the Prometheus shape: cumulative counts per upper bound, the last one +Inf.
The bounds are fixed so histograms from different runs and proxies add up.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

__all__ = ["BOUNDS_NS", "LatencyHistogram"]

#: Upper bounds of the buckets (ns): 50 µs to 1 s, about three per decade.
BOUNDS_NS: tuple[int, ...] = (
    50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 25_000_000, 50_000_000,
    100_000_000, 250_000_000, 500_000_000, 1_000_000_000)


@dataclass
class LatencyHistogram:
    """Counts of observed durations per bucket of :data:`BOUNDS_NS` (the last: above them all)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS_NS) + 1))
    sum_ns: int = 0

    def observe(self, ns: int) -> None:
        """Count one duration of *ns* nanoseconds (a value equal to a bound falls in its bucket)."""
        self.counts[bisect_left(BOUNDS_NS, ns)] += 1
        self.sum_ns += ns

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound in seconds, observations at or below it)``, ending with ``(inf, count)``."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, n in zip((*(b / 1e9 for b in BOUNDS_NS), float("inf")), list(self.counts)):
            total += n
            out.append((bound, total))
        return out
