"""coild's metrics and its small HTTP endpoint: /healthz, /readyz and /metrics.

/healthz answers 200 while the process serves. /readyz answers 200 when the state is rebuilt, the
allocator answered lately and the routes are synced, else 503 with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from coil_grpc.http import BoundedHTTPServer, Page
from coil_grpc.http import serve_http as serve_http_routes


class AgentMetrics:
    """Metrics in their own registry; implements the agent's `AgentEvents`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.allocations = Counter(
            "coild_allocations",
            "Attachments given addresses, by pool.",
            ["pool"],
            registry=self.registry,
        )
        self.releases = Counter(
            "coild_released_addresses", "Addresses released.", registry=self.registry
        )
        self.errors = Counter(
            "coild_errors",
            "Failed requests, by RPC method and gRPC code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "coild_rpc_duration_seconds",
            "Time to answer the CNI plugin, by method.",
            ["method"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.batches = Histogram(
            "coild_batch_size",
            "Items per allocator call (group commit), by kind.",
            ["kind"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.latency.labels(method).observe(seconds)
        if code != "OK":
            self.errors.labels(method, code).inc()

    def allocated(self, pool: str, seconds: float) -> None:
        self.allocations.labels(pool).inc()

    def released(self, count: int) -> None:
        self.releases.inc(count)

    def failed(self, operation: str, kind: str) -> None:
        self.errors.labels(operation, kind).inc()

    def batch(self, kind: str, size: int) -> None:
        self.batches.labels(kind).observe(size)

    def watch_blocks(self, blocks: Callable[[], list[tuple[str, int, int, int]]]) -> None:
        """Export blocks and addresses per pool and family from `blocks()`:
        (pool, family, used, capacity) per block."""
        self.registry.register(_BlockCollector(blocks))


class _BlockCollector(Collector):
    def __init__(self, blocks: Callable[[], list[tuple[str, int, int, int]]]) -> None:
        self._blocks = blocks

    def collect(self) -> Any:
        held = GaugeMetricFamily(
            "coild_blocks", "Blocks held by this node.", labels=["pool", "family"]
        )
        used = GaugeMetricFamily(
            "coild_addresses_used", "Addresses in use on this node.", labels=["pool", "family"]
        )
        total = GaugeMetricFamily(
            "coild_addresses_capacity",
            "Addresses in this node's blocks.",
            labels=["pool", "family"],
        )
        sums: dict[tuple[str, str], list[int]] = {}
        for pool, family, u, c in self._blocks():
            s = sums.setdefault((pool, f"ipv{family}"), [0, 0, 0])
            s[0] += 1
            s[1] += u
            s[2] += c
        for (pool, fam), (n, u, c) in sorted(sums.items()):
            held.add_metric([pool, fam], n)
            used.add_metric([pool, fam], u)
            total.add_metric([pool, fam], c)
        yield from (held, used, total)


def serve_http(
    address: str, registry: CollectorRegistry, readiness: Callable[[], str | None]
) -> BoundedHTTPServer:
    """Serve /healthz, /readyz and /metrics on "host:port" in a daemon thread, with a read timeout
    and a connection cap (`coil_grpc.http`).

    `readiness()` returns None when ready, else the reason it is not.
    """

    def ready() -> Page:
        reason = readiness()
        if reason is None:
            return 200, b"ready\n", "text/plain"
        return 503, f"not ready: {reason}\n".encode(), "text/plain"

    return serve_http_routes(
        address,
        {
            "/healthz": lambda: (200, b"ok\n", "text/plain"),
            "/readyz": ready,
            "/metrics": lambda: (200, generate_latest(registry), "text/plain; version=0.0.4"),
        },
    )
