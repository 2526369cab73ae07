"""coild's follower of the allocator's WatchNode stream: the pool changes and the changes to this
node's blocks and records are pushed to coild, instead of asked for on a timer.

One thread keeps one stream open. Each message (a `NodeChange`) goes to the agent's `apply`, in
order; the follower remembers the revision the agent applied, and when the stream breaks (the
replica died, the network cut) it opens a new one naming that revision, so that the allocator,
whichever replica the channel reaches now, sends exactly what was missed, or a snapshot if it no
longer has that history. Reconnecting backs off from 0.2 s to 5 s, each wait jittered (half to
all of it).

The node's lease rides on the stream: the serving replica keeps it alive while it is open. When
the allocator says the lease is gone, the follower calls `lease_lost` (the agent reports again,
getting a new lease) and reopens the stream with the new lease.

The safety net is a fresh snapshot (`resync`): every few minutes the agent has the follower
end its stream and open a new one from revision 0, whose snapshot is reconciled with memory like
a listing. One call then does what a pool list, a block listing and a report did.

An allocator without WatchNode (older than coild) makes the follower stop and say so
(`unsupported`); the agent then polls as it used to.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from coil_core.model import NodeChange
from coild.allocator_client import AllocatorClient, NodeWatch
from coild.errors import NodeAgentError, WatchUnsupported

log = logging.getLogger("coild.follow")


class NodeFollower:
    """Follows WatchNode for one node in a thread (`start`/`stop`).

    `apply(change)` runs in the follower's thread, one change at a time, in order; if it raises,
    the follower starts over from a snapshot. `lease()` gives the lease to send; `lease_lost()`
    is called when the allocator says it is gone; `opening()` just before each stream is asked
    for (what exists then is what a snapshot may judge).
    """

    def __init__(
        self,
        client: AllocatorClient,
        node: str,
        apply: Callable[[NodeChange], None],
        lease: Callable[[], int],
        lease_lost: Callable[[], None],
        opening: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self.node = node
        self._apply = apply
        self._lease = lease
        self._lease_lost = lease_lost
        self._opening = opening
        self._clock = clock
        self._rng = rng or random.Random()
        self.revision = 0
        self.streams = 0
        self.snapshots = 0
        self.unsupported = False
        self._up = False
        self._down_since = clock()
        self._stop = threading.Event()
        self._resync = False
        self._reopen = False
        self._stream_lease = 0
        self._watch: NodeWatch | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, revision: int = 0) -> None:
        """Follow from `revision` (0: start with a snapshot)."""
        self.revision = revision
        self._thread = threading.Thread(target=self._run, name="watch-node", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._watch is not None:
                self._watch.cancel()
        if self._thread is not None:
            self._thread.join(10)

    def resync(self) -> bool:
        """Start over from a snapshot (the safety net): the open stream is ended and the next
        one asks for revision 0 at once, so memory is reconciled with every pool and this node's
        blocks and records as the allocator has them, in one call. False (nothing done) when no
        stream is open."""
        with self._lock:
            if not self._up or self._watch is None:
                return False
            self._resync = True
            watch = self._watch
        watch.cancel()
        return True

    def lease_changed(self) -> None:
        """The agent's lease changed (a report got a new one): the open stream, which keeps the
        old one alive, is ended and reopened at once with the new lease, resuming from its
        revision. Nothing happens when no stream is open or it carries that lease already."""
        with self._lock:
            if self._watch is None or self._stream_lease == self._lease():
                return
            self._reopen = True
            watch = self._watch
        watch.cancel()

    def connected(self, grace: float = 0.0) -> bool:
        """Whether a stream is open (or was, less than `grace` seconds ago)."""
        with self._lock:
            return self._up or self._clock() - self._down_since < grace

    def _set_up(self, up: bool) -> None:
        with self._lock:
            if self._up and not up:
                self._down_since = self._clock()
            self._up = up

    def _run(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                if self._follow():
                    delay = 0.2
            except WatchUnsupported as e:
                log.warning("%s; polling instead", e)
                self.unsupported = True
                return
            except NodeAgentError as e:
                if not self._stop.is_set():
                    log.warning("WatchNode: %s; resuming from revision %d", e, self.revision)
            finally:
                self._set_up(False)
            if self._stop.is_set():
                return
            with self._lock:
                if self._resync:
                    continue  # asked to start over: reopen at once, from a snapshot
                if self._reopen:
                    self._reopen = False
                    continue  # a new lease to carry: reopen at once, resuming
            # Jittered: when a replica goes, every node it served reconnects at once; spread
            # over the delay, they do not arrive at the other replica in one burst.
            self._stop.wait(self._rng.uniform(delay / 2, delay))
            delay = min(delay * 2, 5.0)

    def _follow(self) -> bool:
        """One stream, until it ends; True if it delivered anything."""
        with self._lock:
            if self._stop.is_set():
                return False
            if self._resync:
                self._resync = False
                self.revision = 0
            self._opening()
            self._stream_lease = self._lease()
            self._watch = self._client.watch_node(self.node, self.revision, self._stream_lease)
            watch = self._watch
        self.streams += 1
        delivered = False
        for change in watch:
            self._set_up(True)
            try:
                self._apply(change)
            except Exception:
                log.exception("applying a WatchNode change failed; starting over from a snapshot")
                self.revision = 0
                watch.cancel()
                return delivered
            delivered = True
            if change.snapshot:
                self.snapshots += 1
            self.revision = change.revision
            if change.lease_lost:
                watch.cancel()
                self._lease_lost()
                return True
        return delivered
