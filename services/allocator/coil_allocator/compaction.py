"""Compaction of etcd's history, by one allocator replica at a time.

etcd keeps every revision of every key until it is compacted; without compaction its database
grows with every change until it reaches its quota, and then etcd refuses every write. etcd can
compact by itself (`--auto-compaction-mode`/`--auto-compaction-retention`); when it is not set
up to, the allocators do it.

One replica holds the job: it owns the key `<prefix>compactor`, bound to a lease that replica
keeps alive on its one keep-alive stream. A replica that stops (or loses etcd) lets the lease
expire and another one takes the key at its next turn. The holder notes the store's revision
every `interval` seconds and compacts to the newest revision it noted at least `retention`
seconds ago, so history younger than `retention` always stays: a watcher (an allocator's cache,
coild's WatchNode) that breaks resumes from its revision if it comes back within that window, and
lists afresh otherwise. Nothing is written while nothing changes: the key is written once per
holder, and a revision that has not moved since the last compaction is not compacted again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from coil_allocator.store import Put, Store, absent
from coil_core.errors import CoilError, Compacted

log = logging.getLogger("coil.allocator.compaction")

DEFAULT_INTERVAL = 60.0
DEFAULT_RETENTION = 600.0


class CompactionEvents(Protocol):
    """What the compactor reports to metrics."""

    def compacted(self, revision: int) -> None: ...


class _NoEvents:
    def compacted(self, revision: int) -> None:
        pass


class Compactor:
    """The compaction job of one replica (a thread started by `start`, ended by `stop`)."""

    def __init__(
        self,
        store: Store,
        prefix: str,
        *,
        interval: float = DEFAULT_INTERVAL,
        retention: float = DEFAULT_RETENTION,
        identity: str = "",
        events: CompactionEvents | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0 or retention < 0:
            raise ValueError("compaction: interval must be positive and retention not negative")
        self.store = store
        self.key = f"{prefix}compactor"
        self.interval = interval
        self.retention = retention
        self.identity = (identity or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}").encode()
        self._events = events or _NoEvents()
        self._clock = clock
        # The lease lives a few intervals: a holder that dies hands the job on within that time.
        self._ttl = max(int(interval * 3), 10)
        self._lease = 0
        self._samples: deque[tuple[float, int]] = deque()
        self._compacted = 0
        self.compactions = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def holding(self) -> bool:
        """Whether this replica holds the job now (as far as its lease says)."""
        return self._lease != 0 and self.store.lease_held(self._lease)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="compaction", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the job; if this replica held it, hand it on at once (revoke its lease)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._lease:
            try:
                self.store.revoke_lease(self._lease)
            except CoilError as e:
                log.warning("compaction: could not hand the job on: %s", e)
            self._lease = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.turn()
            except CoilError as e:
                log.warning("compaction: %s", e)
            self._stop.wait(self.interval)

    def turn(self) -> None:
        """One turn: take (or keep) the job, note the revision, compact what is old enough."""
        if not self._claim():
            return
        now = self._clock()
        revision = self.store.status().revision
        if not self._samples or self._samples[-1][1] != revision:
            self._samples.append((now, revision))
        # The newest sample at least `retention` old is the target; older ones are of no more use.
        target = 0
        while self._samples and now - self._samples[0][0] >= self.retention:
            if len(self._samples) > 1 and now - self._samples[1][0] >= self.retention:
                self._samples.popleft()
                continue
            target = self._samples[0][1]
            break
        if target <= self._compacted:
            return
        try:
            self.store.compact(target)
        except Compacted:
            pass  # compacted already (by etcd itself, or an earlier holder): nothing to do
        else:
            self.compactions += 1
            self._events.compacted(target)
            log.info("compacted etcd history before revision %d", target)
        self._compacted = target

    def _claim(self) -> bool:
        """Hold the job: keep our key, or take the key if nobody holds it."""
        if self._lease and self.store.lease_held(self._lease):
            return True
        if self._lease:
            log.info("compaction: lost the job (lease expired)")
            self._lease = 0
            self._samples.clear()
        if self.store.get(self.key) is not None:
            return False  # another replica holds it
        lease = self.store.grant_lease(self._ttl)
        if not self.store.txn(
            [absent(self.key)], [Put(self.key, self.identity, lease=lease)]
        ).succeeded:
            return False  # taken meanwhile; our lease lapses by itself
        self.store.hold_lease(lease, self._ttl)
        self._lease = lease
        log.info("compaction: holding the job (%s)", self.identity.decode())
        return True
