"""The node agent: hands pod addresses out of this node's blocks, has each recorded durably by the
allocator before answering, claims and returns blocks, and keeps the node's routes in sync.

Concurrency: one lock guards `NodeState`; no RPC is made while holding it. Records and releases go
through two `GroupCommitter`s, so concurrent pods share allocator calls. Block claims for one pool
and family are serialised, so a burst of pods that fills a block causes one claim, not many.
A background thread (`maintain`) keeps a spare block once usage crosses a threshold, returns
blocks that stayed empty for a grace period (keeping the last block of each pool and family),
refreshes the pool list and re-syncs routes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from coil_core.blocks import Address, Network, gateway_of
from coil_core.model import (
    AllocationRecord,
    HeldBlock,
    NodeChange,
    Owner,
    Pool,
    RecordOutcome,
    RecordRequest,
    RecordResult,
    ReleaseOutcome,
    ReleaseRequest,
    ReleaseResult,
)
from coild.allocator_client import AllocatorClient
from coild.batcher import GroupCommitter
from coild.errors import (
    AddressTaken,
    AllocatorRejected,
    AllocatorUnavailable,
    Exhausted,
    InvalidRequest,
    NodeAgentError,
    NoPool,
    NotHeld,
    RoutesNotReady,
)
from coild.follow import NodeFollower
from coild.state import Allocation, Attachment, AttachmentKey, NodeBlock, NodeState

log = logging.getLogger("coild")

MAX_ALLOCATE_ROUNDS = 4
"""How often an allocation picks again after its choice proved stale (address recorded by someone
else, or block taken away)."""


@dataclass(frozen=True)
class AgentConfig:
    node: str
    spare_threshold: float = 0.8
    """Claim a spare block when this share of a pool's addresses on the node is in use."""
    release_grace: float = 60.0
    """Give back a block that has been empty this many seconds (keeping the last one)."""
    maintain_interval: float = 2.0
    pool_refresh: float = 600.0
    """Re-read the pool list this often (a safety net: pool changes come with WatchNode)."""
    route_resync: float = 30.0
    max_batch: int = 128
    report_interval: float = 600.0
    """While no WatchNode stream is open but coild follows, report this often besides at start
    and when the routes change (with a stream open, the lease rides on it: no periodic report)."""
    reconcile_interval: float = 600.0
    """The safety net's period: a fresh WatchNode snapshot this often (every pool, this node's
    blocks and records, reconciled with memory), or a listing when no stream is open."""
    table: int = 119
    watch: bool = True
    """Follow the allocator's WatchNode stream; without it (or with an allocator that has none)
    coild polls every POLL_* seconds as before."""


POLL_POOL_REFRESH = 10.0
POLL_REPORT = 30.0
POLL_RECONCILE = 60.0
"""The intervals of the polling design, used while coild does not follow WatchNode."""

START_SNAPSHOT_WAIT = 15.0
"""Seconds a starting coild waits for the stream's first snapshot before it lists instead."""

FOLLOW_GRACE = 5.0
"""Seconds without a WatchNode stream after which the allocator counts as unreachable."""

OWN_RELEASES_KEPT = 600.0
"""Seconds coild remembers a record it removed itself, to tell its removal from an operator's."""


@dataclass(frozen=True)
class PodAddress:
    address: Address
    prefixlen: int
    gateway: str
    pool: str

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.prefixlen}"


@dataclass(frozen=True)
class AllocateRequest:
    container_id: str
    interface: str
    namespace: str
    pod: str
    requested: tuple[Address, ...] = ()


class RouteSink(Protocol):
    """Where the node's block routes go (`coild.routes.RouteExporter` in coild)."""

    def sync(self, desired: set[Network]) -> object:
        """Make the routes exactly `desired`; raises NodeAgentError (RouteError) on failure."""
        ...

    def current(self) -> set[Network]:
        """The routes there now (what `report` tells the allocator); raises NodeAgentError."""
        ...


@dataclass(frozen=True)
class Settlement:
    """What one record result means for an allocation: done (`allocation`), failed (`error`), or
    neither, when the choice proved stale and the address must be chosen again (`retry`)."""

    allocation: Allocation | None = None
    error: NodeAgentError | None = None

    @property
    def retry(self) -> bool:
        return self.allocation is None and self.error is None


CHOOSE_AGAIN = Settlement()


class AgentEvents(Protocol):
    def allocated(self, pool: str, seconds: float) -> None: ...

    def released(self, count: int) -> None: ...

    def failed(self, operation: str, kind: str) -> None: ...

    def batch(self, kind: str, size: int) -> None: ...


class NoEvents:
    """AgentEvents that record nothing (the default; subclass it to watch one kind of event)."""

    def allocated(self, pool: str, seconds: float) -> None:
        pass

    def released(self, count: int) -> None:
        pass

    def failed(self, operation: str, kind: str) -> None:
        pass

    def batch(self, kind: str, size: int) -> None:
        pass


class NodeAgent:
    """One node's allocator of pod addresses. Thread-safe."""

    def __init__(
        self,
        config: AgentConfig,
        allocator: AllocatorClient,
        routes: RouteSink,
        *,
        events: AgentEvents | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.allocator = allocator
        self.routes = routes
        self.events = events or NoEvents()
        self._clock = clock
        self._lock = threading.Lock()
        self.state = NodeState()
        self._pools: dict[str, Pool] = {}
        self._pools_at = -1e9
        self._namespaces_checked: dict[str, float] = {}
        self._namespace_lookup = threading.Lock()  # one pool look-up at a time; others wait
        self._claim_locks: dict[tuple[str, int], threading.Lock] = defaultdict(threading.Lock)
        # One ADD, DEL or GC release of an attachment at a time (entries live only while used).
        self._attachment_locks: dict[AttachmentKey, tuple[threading.RLock, list[int]]] = {}
        self._routes_lock = threading.Lock()
        self._routes_dirty = threading.Event()
        self.ready = threading.Event()
        self.routes_synced = False
        self.routes_error = ""
        self._allocator_ok = False
        self._stop = threading.Event()
        self._records = GroupCommitter(
            "record-batches",
            self._commit_records,
            config.max_batch,
            lambda n: self.events.batch("record", n),
        )
        self._releases = GroupCommitter(
            "release-batches",
            self._commit_releases,
            config.max_batch,
            lambda n: self.events.batch("release", n),
        )
        self._thread: threading.Thread | None = None
        self._lease_id = 0
        self.follower: NodeFollower | None = None
        # Blocks and committed attachments when the current WatchNode stream was asked for:
        # what a snapshot may judge (see `apply`).
        self._before: tuple[list[NodeBlock], list[Attachment]] = ([], [])
        # (container, interface, address) -> when coild sent its release (see `apply`).
        self._own_releases: dict[tuple[str, str, Address], float] = {}
        self._reported: tuple[frozenset[Network], int] | None = None
        self._report_due = threading.Event()
        # Set once memory holds the node's state (from a listing or the stream's first
        # snapshot); a snapshot after that is reconciled, never installed.
        self._rebuilt = threading.Event()
        self._start_lock = threading.Lock()
        # Whether the current stream was asked for before memory held the node's state: its
        # first snapshot is installed, or (a listing came first) replaced by a fresh one.
        self._opened_empty = False
        self._lease_ttl = 0

    @property
    def allocator_ok(self) -> bool:
        """Whether the allocator answers: while following, whether the stream is up (or was
        within FOLLOW_GRACE seconds); otherwise what the last pool list said."""
        if self._following():
            assert self.follower is not None
            return self.follower.connected(FOLLOW_GRACE)
        return self._allocator_ok

    @allocator_ok.setter
    def allocator_ok(self, ok: bool) -> None:
        self._allocator_ok = ok

    def _following(self) -> bool:
        return self.follower is not None and not self.follower.unsupported

    def _streaming(self) -> bool:
        """Whether a WatchNode stream is open now."""
        return self.follower is not None and self.follower.connected()

    def _safety_net(self) -> None:
        """Catch up with anything the stream may have missed: a fresh snapshot on the stream
        when one is open (pools, blocks and records in one call), else a listing."""
        if self.follower is None or not self.follower.resync():
            self.reconcile()

    # -- life cycle -------------------------------------------------------------------------

    def start(self, wait: bool = True) -> None:
        """Rebuild state from the allocator (retrying until it answers), sync routes, then keep
        maintaining in the background. With `wait`, returns once ready."""
        self._thread = threading.Thread(target=self._run, name="maintain", daemon=True)
        self._thread.start()
        if wait:
            self.ready.wait()

    def stop(self) -> None:
        self._stop.set()
        self._routes_dirty.set()
        if self.follower is not None:
            self.follower.stop()
        if self._thread:
            self._thread.join(timeout=10)
        self._records.stop()
        self._releases.stop()

    def _run(self) -> None:
        delay = 0.2
        while not self._stop.is_set() and not self.ready.is_set():
            try:
                if self.config.watch:
                    self._start_following()
                else:
                    self._start_polling()
                if self._stop.is_set():
                    break
                self.ready.set()
            except NodeAgentError as e:
                log.warning("start: cannot rebuild state yet: %s", e)
            except Exception:
                # Never let the loop die: a coild that is not ready says so on /readyz.
                log.exception("start: rebuilding state failed")
            if not self.ready.is_set():
                # Jittered: coilds that failed together (an allocator that was down, busy with
                # a whole cluster starting) do not all come back in the same instant.
                self._stop.wait(random.uniform(delay / 2, delay))
                delay = min(delay * 2, 5.0)
        if self._stop.is_set():
            # Stopped while starting: a follower started meanwhile (after `stop` looked) ends
            # here with the start.
            if self.follower is not None:
                self.follower.stop()
            return
        last_maintain = last_report = last_reconcile = self._clock()
        last_routes = self._clock()
        while not self._stop.is_set():
            self._routes_dirty.wait(timeout=self.config.maintain_interval)
            if self._stop.is_set():
                return
            now = self._clock()
            following = self._following()
            streaming = self._streaming()
            # While a stream is open the lease rides on it and the periodic snapshot (below)
            # is the safety net: a report is sent only when due (start, routes changed, lease
            # lost, an earlier one failed).
            if streaming:
                report_every = float("inf")
            else:
                report_every = self.config.report_interval if following else POLL_REPORT
                if self._lease_ttl > 0:
                    # With no stream to carry it, the lease lives only by reports.
                    report_every = min(report_every, self._lease_ttl / 3)
            reconcile_every = self.config.reconcile_interval if following else POLL_RECONCILE
            for due, name, task in (
                (
                    self._routes_dirty.is_set() or now - last_routes >= self.config.route_resync,
                    "routes",
                    self._sync_routes_now,
                ),
                (now - last_maintain >= self.config.maintain_interval, "maintain", self.maintain),
                (
                    self._report_due.is_set() or now - last_report >= report_every,
                    "report",
                    self.report,
                ),
                (now - last_reconcile >= reconcile_every, "reconcile", self._safety_net),
            ):
                if not due:
                    continue
                try:
                    task()
                except NodeAgentError as e:
                    log.warning("%s: %s", name, e)
                except Exception:
                    log.exception("%s failed", name)
                if name == "routes":
                    last_routes = now
                elif name == "maintain":
                    last_maintain = now
                elif name == "report":
                    last_report = now
                else:
                    last_reconcile = now

    def _start_polling(self) -> None:
        """Start without a stream: state from a pool list and a listing of the node's blocks and
        records, then the first report (the node's lease: a ready coild is alive)."""
        self.rebuild()
        self._report_or_later()

    def _start_following(self) -> None:
        """Start on the stream: the first report (the node's lease, which the stream then keeps
        alive), then the stream's first snapshot (every pool, this node's blocks and records at
        one revision) is the state coild starts from. Two calls, where a listing start makes
        four and the stream's snapshot then repeats the listing's reads.

        When no snapshot comes within START_SNAPSHOT_WAIT seconds (an allocator without
        WatchNode, streams refused), state comes from a listing as without a stream; the
        follower carries on and takes a fresh snapshot to reconcile. A failed report is logged
        and sent again when due (the stream then reopens with the new lease). Raises
        NodeAgentError when the listing fails (the start is retried)."""
        self._report_or_later()
        if self._stop.is_set():
            return
        if self.follower is None:
            self.follower = NodeFollower(
                self.allocator,
                self.config.node,
                self.apply,
                lambda: self._lease_id,
                self._lease_lost,
                self._opening,
            )
            self.follower.start()
        follower = self.follower
        deadline = time.monotonic() + START_SNAPSHOT_WAIT
        while not self._rebuilt.is_set() and not follower.unsupported:
            if self._stop.is_set() or time.monotonic() >= deadline:
                break
            self._rebuilt.wait(0.1)
        if not self._rebuilt.is_set() and not self._stop.is_set():
            self.rebuild()

    def _sync_routes_now(self) -> None:
        self._routes_dirty.clear()
        self.sync_routes()

    def report(self) -> None:
        """Report to the allocator: make sure this node has a live lease, and tell it the routes
        in the kernel table. Runs at start, when the routes changed, when the lease was lost,
        and every `report_interval` as a safety net."""
        self._report_due.clear()
        with self._lock:
            routes = self.routes.current()
        before = self._lease_id
        self._lease_id, self._lease_ttl = self.allocator.report_node(
            self.config.node, self._lease_id, sorted(str(r) for r in routes), self.config.table
        )
        self._reported = (frozenset(routes), self._lease_id)
        if self._lease_id != before and self.follower is not None:
            self.follower.lease_changed()  # the new lease rides on the stream from now on

    def _report_or_later(self) -> None:
        """Report now; if that fails, log it and leave the report due for the maintain loop."""
        try:
            self.report()
        except NodeAgentError as e:
            self._report_due.set()
            log.warning("report: %s", e)

    def _lease_lost(self) -> None:
        """The allocator says this node's lease is gone: report at once for a new one."""
        log.warning("the allocator says this node's lease is gone; reporting again")
        self._lease_id = 0
        self._report_or_later()

    # -- following the allocator ------------------------------------------------------------

    def _opening(self) -> None:
        """A WatchNode stream is about to be asked for: note what a snapshot may judge."""
        with self._lock:
            self._before = (list(self.state.blocks), list(self.state.committed()))
            self._opened_empty = not self._rebuilt.is_set()

    def apply(self, change: NodeChange) -> None:
        """Take in a change the allocator pushed (WatchNode).

        Pools are replaced or removed at once. The first snapshot at start is the state coild
        starts from (`_start_following`); a later one is reconciled like a periodic listing,
        judging only what existed when the stream was asked for. Otherwise only removals made
        elsewhere matter (coild knows its own claims and records): a released block is dropped
        if coild holds that very claim (same claim revision), and a removed record frees its
        address if a committed attachment still holds it for the same container and interface
        and coild did not remove it itself.
        """
        now = self._clock()
        if change.snapshot:
            with self._lock:
                opened_empty, self._opened_empty = self._opened_empty, False
            if opened_empty:
                if self._install(
                    change.pools, change.blocks, change.records, "the stream's snapshot"
                ):
                    return
                # A listing was installed after this stream was asked for: the snapshot may be
                # older than the listing, and nothing it could judge existed when its stream was
                # asked for. Ask for a fresh one (the follower reopens from revision 0 at once).
                log.info("a listing came before the stream's first snapshot: taking a fresh one")
                if self.follower is not None:
                    self.follower.resync()
                return
            self._pools = {p.name: p for p in change.pools}
            self._pools_at = now
            blocks_before, attachments_before = self._before
            self._reconcile_with(
                change.blocks, change.records, blocks_before, attachments_before, now
            )
            return
        if change.pools or change.deleted_pools:
            pools = dict(self._pools)
            for pool in change.pools:
                pools[pool.name] = pool
            for name in change.deleted_pools:
                pools.pop(name, None)
            self._pools = pools
            log.info(
                "pools changed: %s",
                ", ".join([p.name for p in change.pools] + [f"-{n}" for n in change.deleted_pools]),
            )
        if not change.released_blocks and not change.released_records:
            return
        changed = False
        with self._lock:
            for held in change.released_blocks:
                mine = next(
                    (b for b in self.state.blocks if b.pool == held.pool and b.cidr == held.cidr),
                    None,
                )
                if mine is None or mine.claim_revision != held.claim_revision:
                    continue  # returned by coild itself, or claimed anew since
                log.warning("block %s of pool %s was released elsewhere", held.cidr, held.pool)
                self.state.drop_block(held.pool, held.cidr)
                changed = True
            for record in change.released_records:
                owner = record.owner
                own = (owner.container_id, owner.interface, record.address)
                if self._own_releases.pop(own, None) is not None:
                    continue
                attachment = self.state.attachments.get((owner.container_id, owner.interface))
                if attachment is None or not attachment.done.is_set() or attachment.failed:
                    continue
                kept = [a for a in attachment.allocations if a.address != record.address]
                if len(kept) == len(attachment.allocations):
                    continue
                log.warning(
                    "address %s of %s/%s was freed elsewhere",
                    record.address,
                    owner.container_id,
                    owner.interface,
                )
                self.state.free(record.pool, record.address, now)
                if not kept:
                    self.state.attachments.pop(attachment.key, None)
                attachment.allocations = kept
        if changed:
            self._routes_dirty.set()

    def reconcile(self) -> None:
        """Catch up with changes made behind this agent's back: blocks the allocator no longer
        lists for this node (an operator's `node release --force`) are dropped, blocks it lists
        that this agent does not know are taken in, and committed attachments whose records
        were removed (`coilctl address free`) are forgotten, so their addresses can be handed
        out again.

        Only what existed before the listing was asked for is judged, so a block claimed or an
        attachment committed meanwhile is never mistaken for a removed one.
        """
        with self._lock:
            blocks_before = list(self.state.blocks)
            attachments_before = list(self.state.committed())
        listed = self.allocator.node_blocks(self.config.node)
        self._reconcile_with(
            listed.blocks, listed.records, blocks_before, attachments_before, self._clock()
        )

    def _reconcile_with(
        self,
        blocks: Sequence[HeldBlock],
        records: Sequence[AllocationRecord],
        blocks_before: Sequence[NodeBlock],
        attachments_before: Sequence[Attachment],
        now: float,
    ) -> None:
        """Make memory agree with a listing of the node's blocks and records (see `reconcile`),
        judging only the blocks and attachments of before the listing was asked for."""
        listed_blocks = {(b.pool, b.cidr) for b in blocks}
        listed_records = {(r.owner.container_id, r.owner.interface, r.address) for r in records}
        by_block = _records_by_block(records)
        changed = False
        with self._lock:
            known = {(b.pool, b.cidr) for b in self.state.blocks}
            for held in blocks:
                if (held.pool, held.cidr) in known:
                    continue
                # Held in etcd but unknown here (a claim whose answer was lost, or an index
                # entry re-created by `coilctl check --repair`): take it in with its records.
                log.warning("taking in block %s of pool %s held in etcd", held.cidr, held.pool)
                self._load_block(self.state, held, by_block[(held.pool, held.cidr)], now)
                changed = True
            for block in blocks_before:
                if (block.pool, block.cidr) not in listed_blocks and block in self.state.blocks:
                    log.warning(
                        "block %s of pool %s was released elsewhere", block.cidr, block.pool
                    )
                    self.state.drop_block(block.pool, block.cidr)
                    changed = True
            for attachment in attachments_before:
                if self.state.attachments.get(attachment.key) is not attachment:
                    continue
                kept = [
                    a
                    for a in attachment.allocations
                    if (attachment.container_id, attachment.interface, a.address) in listed_records
                ]
                for gone in set(attachment.allocations) - set(kept):
                    log.warning(
                        "address %s of %s/%s was freed elsewhere",
                        gone.address,
                        attachment.container_id,
                        attachment.interface,
                    )
                    self.state.free(gone.pool, gone.address, now)
                if not kept:
                    self.state.attachments.pop(attachment.key, None)
                attachment.allocations = kept
        if changed:
            self._routes_dirty.set()

    def rebuild(self) -> None:
        """Load this node's blocks and records from a pool list and a listing into memory, and
        sync routes (the start without a stream's snapshot)."""
        pools = self._list_pools()
        listed = self.allocator.node_blocks(self.config.node)
        self._install(pools, listed.blocks, listed.records, "a listing")

    def _install(
        self,
        pools: Sequence[Pool],
        blocks: Sequence[HeldBlock],
        records: Sequence[AllocationRecord],
        source: str,
    ) -> bool:
        """Start from `pools`, `blocks` and `records` (a listing, or the first snapshot of the
        stream): memory is replaced by them, once; False (nothing done) for whichever of the two
        comes second (both come before coild is ready, so before it hands out anything). What
        is installed is what a later snapshot on the same stream may judge. Syncs routes."""
        with self._start_lock:
            if self._rebuilt.is_set():
                return False
            state = NodeState()
            now = self._clock()
            by_block = _records_by_block(records)
            # The pools that came with the blocks: the cached list is still empty at start, and a
            # block loaded without its pool would hand out the subnet's reserved addresses.
            by_name = {p.name: p for p in pools}
            for b in blocks:
                self._load_block(state, b, by_block[(b.pool, b.cidr)], now, by_name)
            for r in records:
                key = (r.owner.container_id, r.owner.interface)
                attachment = state.attachments.get(key)
                if attachment is None:
                    attachment = Attachment(
                        r.owner.container_id, r.owner.interface, r.owner.namespace, r.owner.pod
                    )
                    attachment.done.set()
                    state.attachments[key] = attachment
                attachment.allocations.append(Allocation(r.address, r.pool, r.block))
            with self._lock:
                self.state = state
                self._before = (list(state.blocks), list(state.committed()))
            self._pools = by_name
            self._pools_at = now
            self._rebuilt.set()
        self.allocator_ok = True
        log.info(
            "rebuilt state from %s: %d blocks, %d attachments",
            source,
            len(state.blocks),
            len(state.attachments),
        )
        self.sync_routes()
        return True

    def _load_block(
        self,
        state: NodeState,
        held: HeldBlock,
        records: Sequence[AllocationRecord],
        now: float,
        pools: Mapping[str, Pool] | None = None,
    ) -> NodeBlock:
        """Hold a block listed by the allocator in `state`, with its recorded addresses used and
        its pool's reserved addresses kept from pods (`pools`: the pools to find it in, by name;
        default the cached list).

        `records` are the block's records, oldest first: the round robin continues after the
        newest. A recorded address stays used even if it is one a pod should not have got.
        """
        pool = (self._pools if pools is None else pools).get(held.pool)
        used = [r.address for r in records]
        return state.add_block(
            held.pool,
            held.cidr,
            held.claim_revision,
            reserved=set(pool.reserved() if pool else ()) - set(used),
            used=used,
            last=used[-1] if used else None,
            now=now,
        )

    def sync_routes(self) -> None:
        """Make the kernel table hold exactly this node's blocks (a failure is logged, and
        leaves `routes_synced` false and its reason in `routes_error`)."""
        with self._lock:
            desired = self.state.routes()
        with self._routes_lock:
            try:
                self.routes.sync(desired)
                self.routes_synced = True
                self.routes_error = ""
                if self._reported is not None and self._reported[0] != desired:
                    self._report_due.set()  # the allocator's status of this node is out of date
            except NodeAgentError as e:
                self.routes_synced = False
                self.routes_error = str(e)
                log.error("route sync failed: %s", e)

    def _require_routes(self, op: str) -> None:
        """Sync the routes if the last sync failed; RoutesNotReady if they still cannot be
        written, so no pod gets an address of a block whose route is missing."""
        if not self.routes_synced:
            self.sync_routes()
        if not self.routes_synced:
            raise RoutesNotReady(
                f"{op}: the node's block routes cannot be written to table "
                f"{self.config.table} ({self.routes_error}); try again"
            )

    # -- pools ------------------------------------------------------------------------------

    def _refresh_pools(self) -> None:
        """Read the pool list from the allocator (AllocatorUnavailable if it cannot)."""
        now = self._clock()
        pools = self._list_pools()
        self._pools = {p.name: p for p in pools}
        self._pools_at = now

    def _list_pools(self) -> list[Pool]:
        """The allocator's pool list (AllocatorUnavailable if it cannot answer)."""
        try:
            pools = self.allocator.list_pools()
        except AllocatorUnavailable:
            self.allocator_ok = False
            raise
        self.allocator_ok = True
        return list(pools)

    def pool_for(self, namespace: str) -> Pool:
        """The pool named like the namespace if it exists, else "default"; else NoPool.

        A namespace without a pool of its own in the cached list is looked up again at most
        once a second per namespace, so a pool created just before its namespace's first pod
        is seen, and pods of namespaces without a pool do not ask the allocator every time.
        Concurrent callers wait for the look-up in flight and use its answer: none falls
        through to "default" while the namespace's own pool is still being read.
        """
        if namespace not in self._pools:
            with self._namespace_lookup:
                now = self._clock()
                checked = self._namespaces_checked.get(namespace, -1e9)
                if namespace not in self._pools and now - checked >= 1.0:
                    if len(self._namespaces_checked) > 10_000:
                        self._namespaces_checked.clear()
                    try:
                        self._refresh_pools()
                    except AllocatorUnavailable:
                        if not self._pools:
                            raise
                    finally:
                        self._namespaces_checked[namespace] = self._clock()
        pool = self._pools.get(namespace) or self._pools.get("default")
        if pool is None:
            raise NoPool(
                f'no pool serves namespace "{namespace}": create a pool named "{namespace}" '
                'or "default"'
            )
        return pool

    def pools(self) -> list[str]:
        return sorted(self._pools)

    # -- allocate ---------------------------------------------------------------------------

    def allocate(self, request: AllocateRequest) -> list[PodAddress]:
        """Addresses for an attachment: one per family of its pool, or the requested ones.

        Idempotent: a repeated request gets the attachment's addresses. Answers only after the
        records are committed. Raises InvalidRequest, NoPool, Exhausted, AddressTaken,
        AllocatorUnavailable.
        """
        self._require_ready()
        with self._one_at_a_time((request.container_id, request.interface)):
            return self._allocate(request)

    @contextlib.contextmanager
    def _one_at_a_time(self, key: AttachmentKey) -> Iterator[None]:
        """Serialise the ADDs and DELs of one attachment. Without it, a retried ADD that overlaps
        the one before it (the runtime timed out and asked again) could give back an earlier
        attempt's addresses after the other attempt had recorded them anew for the same
        attachment: release requests name the attachment, not which attempt recorded it."""
        with self._lock:
            lock, users = self._attachment_locks.setdefault(key, (threading.RLock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._lock:
                users[0] -= 1
                if users[0] == 0:
                    del self._attachment_locks[key]

    def _allocate(self, request: AllocateRequest) -> list[PodAddress]:
        started = self._clock()
        key = (request.container_id, request.interface)
        existing = self._existing(key)
        if existing is not None:
            return self._pod_addresses(existing)
        if self._uncertain(key) is not None:
            # An earlier ADD of this attachment failed with its outcome unknown: give back
            # what it may have recorded before starting again.
            self._release(key)
        pool = self.pool_for(request.namespace)
        self._require_routes(f"allocate {request.container_id}/{request.interface}")
        targets: list[tuple[int, Address | None]]
        if request.requested:
            targets = []
            for address in request.requested:
                if pool.subnet_of(address) is None:
                    raise InvalidRequest(
                        f'requested address "{address}" is not in pool "{pool.name}" '
                        f"({', '.join(map(str, pool.subnets))}), the pool of namespace "
                        f'"{request.namespace}"'
                    )
                if any(f == address.version for f, _ in targets):
                    raise InvalidRequest(
                        f"requested addresses {', '.join(map(str, request.requested))}: "
                        "at most one per family"
                    )
                targets.append((address.version, address))
        else:
            targets = [(int(f), None) for f in pool.families()]
        attachment = Attachment(
            request.container_id, request.interface, request.namespace, request.pod
        )
        with self._lock:
            if key in self.state.attachments:
                attachment = self.state.attachments[key]
                racing = True
            else:
                self.state.attachments[key] = attachment
                racing = False
        if racing:
            existing = self._existing(key)
            if existing is None:
                raise AllocatorUnavailable(
                    f"allocate {request.container_id}/{request.interface}: a concurrent request "
                    "for the same attachment failed; try again"
                )
            return self._pod_addresses(existing)
        try:
            allocations = self._allocate_targets(pool, targets, attachment)
        except BaseException:
            with self._lock:
                attachment.failed = True
                if attachment.allocations:
                    # Addresses whose records may still commit: keep them, to release later.
                    attachment.uncertain = True
                    log.warning(
                        "allocate %s/%s failed with its outcome unknown; %s kept in doubt "
                        "until its DEL",
                        request.container_id,
                        request.interface,
                        ", ".join(str(a.address) for a in attachment.allocations),
                    )
                else:
                    self.state.attachments.pop(key, None)
            attachment.done.set()
            raise
        with self._lock:
            attachment.allocations = allocations
        attachment.done.set()
        self.events.allocated(pool.name, self._clock() - started)
        return self._pod_addresses(attachment)

    def _require_ready(self) -> None:
        if not self.ready.is_set():
            raise AllocatorUnavailable(
                "coild is starting: its state is not rebuilt from the allocator yet"
            )

    def _uncertain(self, key: AttachmentKey) -> Attachment | None:
        """The attachment if an allocation of it failed with addresses in doubt, else None."""
        with self._lock:
            attachment = self.state.attachments.get(key)
        return attachment if attachment is not None and attachment.uncertain else None

    def _existing(self, key: AttachmentKey) -> Attachment | None:
        with self._lock:
            attachment = self.state.attachments.get(key)
        if attachment is None:
            return None
        # A concurrent request for the same attachment is in flight: its answer is ours.
        if not attachment.done.wait(timeout=60) or attachment.failed:
            return None
        return attachment

    def _pod_addresses(self, attachment: Attachment) -> list[PodAddress]:
        out = []
        for a in attachment.allocations:
            pool = self._pools.get(a.pool)
            subnet = (pool.subnet_of(a.address) if pool else None) or a.block
            # The pod gets its pool subnet's prefix, so that the gateway is on-link.
            out.append(PodAddress(a.address, subnet.prefixlen, str(gateway_of(subnet)), a.pool))
        return out

    def _allocate_targets(
        self, pool: Pool, targets: list[tuple[int, Address | None]], attachment: Attachment
    ) -> list[Allocation]:
        """Choose, record, and on stale choices choose again; all families or none."""
        done: dict[int, Allocation] = {}
        doubtful: list[Allocation] = []
        pending = list(targets)
        try:
            for _ in range(MAX_ALLOCATE_ROUNDS):
                if not pending:
                    break
                chosen: list[tuple[int, Address | None, tuple[NodeBlock, Address]]] = []
                try:
                    for f, want in pending:
                        chosen.append((f, want, self._reserve(pool, f, want)))
                except BaseException:
                    # A family could not be reserved (exhausted, address taken, allocator
                    # down): the addresses reserved in memory for the other families were
                    # never submitted, so give them back here, or the node loses them.
                    for _, _, (_, address) in chosen:
                        self._unreserve(pool.name, address)
                    raise
                futures = [
                    self._records.submit(self._record_item(pool.name, block, address, attachment))
                    for _, _, (block, address) in chosen
                ]
                retry: list[tuple[int, Address | None]] = []
                first_error: NodeAgentError | None = None
                for (family, want, (block, address)), future in zip(chosen, futures, strict=True):
                    try:
                        result = future.result()
                    except NodeAgentError as e:
                        if _outcome_unknown(e):
                            # The record may commit after all: keep the address used.
                            doubtful.append(Allocation(address, pool.name, block.cidr))
                        else:
                            self._unreserve(pool.name, address)
                        first_error = first_error or e
                        continue
                    settled = self._settle(pool, block, address, want, result)
                    if settled.allocation is not None:
                        done[family] = settled.allocation
                    elif settled.error is not None:
                        first_error = first_error or settled.error
                    else:
                        retry.append((family, want))
                if first_error is not None:
                    raise first_error
                pending = retry
            if pending:
                raise AllocatorUnavailable(
                    f"allocate {attachment.container_id}/{attachment.interface}: choices kept "
                    "turning out stale; try again"
                )
        except BaseException:
            # Half-done: give back what was recorded, so a failed family leaves nothing behind.
            # What may be recorded (doubtful, or a release that failed) stays on the attachment.
            with self._lock:
                attachment.allocations = list(done.values()) + doubtful
            if done:
                with contextlib.suppress(NodeAgentError):
                    self._release_allocations(attachment, list(done.values()))
            raise
        return [done[f] for f, _ in targets]

    def _record_item(
        self, pool: str, block: NodeBlock, address: Address, attachment: Attachment
    ) -> RecordRequest:
        return RecordRequest(
            address,
            pool,
            block.cidr,
            Owner(
                attachment.namespace, attachment.pod, attachment.container_id, attachment.interface
            ),
        )

    def _settle(
        self,
        pool: Pool,
        block: NodeBlock,
        address: Address,
        want: Address | None,
        result: RecordResult,
    ) -> Settlement:
        """Turn one record result into an allocation, an error, or a new choice."""
        outcome = result.outcome
        if outcome is RecordOutcome.RECORDED:
            return Settlement(Allocation(address, pool.name, block.cidr))
        if outcome is RecordOutcome.EXISTING and result.record is not None:
            # The attachment already held an address (a request whose answer was lost): keep it,
            # if it is this node's. One recorded by another node is a conflict: a pod here
            # must not get an address routed to that node, nor its DEL here free it.
            self._unreserve(pool.name, address)
            existing = result.record
            if existing.node != self.config.node:
                return Settlement(
                    error=InvalidRequest(
                        f'allocate "{existing.owner.container_id}/{existing.owner.interface}": '
                        f'this attachment already holds "{existing.address}" on node '
                        f'"{existing.node}"; an attachment lives on one node (release it there '
                        "first)"
                    )
                )
            with self._lock:
                held = self.state.block_of(existing.pool, existing.address)
                if held is not None and existing.address not in held.addresses:
                    held.addresses.take(existing.address)
            return Settlement(Allocation(existing.address, existing.pool, existing.block))
        if outcome is RecordOutcome.ADDRESS_IN_USE:
            # Someone holds it that we did not know of: leave it marked used and choose again.
            if want is not None:
                return Settlement(
                    error=AddressTaken(f'requested address "{address}" is in use: {result.message}')
                )
            log.warning("address %s was recorded elsewhere: %s", address, result.message)
            return CHOOSE_AGAIN
        if outcome is RecordOutcome.BLOCK_NOT_HELD:
            log.warning("block %s is no longer ours: %s", block.cidr, result.message)
            with self._lock:
                self.state.drop_block(block.pool, block.cidr)
            self._routes_dirty.set()
            return CHOOSE_AGAIN
        self._unreserve(pool.name, address)
        if outcome is RecordOutcome.INVALID:
            return Settlement(
                error=InvalidRequest(result.message or f'address "{address}" cannot be recorded')
            )
        return Settlement(error=AllocatorRejected(result.message or "record refused"))

    def _reserve(self, pool: Pool, family: int, want: Address | None) -> tuple[NodeBlock, Address]:
        """Take an address in memory: the wanted one, or the next free one, claiming a block when
        needed. Raises AddressTaken, InvalidRequest, Exhausted, AllocatorUnavailable."""
        now = self._clock()
        if want is not None:
            if want in pool.reserved():
                raise InvalidRequest(
                    f'requested address "{want}" is reserved in pool "{pool.name}" (a subnet\'s '
                    "network address, the pods' gateway or a broadcast address)"
                )
            with self._lock:
                block = self.state.take(pool.name, want)
            if block is not None:
                return block, want
            cidr = ipaddress.ip_network(
                f"{want}/{want.max_prefixlen - pool.block_bits}", strict=False
            )
            try:
                self._claim(pool, family, str(cidr))
            except AddressTaken as e:
                raise AddressTaken(f'requested address "{want}": {e}') from None
            with self._lock:
                block = self.state.take(pool.name, want)
            if block is None:
                raise AllocatorUnavailable(f'address "{want}": its block vanished; try again')
            return block, want
        with self._lock:
            chosen = self.state.choose(pool.name, family, now)
        if chosen is not None:
            return chosen
        with self._claim_locks[(pool.name, family)]:
            # Another request may have claimed while we waited for the lock.
            with self._lock:
                chosen = self.state.choose(pool.name, family, now)
            if chosen is not None:
                return chosen
            self._claim(pool, family)
            with self._lock:
                chosen = self.state.choose(pool.name, family, now)
            if chosen is None:
                raise Exhausted(f'pool "{pool.name}": no free IPv{family} address on this node')
            return chosen

    def _claim(self, pool: Pool, family: int, block: str = "") -> NodeBlock:
        """Claim a block from the allocator, hold it, and export its route before any address
        of it is handed out (so the first pod of a block is reachable when its ADD returns)."""
        try:
            claimed = self.allocator.claim_block(self.config.node, pool.name, family, block)
        except Exhausted:
            self.events.failed("claim", "exhausted")
            raise
        with self._lock:
            held = self.state.add_block(
                pool.name,
                claimed.cidr,
                claimed.claim_revision,
                reserved=pool.reserved(),
                now=self._clock(),
            )
        log.info("claimed block %s of pool %s", claimed.cidr, pool.name)
        self.sync_routes()
        self._require_routes(f'claim in pool "{pool.name}"')
        return held

    def _unreserve(self, pool: str, address: Address) -> None:
        with self._lock:
            self.state.free(pool, address, self._clock())

    # -- release ----------------------------------------------------------------------------

    def release(self, container_id: str, interface: str) -> list[Address]:
        """Release an attachment's addresses, also those of an allocation that failed with its
        outcome unknown; succeeds (with none) if it holds nothing.

        Raises AllocatorUnavailable (what was not released stays held; the runtime retries DEL).
        """
        self._require_ready()
        key = (container_id, interface)
        with self._one_at_a_time(key):
            return self._release(key)

    def _release(self, key: AttachmentKey) -> list[Address]:
        attachment = self._existing(key) or self._uncertain(key)
        if attachment is None:
            return []
        allocations = list(attachment.allocations)
        self._release_allocations(attachment, allocations)
        with self._lock:
            if self.state.attachments.get(key) is attachment:
                self.state.attachments.pop(key)
        self.events.released(len(allocations))
        return [a.address for a in allocations]

    def _release_allocations(self, attachment: Attachment, allocations: list[Allocation]) -> None:
        """Release `allocations` of `attachment` in the allocator; each one released (or not
        recorded) is freed in memory and leaves `attachment.allocations`. Raises the first
        failure once every result is in: the allocations it concerns stay on the attachment."""
        # Noted before the release is sent: its removal may come back on the WatchNode stream
        # before the answer does, and must not be taken for an operator's `address free`.
        now = self._clock()
        with self._lock:
            if len(self._own_releases) > 10_000:
                self._own_releases = {
                    k: t for k, t in self._own_releases.items() if now - t < OWN_RELEASES_KEPT
                }
            for a in allocations:
                self._own_releases[(attachment.container_id, attachment.interface, a.address)] = now
        futures = [
            self._releases.submit(
                ReleaseRequest(a.address, attachment.container_id, attachment.interface)
            )
            for a in allocations
        ]
        first_error: NodeAgentError | None = None
        for a, future in zip(allocations, futures, strict=True):
            try:
                result = future.result()
            except NodeAgentError as e:
                first_error = first_error or e
                continue
            if result.outcome is ReleaseOutcome.OWNER_MISMATCH:
                # Recorded for someone else: not ours to free in memory either.
                log.warning("release %s: %s", a.address, result.message)
            else:
                self._unreserve(a.pool, a.address)
            with self._lock:
                if a in attachment.allocations:
                    attachment.allocations.remove(a)
        if first_error is not None:
            raise first_error

    def check(self, container_id: str, interface: str) -> list[PodAddress]:
        """The attachment's addresses; NotHeld if it holds none."""
        self._require_ready()
        attachment = self._existing((container_id, interface))
        if attachment is None:
            raise NotHeld(f"attachment {container_id}/{interface} holds no address on this node")
        return self._pod_addresses(attachment)

    def garbage_collect(self, valid: set[AttachmentKey]) -> list[AttachmentKey]:
        """Release every committed attachment not in `valid`, and every one whose allocation
        failed with addresses in doubt; returns those released."""
        self._require_ready()
        with self._lock:
            stale = [
                a
                for a in self.state.attachments.values()
                if a.key not in valid and a.done.is_set() and (a.uncertain or not a.failed)
            ]
        released = []
        for attachment in stale:
            self.release(attachment.container_id, attachment.interface)
            released.append(attachment.key)
        return released

    # -- batching ---------------------------------------------------------------------------

    def _commit_records(self, items: Sequence[RecordRequest]) -> list[RecordResult]:
        return self.allocator.record(self.config.node, items)

    def _commit_releases(self, items: Sequence[ReleaseRequest]) -> list[ReleaseResult]:
        return self.allocator.release(self.config.node, items)

    # -- maintenance ------------------------------------------------------------------------

    def maintain(self) -> None:
        """Refresh pools, claim spare blocks where usage crossed the threshold, and return
        blocks empty for longer than the grace period (never the last of a pool and family)."""
        refresh = self.config.pool_refresh if self._following() else POLL_POOL_REFRESH
        # With a stream open, pools come with it and with its periodic snapshot.
        if self._clock() - self._pools_at >= refresh and not self._streaming():
            self._refresh_pools()
        now = self._clock()
        with self._lock:
            groups = sorted({(b.pool, b.family) for b in self.state.blocks})
        for pool_name, family in groups:
            pool = self._pools.get(pool_name)
            with self._lock:
                used, capacity = self.state.usage(pool_name, family)
            if pool is not None and capacity and used >= self.config.spare_threshold * capacity:
                with self._claim_locks[(pool_name, family)]:
                    with self._lock:
                        used, capacity = self.state.usage(pool_name, family)
                    if used >= self.config.spare_threshold * capacity:
                        with contextlib.suppress(Exhausted):
                            self._claim(pool, family)
                continue
            self._return_empty(pool_name, family, now)

    def _return_empty(self, pool_name: str, family: int, now: float) -> None:
        with self._claim_locks[(pool_name, family)]:
            with self._lock:
                in_doubt = [
                    b for b in self.state.blocks_of(pool_name, family) if b.release_in_doubt
                ]
                blocks = [
                    b for b in self.state.blocks_of(pool_name, family) if not b.release_in_doubt
                ]
                used, capacity = self.state.usage(pool_name, family)
                candidates = [
                    b
                    for b in blocks
                    if b.addresses.is_empty
                    and b.empty_since is not None
                    and now - b.empty_since >= self.config.release_grace
                ]
                # Keep the last block, and never return one if that would call for a spare.
                victims = []
                remaining = len(blocks)
                for b in reversed(candidates):  # youngest first
                    if remaining <= 1:
                        break
                    left = capacity - b.addresses.capacity
                    if left <= 0 or used >= self.config.spare_threshold * left:
                        break
                    b.retiring = True
                    victims.append(b)
                    remaining -= 1
                    capacity = left
            for b in in_doubt + victims:
                self._give_back(b)

    def _give_back(self, b: NodeBlock) -> None:
        """Release a retiring block; drop it once the allocator no longer lists it for this
        node. A release whose outcome is unknown (timed out; it may commit later) leaves the
        block retiring and in doubt, to be asked about again on the next pass."""
        try:
            self.allocator.release_block(self.config.node, b.pool, str(b.cidr))
        except NodeAgentError as e:
            if _outcome_unknown(e):
                log.warning("return block %s: %s; will ask again", b.cidr, e)
                with self._lock:
                    b.release_in_doubt = True
                return
            # Refused: perhaps because an earlier release did commit ("not held by any
            # node"). Whether the block is still ours decides, not the refusal's wording.
            try:
                still_held = any(
                    h.pool == b.pool and h.cidr == b.cidr
                    for h in self.allocator.node_blocks(self.config.node).blocks
                )
            except NodeAgentError as asked:
                log.warning("return block %s: %s; then: %s", b.cidr, e, asked)
                with self._lock:
                    b.release_in_doubt = True
                return
            if still_held:
                log.warning("return block %s: %s", b.cidr, e)
                with self._lock:
                    b.retiring = b.release_in_doubt = False
                return
        with self._lock:
            self.state.drop_block(b.pool, b.cidr)
        log.info("returned empty block %s of pool %s", b.cidr, b.pool)
        self._routes_dirty.set()

    # -- status -----------------------------------------------------------------------------

    def status(self) -> list[str]:
        """Pools this node can serve; AllocatorUnavailable or NoPool when it cannot serve."""
        self._require_ready()
        follower = self.follower
        if not (self._following() and follower is not None and follower.connected()):
            self._refresh_pools()  # else the pools are current through WatchNode
        if not self._pools:
            raise NoPool("no pool exists: create one with coilctl pool create")
        return self.pools()


def _outcome_unknown(error: NodeAgentError) -> bool:
    """Whether a failed allocator call may still have taken effect: it timed out, the
    allocator could not be reached or answered something unexpected. A definite refusal
    (invalid, exhausted, taken, lost races) changed nothing."""
    return isinstance(error, (AllocatorUnavailable, AllocatorRejected))


def _records_by_block(
    records: Sequence[AllocationRecord],
) -> defaultdict[tuple[str, Network], list[AllocationRecord]]:
    """Records grouped by (pool, block), each group in the order given (oldest first)."""
    out: defaultdict[tuple[str, Network], list[AllocationRecord]] = defaultdict(list)
    for r in records:
        out[(r.pool, r.block)].append(r)
    return out
