"""What every part of the allocator shares: the store, the key layout, the clock, the bounded
jittered backoff after a lost compare, and fresh reads of the pools.

The parts (`pools`, `claims`, `records`, `nodes`, `checks`) each own their keys, transactions and
cache; `coil_allocator.allocator.Allocator` is the front that builds them over one `Context`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from coil_allocator.keys import Keys, decode_pool
from coil_allocator.store import KeyValue, Store
from coil_core.errors import NotFound
from coil_core.model import Pool

MAX_ATTEMPTS = 8
"""How often a change is tried when it keeps losing compares to concurrent writers."""


class AllocatorEvents(Protocol):
    """What the allocator reports to metrics (see coil_allocator.metrics)."""

    def retried(self, operation: str) -> None: ...

    def claimed(self, pool: str, retries: int) -> None: ...


class NoEvents:
    """AllocatorEvents that record nothing (the default)."""

    def retried(self, operation: str) -> None:
        pass

    def claimed(self, pool: str, retries: int) -> None:
        pass


@dataclass(frozen=True)
class Context:
    """The store and the services every part uses."""

    store: Store
    keys: Keys
    clock: Callable[[], float]
    rng: random.Random
    events: AllocatorEvents
    sleep: Callable[[float], None]


def first(result: list[KeyValue] | int | None) -> KeyValue | None:
    """The first key-value of a transaction's read, or None if it found nothing."""
    if isinstance(result, list) and result:
        return result[0]
    return None


class Part:
    """Base of the allocator's parts: the shared context and the reads they all make."""

    def __init__(self, context: Context) -> None:
        self.store = context.store
        self.keys = context.keys
        self._clock = context.clock
        self._rng = context.rng
        self._events = context.events
        self._sleep = context.sleep

    def _now(self) -> int:
        return int(self._clock())

    def _backoff(self, attempt: int, operation: str) -> None:
        """Count a lost race and sleep a jittered, growing, bounded while (at most 50 ms)."""
        self._events.retried(operation)
        self._sleep(self._rng.uniform(0, min(0.05, 0.002 * 2**attempt)))

    def _load_pool(self, name: str, op: str) -> tuple[Pool, KeyValue]:
        """The pool and its key-value; NotFound if there is no such pool."""
        kv = self.store.get(self.keys.pool(name))
        if kv is None:
            raise NotFound(f'{op} "{name}": no such pool')
        return decode_pool(name, kv.value), kv

    def _pools(self, revision: int = 0) -> tuple[dict[str, Pool], int]:
        """Every pool by name, read now (or at `revision`), and the revision read."""
        kvs, rev = self.store.range(self.keys.pools, revision=revision)
        pools = {}
        for kv in kvs:
            name = self.keys.strip(kv.key, self.keys.pools)
            pools[name] = decode_pool(name, kv.value)
        return pools, rev
