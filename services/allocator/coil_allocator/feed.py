"""What a WatchNode stream sends: a node's snapshot or changes, from the allocator's view, and the
node's lease kept alive on the replica's one keep-alive stream while the stream is open.

A follower names the revision it has applied. If the view's history reaches back to it, the
follower gets exactly the changes after it; otherwise (first start, a revision compacted away, or
older than the view's history) a snapshot first: every pool, the node's blocks and records read
at one revision, then the changes after that revision. When the view itself had to list afresh,
its followers get a new snapshot the same way. A follower whose alive key goes (the lease
expired, or an operator released the node) is told `lease_lost` and the stream ends.

Only the lease the node's own alive key lives on is kept alive, as ReportNode refreshes only that
one: lease IDs are sequential, and a node that named another's would keep that node looking alive
(its blocks unreleasable) for ever. Any other lease is answered `lease_lost` at once, as a dead
one, and is neither refreshed nor held.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import replace
from typing import cast

from coil_allocator.store import Store
from coil_allocator.view import ClusterView, Lost, Resync, Subscription
from coil_core.errors import Unavailable
from coil_core.model import AllocationRecord, HeldBlock, NodeChange, Pool
from coil_core.rules import validate_node_name

log = logging.getLogger("coil.allocator.feed")

LINGER = 2.0
"""Seconds a replica keeps a node's lease alive after its stream ended (at most a third of the
TTL): long enough for coild's safety-net resync, which reopens at once, to find it still held."""

NodeSnapshot = Callable[[str], tuple[list[Pool], list[HeldBlock], list[AllocationRecord], int]]
"""Every pool and a node's blocks and records, read at one revision (and that revision)."""

AliveLease = Callable[[str, int, ClusterView], int]
"""The lease a node's alive key lives on (0: none), from the view when it says the lease named
(the second argument), else read from etcd (`Nodes.alive_lease`)."""


class NodeFeed:
    """Feeds for the nodes that follow this replica. Thread-safe."""

    def __init__(
        self,
        view: ClusterView,
        store: Store,
        snapshot: NodeSnapshot,
        node_ttl: int,
        alive_lease: AliveLease,
    ) -> None:
        self.view = view
        self.store = store
        self._snapshot = snapshot
        self._alive_lease = alive_lease
        self._node_ttl = node_ttl
        self._lock = threading.Lock()
        self._holders: Counter[int] = Counter()
        # Leases no stream follows with any more, kept alive until the time given (released
        # order); a stream that comes back within it takes the lease over on its schedule.
        self._lingering: dict[int, float] = {}
        self._linger = min(LINGER, node_ttl / 3)
        self._sweeper: threading.Thread | None = None

    def follow(self, node: str, revision: int, lease_id: int) -> Follow:
        """A node's feed after `revision` (0: from a snapshot). Raises InvalidArgument for a
        bad node name; iterating raises Unavailable when etcd or the view cannot answer."""
        validate_node_name(node, "watch node")
        return Follow(self, node, revision, lease_id)

    # -- the node's lease ---------------------------------------------------------------------

    def hold(self, node: str, lease_id: int) -> bool:
        """Keep `lease_id` alive while the node follows; False if it is not the lease of the
        node's alive key, or not a live lease. Raises Unavailable (etcd did not answer).

        A lease that is not the node's is not touched (not refreshed, not held). When the
        node's alive key lives on another lease, the refusal is logged: an honest agent names
        the lease its last report gave it, so this is a node naming another's (or a stale
        agent). A lease this replica keeps alive already (another stream of the node, or one that
        ended a moment ago: a safety-net resync) stays on its refresh schedule. A lease new to
        this replica is refreshed at once: when it was last refreshed is not known here (the
        replica that kept it alive may have died just before its refresh was due), and the
        answer says whether it still lives."""
        on_key = self._alive_lease(node, lease_id, self.view)
        if on_key != lease_id:
            if on_key:
                log.warning(
                    'watch node "%s": lease %d is not the one the node\'s alive key lives on '
                    "(%d); answered lease_lost, the lease not kept alive",
                    node,
                    lease_id,
                    on_key,
                )
            return False
        with self._lock:
            if self._holders[lease_id] > 0 or self._lingering.pop(lease_id, None) is not None:
                self._holders[lease_id] += 1
                return True
        if self.store.keep_alive(lease_id) <= 0:
            return False
        with self._lock:
            self._holders[lease_id] += 1
            if self._holders[lease_id] == 1:
                self.store.hold_lease(lease_id, self._node_ttl)
        return True

    def release(self, lease_id: int) -> None:
        """The node stopped following here: its lease is kept alive for `linger` seconds more
        (a resync opens the next stream at once), then lives on for its TTL, no longer."""
        with self._lock:
            self._holders[lease_id] -= 1
            if self._holders[lease_id] <= 0:
                del self._holders[lease_id]
                self._lingering[lease_id] = time.monotonic() + self._linger
                if self._sweeper is None:
                    self._sweeper = threading.Thread(
                        target=self._sweep, name="lease-linger", daemon=True
                    )
                    self._sweeper.start()

    def _sweep(self) -> None:
        """Stop keeping alive the leases that nobody followed with again within `linger`; ends
        when none lingers (the next release starts another)."""
        while True:
            time.sleep(min(1.0, self._linger))
            now = time.monotonic()
            with self._lock:
                # In order of release, so the expired ones are at the front.
                while self._lingering:
                    lease_id, until = next(iter(self._lingering.items()))
                    if until > now:
                        break
                    del self._lingering[lease_id]
                    self.store.drop_lease(lease_id)
                if not self._lingering:
                    self._sweeper = None
                    return


_SKIP = object()  # an item with nothing for this follower
_RESYNC = object()  # the view lost the follower's place: a snapshot comes next


class Follow:
    """One node's feed (see `NodeFeed.follow`).

    Read it either by iterating (blocking; `cancel` ends it from any thread), or on an event
    loop: `start` (blocking: run it in an executor) gives the first answer, then `rest` the
    changes after it. `close` (the same as `cancel`) lets go of the subscription and the node's
    lease; it is safe to call at any time from any thread, also while `start` still runs (then
    `start` lets go of what it took, and answers None)."""

    def __init__(self, feed: NodeFeed, node: str, revision: int, lease_id: int) -> None:
        self._feed = feed
        self.node = node
        self.revision = revision
        self.lease_id = lease_id
        self._sub: Subscription | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._held = False
        self._closed = False
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sub, self._sub = self._sub, None
            held, self._held = self._held, False
        if sub is not None:
            sub.close()
        if held:
            self._feed.release(self.lease_id)

    cancel = close

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    def _subscribe(self, after: int) -> tuple[Subscription, list[Pool]] | None:
        got = self._feed.view.subscribe(self.node, after, self._loop)
        if got is None:
            return None
        with self._lock:
            old, self._sub = self._sub, got[0]
            if self._closed:
                self._sub = None
                old = got[0]
        if old is not None:
            old.close()
        return got

    def _snapshot(self) -> NodeChange:
        """Every pool and the node's blocks and records, read from etcd at one revision; the
        subscription then starts after that revision, whether the view is behind it (what it
        brings up to there is skipped) or ahead (its history replays the rest)."""
        for _ in range(3):
            pools, blocks, records, revision = self._feed._snapshot(self.node)
            if self._subscribe(revision) is None:
                continue  # the view listed afresh after that read: read again
            return NodeChange(
                revision,
                pools=tuple(pools),
                blocks=tuple(blocks),
                records=tuple(records),
                snapshot=True,
            )
        raise Unavailable("watch node: the allocator's view keeps resynchronising; try again")

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> NodeChange | None:
        """The first answer: `lease_lost` (the feed ends with it), a snapshot, or, when the
        follower resumes, an empty change at its revision (its missed changes follow). None when
        closed meanwhile. Blocks on etcd; raises Unavailable. With `loop`, the changes after it
        are read on that loop (`rest`)."""
        self._loop = loop
        if self.closed:
            return None  # nobody waits for it: take nothing over, read nothing
        if not self._feed.view.current:
            raise Unavailable("watch node: the allocator cannot reach etcd; try again")
        if self.lease_id:
            if not self._feed.hold(self.node, self.lease_id):
                return NodeChange(self.revision, lease_lost=True)
            with self._lock:
                # Read under the lock only: a close right after it takes `_held` over (and
                # releases the lease itself), so the lease is released exactly once.
                took = self._held = not self._closed
            if not took:
                self._feed.release(self.lease_id)
                return None
        if self.revision <= 0 or self._subscribe(self.revision) is None:
            first = self._snapshot()
        else:
            # Resumed: say so at once (the follower knows its stream is up), then the changes
            # it missed follow from the subscription.
            first = NodeChange(self.revision)
        with self._lock:
            return None if self._closed else first

    def _after(self, item: NodeChange | Resync | Lost | None) -> object:
        """What the follower gets for a subscription's item: a NodeChange, `_SKIP`, `_RESYNC`,
        or None (the feed ends). Raises Unavailable when the view lost etcd."""
        if item is None:
            return None  # closed
        if isinstance(item, Resync):
            return _RESYNC
        if isinstance(item, Lost):
            raise Unavailable(f"watch node: the allocator lost etcd ({item.reason})")
        if item.lease_lost and not self.lease_id:
            item = replace(item, lease_lost=False)  # not following with a lease
            if not item:
                return _SKIP
        return item

    def __iter__(self) -> Iterator[NodeChange]:
        try:
            first = self.start()
            if first is None:
                return
            yield first
            while not first.lease_lost:
                sub = self._sub
                if sub is None:
                    return
                got = self._after(sub.get())
                if got is None:
                    return
                if got is _SKIP:
                    continue
                first = self._snapshot() if got is _RESYNC else cast(NodeChange, got)
                yield first
        finally:
            self.close()

    async def rest(
        self, run: Callable[[Callable[[], NodeChange]], Awaitable[NodeChange]]
    ) -> AsyncGenerator[NodeChange, None]:
        """The changes after `start`'s answer, on the loop `start` was given; `run` runs a
        blocking call (a new snapshot) off the loop. Does not close the follow."""
        while True:
            sub = self._sub
            if sub is None:
                return
            got = self._after(await sub.get_async())
            if got is None:
                return
            if got is _SKIP:
                continue
            change = await run(self._snapshot) if got is _RESYNC else cast(NodeChange, got)
            yield change
            if change.lease_lost:
                return
