"""Prometheus metrics of the allocator: RPCs by method and outcome, latency, claims, retries, and
blocks and addresses in use per pool (read from etcd when scraped, at most every 10 s)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from coil_allocator.allocator import Allocator
from coil_core.errors import CoilError
from coil_core.model import PoolUsage


class AllocatorMetrics:
    """Metrics in their own registry (no global state); `observe_rpc` is the servicer's hook."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.rpcs = Counter(
            "coil_allocator_rpcs",
            "RPCs served, by method and gRPC status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "coil_allocator_rpc_duration_seconds",
            "Time to serve an RPC, by method.",
            ["method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.claims = Counter(
            "coil_allocator_block_claims",
            "Blocks claimed, by pool.",
            ["pool"],
            registry=self.registry,
        )
        self.retries = Counter(
            "coil_allocator_retries",
            "Transactions retried after losing a compare to a concurrent writer, by operation.",
            ["operation"],
            registry=self.registry,
        )

        self.unreadable_keys = Counter(
            "coil_allocator_unreadable_keys",
            "Stored keys skipped because they could not be read, by kind (pool, block, "
            "node-index, record, attachment, node-status); coilctl check names them.",
            ["kind"],
            registry=self.registry,
        )
        self.compactions = Counter(
            "coil_allocator_compactions",
            "etcd compactions this replica made (one replica holds the job at a time).",
            registry=self.registry,
        )
        self.compacted_revision = Gauge(
            "coil_allocator_compacted_revision",
            "etcd revision this replica last compacted to (0: it has not compacted).",
            registry=self.registry,
        )

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpcs.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    # AllocatorEvents
    def retried(self, operation: str) -> None:
        self.retries.labels(operation).inc()

    def claimed(self, pool: str, retries: int) -> None:
        self.claims.labels(pool).inc()

    def unreadable(self, kind: str) -> None:
        self.unreadable_keys.labels(kind).inc()

    # CompactionEvents
    def compacted(self, revision: int) -> None:
        self.compactions.inc()
        self.compacted_revision.set(revision)

    def watch_usage(self, allocator: Allocator, max_age: float = 10.0) -> None:
        """Export usage gauges computed from the store when scraped."""
        self.registry.register(_UsageCollector(allocator, max_age))


class _UsageCollector(Collector):
    def __init__(self, allocator: Allocator, max_age: float) -> None:
        self._allocator = allocator
        self._max_age = max_age
        self._lock = threading.Lock()
        self._cached: tuple[float, list[PoolUsage]] = (0.0, [])

    def _usage(self) -> list[PoolUsage]:
        with self._lock:
            at, usage = self._cached
            if time.monotonic() - at > self._max_age:
                try:
                    usage = self._allocator.usage()
                except CoilError:
                    return usage  # stale figures beat none; etcd health has its own signal
                self._cached = (time.monotonic(), usage)
            return usage

    def collect(self) -> Iterator[Any]:
        names = {
            "blocks_held": "Blocks held by nodes.",
            "blocks_total": "Blocks in the pool's subnets.",
            "addresses_used": "Addresses recorded.",
            "addresses_total": "Addresses pods can get in the pool's subnets.",
        }
        families = {
            name: GaugeMetricFamily(f"coil_pool_{name}", text, labels=["pool", "family"])
            for name, text in names.items()
        }
        for u in self._usage():
            labels = [u.pool, f"ipv{int(u.family)}"]
            families["blocks_held"].add_metric(labels, u.blocks_held)
            families["blocks_total"].add_metric(labels, u.blocks_total)
            families["addresses_used"].add_metric(labels, u.addresses_used)
            families["addresses_total"].add_metric(labels, u.addresses_total)
        yield from families.values()
