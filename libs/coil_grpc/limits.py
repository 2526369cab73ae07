"""Bounded concurrency for expensive reads (CheckStore, GetPool: reads of the whole cluster).

A server has a fixed number of worker threads; reads that scan much of etcd could take them all
and starve the calls pods wait for (claims and records). Calls beyond the bound are refused at
once with UNAVAILABLE ("try again later") rather than queued: a queued call would hold a worker
thread just the same.
"""

from __future__ import annotations

import threading


class ExpensiveReads:
    """At most `limit` expensive reads at a time; `try_enter` never blocks."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"expensive reads limit {limit}: must be at least 1")
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def try_enter(self) -> bool:
        """Take a slot if one is free; the caller must `leave()` after a True."""
        return self._slots.acquire(blocking=False)

    def leave(self) -> None:
        self._slots.release()
