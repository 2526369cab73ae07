"""coild's metrics and its small HTTP endpoint: /healthz, /readyz and /metrics.

/healthz answers 200 while the process serves. /readyz answers 200 when the state is rebuilt, the
allocator answered lately and the routes are synced, else 503 with the reason.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


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
) -> ThreadingHTTPServer:
    """Serve /healthz, /readyz and /metrics on "host:port" in a daemon thread.

    `readiness()` returns None when ready, else the reason it is not.
    """
    host, _, port = address.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if self.path == "/healthz":
                self._reply(200, b"ok\n", "text/plain")
            elif self.path == "/readyz":
                reason = readiness()
                if reason is None:
                    self._reply(200, b"ready\n", "text/plain")
                else:
                    self._reply(503, f"not ready: {reason}\n".encode(), "text/plain")
            elif self.path == "/metrics":
                self._reply(200, generate_latest(registry), "text/plain; version=0.0.4")
            else:
                self._reply(404, b"not found: try /healthz, /readyz or /metrics\n", "text/plain")

        def _reply(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
