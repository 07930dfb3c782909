"""Prometheus metrics for ``/metrics``: what the mirror served, from where, and how its upstreams are doing.

Counters are bumped on the request path (a dict lookup and an add); everything that can be read off live
state -- in-flight fetches, circuit states, Docker Hub's remaining pull allowance, the hit ratio -- is
computed when Prometheus scrapes, not kept up to date on every request. Each app has its own registry, so
several mirrors in one process (tests) do not mix their numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CIRCUIT_VALUES = {"closed": 0, "half-open": 1, "open": 2}
SAVED = frozenset({"hit", "join"})  # bytes that went to a client without the upstream sending them for it


class LiveState(Collector):
    """Gauges read at scrape time from callables the app provides."""

    def __init__(
        self,
        inflight: Callable[[], int],
        upstreams: Callable[[], Iterable[tuple[str, str, int | None]]],
        served: Callable[[], tuple[float, float]],
    ) -> None:
        self._inflight = inflight
        self._upstreams = upstreams  # (registry, circuit state, rate limit remaining)
        self._served = served  # (hit bytes, all bytes)

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("dao_mirror_inflight_fetches", "Upstream blob fetches running now.", self._inflight())
        circuit = GaugeMetricFamily(
            "dao_mirror_circuit_state", "Per upstream: 0 closed, 1 half-open, 2 open.", labels=["registry"]
        )
        remaining = GaugeMetricFamily(
            "dao_mirror_upstream_ratelimit_remaining",
            "Pulls the upstream says are left in its window (Docker Hub's ratelimit-remaining header).",
            labels=["registry"],
        )
        for registry, state, left in self._upstreams():
            circuit.add_metric([registry], CIRCUIT_VALUES[state])
            if left is not None:
                remaining.add_metric([registry], left)
        yield circuit
        yield remaining
        hit, total = self._served()
        yield GaugeMetricFamily(
            "dao_mirror_cache_hit_ratio", "Share of bytes served from the cache.", hit / total if total else 0.0
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dao_mirror_requests", "Requests by route, method and status.", ["route", "method", "status"], registry=r
        )
        self.served_bytes = Counter(
            "dao_mirror_served_bytes", "Bytes sent to clients, by cache outcome.", ["cache"], registry=r
        )
        self.saved_bytes = Counter(
            "dao_mirror_saved_bytes", "Bytes clients got that the upstream did not send for them.", registry=r
        )
        self.upstream_bytes = Counter(
            "dao_mirror_upstream_bytes", "Blob bytes fetched from upstream.", ["registry"], registry=r
        )
        self.upstream_seconds = Histogram(
            "dao_mirror_upstream_request_seconds",
            "Upstream manifest/blob-start latency (until the answer's headers).",
            ["registry", "kind"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.bucket_requests = Counter(
            "dao_mirror_bucket_requests", "Requests to the object storage, by operation.", ["op"], registry=r
        )
        self.redis_calls = Counter("dao_mirror_redis_calls", "Calls to Redis, by purpose.", ["what"], registry=r)
        self.evictions = Counter("dao_mirror_evictions", "Blobs removed to keep the cache in bounds.", registry=r)
        self._hit_bytes = 0.0
        self._all_bytes = 0.0

    def watch(
        self, inflight: Callable[[], int], upstreams: Callable[[], Iterable[tuple[str, str, int | None]]]
    ) -> None:
        self.registry.register(LiveState(inflight, upstreams, lambda: (self._hit_bytes, self._all_bytes)))

    def served(self, cache: str, nbytes: int) -> None:
        if nbytes <= 0:
            return
        self.served_bytes.labels(cache).inc(nbytes)
        self._all_bytes += nbytes
        if cache in SAVED:
            self.saved_bytes.inc(nbytes)
        if cache == "hit":
            self._hit_bytes += nbytes

    def render(self) -> bytes:
        return generate_latest(self.registry)
