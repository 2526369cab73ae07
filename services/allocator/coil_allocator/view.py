"""The allocator's in-memory view of what node agents need, kept current by one etcd watch.

A replica lists the pools and the node keys (`pools/`, `nodes/`) once, then watches its whole
prefix from the revision of that list. From the view it serves the pool list, answers "is this
node's lease the one on its alive key" and "did its routes change" without reading etcd, and it
fans the changes out to the node agents that follow them (`subscribe`, behind the WatchNode RPC):
every pool change to everyone, a block claim or release and a record's creation or removal to the
node it belongs to.

Resuming: the view keeps the changes of its recent history (bounded in count), so a subscriber
that names a revision inside it gets exactly what it missed. Before that, or after the view had
to list afresh itself (etcd compacted the revision its watch was at), a subscriber is told to
resynchronise (`Resync`) and starts over from a full snapshot.

Failures: the watch is restarted from the last revision seen, with backoff, when it breaks
(`Unavailable`); a `Compacted` watch makes the view list afresh. While etcd is unreachable the
view keeps its last state and `current` turns false.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from coil_allocator.keys import Keys, decode_pool, decode_record
from coil_allocator.store import Store, Watch, WatchEvent
from coil_core.blocks import parse_block_key
from coil_core.errors import CoilError, Compacted, Unavailable
from coil_core.model import AllocationRecord, HeldBlock, NodeChange, Pool

log = logging.getLogger("coil.allocator.view")

HISTORY = 50_000
"""Revisions with changes kept for subscribers that resume (before them, a resumer gets a full
snapshot)."""


class Resync:
    """Sent to a subscriber whose history the view no longer has: start over from a snapshot."""


class Lost:
    """Sent to every subscriber when the view loses etcd: its feed ends; it may resume later."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass
class _NodeParts:
    blocks: list[HeldBlock] = field(default_factory=list)
    released_blocks: list[HeldBlock] = field(default_factory=list)
    records: list[AllocationRecord] = field(default_factory=list)
    released_records: list[AllocationRecord] = field(default_factory=list)
    lease_lost: bool = False


@dataclass
class _Change:
    """One revision's changes, sorted by whom they concern."""

    revision: int
    pools: list[Pool] = field(default_factory=list)
    deleted_pools: list[str] = field(default_factory=list)
    nodes: dict[str, _NodeParts] = field(default_factory=dict)
    alive: dict[str, int] = field(default_factory=dict)  # node -> lease, 0: key deleted
    status: dict[str, bytes | None] = field(default_factory=dict)
    # What every node that the change does not name gets (its pools): one value for them all.
    everyones: NodeChange | None = field(default=None, repr=False, compare=False)

    def node(self, name: str) -> _NodeParts:
        parts = self.nodes.get(name)
        if parts is None:
            parts = self.nodes[name] = _NodeParts()
        return parts


class Subscription:
    """A node's feed of changes after a revision. `get` blocks for the next item; a subscription
    made for an event loop (`loop`) is read with `get_async` on that loop instead, and the view's
    thread hands it each item through the loop."""

    def __init__(
        self,
        view: ClusterView,
        node: str,
        after: int,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.node = node
        self.after = after
        self._view = view
        self._loop = loop
        self._queue: queue.SimpleQueue[NodeChange | Resync | Lost | None] = queue.SimpleQueue()
        self._mailbox = None if loop is None else _Mailbox(loop)

    def put(self, item: NodeChange | Resync | Lost | None) -> None:
        if self._mailbox is None:
            self._queue.put(item)
            return
        assert self._loop is not None
        # A closed loop (the server stopped) has nobody left to read this.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._mailbox.put, item)

    def get(self, timeout: float | None = None) -> NodeChange | Resync | Lost | None:
        """The next change, a `Resync` or `Lost`, or None when closed or nothing came within
        `timeout`."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    async def get_async(self) -> NodeChange | Resync | Lost | None:
        """`get` for a subscription made for the running loop (None: closed)."""
        assert self._mailbox is not None, "not a subscription for an event loop"
        return await self._mailbox.get()

    def close(self) -> None:
        self._view._unsubscribe(self)
        self.put(None)


class _Mailbox:
    """A subscription's items for its one reader on an event loop; `put` and `get` run on that
    loop. Lighter than an asyncio.Queue, which a fan-out to ten thousand streams feels."""

    __slots__ = ("_loop", "_items", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[NodeChange | Resync | Lost | None] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: NodeChange | Resync | Lost | None) -> None:
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> NodeChange | Resync | Lost | None:
        while not self._items:
            self._waiter = self._loop.create_future()
            await self._waiter
        return self._items.popleft()


class _Handover:
    """One change's items for subscriptions, handed to each event loop in one call: a pool
    change wakes a loop once, not once for each of its ten thousand streams."""

    __slots__ = ("_loops",)

    def __init__(self) -> None:
        self._loops: dict[asyncio.AbstractEventLoop, list[tuple[_Mailbox, NodeChange | None]]] = {}

    def put(self, sub: Subscription, item: NodeChange | None) -> None:
        if sub._mailbox is None:
            sub.put(item)
            return
        assert sub._loop is not None
        batch = self._loops.get(sub._loop)
        if batch is None:
            batch = self._loops[sub._loop] = []
        batch.append((sub._mailbox, item))

    def send(self) -> None:
        for loop, batch in self._loops.items():
            # A closed loop (the server stopped) has nobody left to read these.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_hand, batch)


def _hand(batch: list[tuple[_Mailbox, NodeChange | None]]) -> None:
    for mailbox, item in batch:
        mailbox.put(item)


class ClusterView:
    """See the module docstring. Thread-safe; `start` runs the watch in a thread."""

    def __init__(self, store: Store, keys: Keys, *, history: int = HISTORY) -> None:
        self.store = store
        self.keys = keys
        self._history = history
        self._lock = threading.Condition()
        self._pools: dict[str, Pool] = {}
        self._alive: dict[str, int] = {}  # node -> lease of its alive key
        self._status: dict[str, bytes] = {}  # node -> value of its status key
        self._node_rev: dict[str, int] = {}  # node -> revision of its last alive/status change
        self._revision = 0
        self._log: deque[_Change] = deque()
        self._log_from = 0  # the log holds every change after this revision
        self._subscribers: dict[str, set[Subscription]] = {}
        self.current = False
        self.relists = 0
        self._stop = threading.Event()
        self._watch: Watch | None = None
        self._thread: threading.Thread | None = None

    # -- reading -----------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        with self._lock:
            return self._revision

    def pools(self) -> list[Pool]:
        with self._lock:
            return sorted(self._pools.values(), key=lambda p: p.name)

    def node_keys(self, node: str) -> tuple[int, bytes | None, int]:
        """The node's alive lease (0: none), its status value (None: none), and the revision
        the view last saw either change at (0: never, since its list)."""
        with self._lock:
            return (
                self._alive.get(node, 0),
                self._status.get(node),
                self._node_rev.get(node, 0),
            )

    def alive_lease(self, node: str) -> int:
        """The lease of the node's alive key (0 when it has none)."""
        with self._lock:
            return self._alive.get(node, 0)

    def status(self, node: str) -> bytes | None:
        with self._lock:
            return self._status.get(node)

    def wait_for(self, revision: int, timeout: float) -> bool:
        """Wait until the view has seen `revision`; False if it has not within `timeout`."""
        with self._lock:
            return self._lock.wait_for(lambda: self._revision >= revision, timeout)

    # -- subscribing -------------------------------------------------------------------------

    def subscribe(
        self, node: str, after: int, loop: asyncio.AbstractEventLoop | None = None
    ) -> tuple[Subscription, list[Pool]] | None:
        """Follow `node`'s changes after revision `after`: the subscription (which first replays
        what the view's history holds after `after`; read on `loop` when given) and the pools
        as the view has them now. None when the history no longer reaches back to `after`
        (take a snapshot, then subscribe after its revision). Unavailable while the view has
        lost etcd."""
        with self._lock:
            if not self.current:
                raise Unavailable("watch node: the allocator cannot reach etcd; try again")
            if after < self._log_from:
                return None
            sub = Subscription(self, node, after, loop)
            # Only the changes after `after`, found from the newest end: a subscriber that
            # just took a snapshot needs few or none of the (up to `HISTORY`) kept changes.
            missed: list[_Change] = []
            for change in reversed(self._log):
                if change.revision <= after:
                    break
                missed.append(change)
            for change in reversed(missed):
                item = self._for(change, node)
                if item:
                    sub.put(item)
            self._subscribers.setdefault(node, set()).add(sub)
            return sub, sorted(self._pools.values(), key=lambda p: p.name)

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subscribers.get(sub.node)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subscribers[sub.node]

    def subscribers(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._subscribers.values())

    @staticmethod
    def _for(change: _Change, node: str) -> NodeChange | None:
        """What of `change` concerns `node` (None: nothing)."""
        mine = change.nodes.get(node)
        if mine is None:
            if not change.pools and not change.deleted_pools:
                return None
            # A pool change reaches thousands of nodes: they share one value (and the server
            # one message built from it).
            if change.everyones is None:
                change.everyones = NodeChange(
                    change.revision, tuple(change.pools), tuple(change.deleted_pools)
                )
            return change.everyones
        return NodeChange(
            change.revision,
            tuple(change.pools),
            tuple(change.deleted_pools),
            tuple(mine.blocks),
            tuple(mine.released_blocks),
            tuple(mine.records),
            tuple(mine.released_records),
            mine.lease_lost,
        )

    # -- running -----------------------------------------------------------------------------

    def load(self) -> None:
        """List once now (Unavailable if etcd does not answer); `start` then watches on from
        this list's revision. Without it, `start` lists first itself."""
        self._list()

    def start(self, wait: float = 0.0) -> None:
        """Run the watch in a thread; with `wait`, block up to that long for the first list."""
        self._thread = threading.Thread(target=self._run, name="cluster-view", daemon=True)
        self._thread.start()
        if wait:
            with self._lock:
                self._lock.wait_for(lambda: self._revision > 0, wait)

    def stop(self) -> None:
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.close()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        delay = 0.2
        listed = self.revision > 0
        while not self._stop.is_set():
            try:
                if not listed:
                    self._list()
                    listed = True
                self._follow()
                delay = 0.2
            except Compacted as e:
                log.warning("view: %s", e)
                listed = False
            except CoilError as e:
                with self._lock:
                    self.current = False
                    # Followers must not take silence for "nothing changed": end their feeds
                    # (they come back, from their revision, once etcd answers again).
                    for subs in self._subscribers.values():
                        for sub in subs:
                            sub.put(Lost(str(e)))
                    self._subscribers.clear()
                log.warning("view: %s; retrying in %.1f s", e, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)

    def _list(self) -> None:
        """Read pools and node keys afresh; everyone who follows starts over."""
        pools_kvs, revision = self.store.range(self.keys.pools)
        node_kvs, _ = self.store.range(f"{self.keys.prefix}nodes/", revision=revision)
        pools = {}
        for kv in pools_kvs:
            name = self.keys.strip(kv.key, self.keys.pools)
            pools[name] = decode_pool(name, kv.value)
        alive: dict[str, int] = {}
        status: dict[str, bytes] = {}
        for kv in node_kvs:
            node, _, rest = self.keys.strip(kv.key, f"{self.keys.prefix}nodes/").partition("/")
            if rest == "alive":
                alive[node] = kv.lease
            elif rest == "status":
                status[node] = kv.value
        with self._lock:
            first = self._revision == 0
            self._pools, self._alive, self._status = pools, alive, status
            self._node_rev = dict.fromkeys(set(alive) | set(status), revision)
            self._revision = revision
            self._log.clear()
            self._log_from = revision
            self.current = True
            if not first:
                self.relists += 1
                for subs in self._subscribers.values():
                    for sub in subs:
                        sub.put(Resync())
                self._subscribers.clear()
            self._lock.notify_all()
        log.info(
            "view: listed %d pools, %d nodes alive at revision %d", len(pools), len(alive), revision
        )

    def _follow(self) -> None:
        with self._lock:
            start = self._revision + 1
        watch = self.store.watch(self.keys.prefix, start, prev_kv=True)
        self._watch = watch
        if self._stop.is_set():
            watch.close()
            return
        with self._lock:
            self.current = True
        for batch in watch:
            if not batch.events:
                with self._lock:
                    self._revision = max(self._revision, batch.revision)
                    self._lock.notify_all()
                continue
            for change in self._split(batch.events):
                self._apply(change)
        if not self._stop.is_set():
            raise Unavailable("view: watch ended")

    def _split(self, events: tuple[WatchEvent, ...]) -> Iterator[_Change]:
        """Events grouped by revision and sorted by whom they concern (no lock held)."""
        current: _Change | None = None
        for event in events:
            if current is None or current.revision != event.revision:
                if current is not None:
                    yield current
                current = _Change(event.revision)
            self._classify(current, event)
        if current is not None:
            yield current

    def _classify(self, change: _Change, event: WatchEvent) -> None:
        keys = self.keys
        key = event.kv.key
        try:
            if key.startswith(keys.pools):
                name = keys.strip(key, keys.pools)
                if event.kind == "put":
                    change.pools.append(decode_pool(name, event.kv.value))
                else:
                    change.deleted_pools.append(name)
            elif key.startswith(keys.all_records):
                kv = event.kv if event.kind == "put" else event.prev
                if kv is None:
                    return
                pool, block, address = keys.parse_record(key)
                record = decode_record(pool, block, address, kv.value)
                parts = change.node(record.node)
                (parts.records if event.kind == "put" else parts.released_records).append(record)
            elif key.startswith(f"{keys.prefix}nodes/"):
                name, _, rest = keys.strip(key, f"{keys.prefix}nodes/").partition("/")
                if rest == "alive":
                    change.alive[name] = event.kv.lease if event.kind == "put" else 0
                    if event.kind == "delete":
                        change.node(name).lease_lost = True
                elif rest == "status":
                    change.status[name] = event.kv.value if event.kind == "put" else None
                elif rest.startswith("blocks/"):
                    pool, block_id = rest[len("blocks/") :].split("/", 1)
                    cidr = parse_block_key(block_id, "watched block")
                    if event.kind == "put":
                        claimed_at = int(json.loads(event.kv.value).get("claimed_at", 0))
                        held = HeldBlock(pool, cidr, name, event.kv.create_revision, claimed_at)
                        change.node(name).blocks.append(held)
                    else:
                        claimed = event.prev.create_revision if event.prev else 0
                        change.node(name).released_blocks.append(
                            HeldBlock(pool, cidr, name, claimed)
                        )
        except (ValueError, KeyError, CoilError) as e:
            log.warning("view: ignoring key %s: %s", key, e)

    def _apply(self, change: _Change) -> None:
        """Take one revision's changes into the view, the history and every subscriber."""
        with self._lock:
            for pool in change.pools:
                self._pools[pool.name] = pool
            for name in change.deleted_pools:
                self._pools.pop(name, None)
            for node in change.alive.keys() | change.status.keys():
                self._node_rev[node] = change.revision
            for node, lease in change.alive.items():
                if lease:
                    self._alive[node] = lease
                else:
                    self._alive.pop(node, None)
            for node, value in change.status.items():
                if value is None:
                    self._status.pop(node, None)
                else:
                    self._status[node] = value
            self._revision = change.revision
            everyone = bool(change.pools or change.deleted_pools)
            # A pool change goes to every subscriber; otherwise only the nodes the change
            # concerns are looked up (a change must not cost a pass over ten thousand nodes).
            concerned = (
                list(self._subscribers.items())
                if everyone
                else [(n, self._subscribers[n]) for n in change.nodes if n in self._subscribers]
            )
            handover = _Handover()
            for node, subs in concerned:
                item = self._for(change, node)
                for sub in subs:
                    if change.revision > sub.after:
                        handover.put(sub, item)
            handover.send()
            if everyone or change.nodes:
                self._log.append(change)
                while len(self._log) > self._history:
                    self._log_from = self._log.popleft().revision
            self._lock.notify_all()
