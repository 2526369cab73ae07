"""What every part of the allocator shares: the store, the key layout, the clock, the bounded
jittered backoff after a lost compare, and fresh reads of the pools.

The parts (`pools`, `claims`, `records`, `nodes`, `checks`) each own their keys, transactions and
cache; `coil_allocator.allocator.Allocator` is the front that builds them over one `Context`.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from coil_allocator.keys import Keys, Unreadable, decode_claimed_at, decode_pool
from coil_allocator.store import KeyValue, Store
from coil_core.errors import FailedPrecondition, NotFound
from coil_core.model import Pool

log = logging.getLogger("coil.allocator")
if TYPE_CHECKING:
    from coil_allocator.view import ClusterView

MAX_ATTEMPTS = 8
"""How often a change is tried when it keeps losing compares to concurrent writers."""


class AllocatorEvents(Protocol):
    """What the allocator reports to metrics (see coil_allocator.metrics)."""

    def retried(self, operation: str) -> None: ...

    def claimed(self, pool: str, retries: int) -> None: ...

    def unreadable(self, kind: str) -> None: ...


class NoEvents:
    """AllocatorEvents that record nothing (the default)."""

    def retried(self, operation: str) -> None:
        pass

    def claimed(self, pool: str, retries: int) -> None:
        pass

    def unreadable(self, kind: str) -> None:
        pass


class WarnOnce:
    """Remembers which unreadable keys were logged, so each is logged once, not per read.

    Bounded: after `limit` keys it stops logging new ones (the metric still counts them)."""

    def __init__(self, limit: int = 1000) -> None:
        self._seen: set[str] = set()
        self._limit = limit
        self._lock = threading.Lock()

    def first(self, key: str) -> bool:
        with self._lock:
            if key in self._seen or len(self._seen) >= self._limit:
                return False
            self._seen.add(key)
            return True


@dataclass(frozen=True)
class Context:
    """The store and the services every part uses."""

    store: Store
    keys: Keys
    clock: Callable[[], float]
    rng: random.Random
    events: AllocatorEvents
    sleep: Callable[[float], None]
    warned: WarnOnce = field(default_factory=WarnOnce)
    view: ClusterView | None = None
    """The replica's watch-fed view (pools, nodes' leases and statuses from memory), if any."""


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
        self._warned = context.warned
        self._cluster_view = context.view

    def _now(self) -> int:
        return int(self._clock())

    def _backoff(self, attempt: int, operation: str) -> None:
        """Count a lost race and sleep a jittered, growing, bounded while (at most 50 ms)."""
        self._events.retried(operation)
        self._sleep(self._rng.uniform(0, min(0.05, 0.002 * 2**attempt)))

    def _skip(self, kind: str, key: str, error: Exception) -> None:
        """Note a key that cannot be read and is skipped: counted by kind (metric
        coil_allocator_unreadable_keys_total), logged once per key; `coilctl check` reports it."""
        self._events.unreadable(kind)
        if self._warned.first(key):
            log.warning("skipping unreadable %s key %r: %s (see coilctl check)", kind, key, error)

    def _claimed_at(self, index: KeyValue | None) -> int:
        """When a node-index entry says its block was claimed (0 if absent or unreadable)."""
        if index is None:
            return 0
        try:
            return decode_claimed_at(index.value)
        except Unreadable as e:
            self._skip("node-index", index.key, e)
            return 0

    def _seen(self, revision: int) -> None:
        """Let the view catch up with a change this replica just wrote (bounded to a second), so
        that what this replica answers from memory next already shows it."""
        if self._cluster_view is not None:
            self._cluster_view.wait_for(revision, 1.0)

    def _load_pool(self, name: str, op: str) -> tuple[Pool, KeyValue]:
        """The pool and its key-value.

        Raises NotFound if there is no such pool, FailedPrecondition if its stored value
        cannot be read."""
        kv = self.store.get(self.keys.pool(name))
        if kv is None:
            raise NotFound(f'{op} "{name}": no such pool')
        return self._decode_pool(name, kv, op), kv

    def _decode_pool(self, name: str, kv: KeyValue, op: str) -> Pool:
        """The pool stored at `kv`; FailedPrecondition (counted and logged) if unreadable."""
        try:
            return decode_pool(name, kv.value)
        except Unreadable as e:
            self._skip("pool", kv.key, e)
            raise FailedPrecondition(
                f'{op} "{name}": the pool\'s stored definition {kv.key} cannot be read ({e}); '
                "see coilctl check"
            ) from None

    def _pools(self, revision: int = 0) -> tuple[dict[str, Pool], int]:
        """Every readable pool by name, read now (or at `revision`), and the revision read.

        A pool whose stored value cannot be read is skipped (see `_skip`)."""
        kvs, rev = self.store.range(self.keys.pools, revision=revision)
        pools = {}
        for kv in kvs:
            name = self.keys.strip(kv.key, self.keys.pools)
            try:
                pools[name] = decode_pool(name, kv.value)
            except Unreadable as e:
                self._skip("pool", kv.key, e)
        return pools, rev
