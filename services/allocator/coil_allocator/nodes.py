"""Nodes: what a node holds, its liveness, and giving back all of a node that is gone.

Owns in etcd: ``nodes/<node>/alive`` (on a lease of `NODE_TTL` seconds, refreshed by the agent's
reports and, while the agent follows WatchNode, by the serving replica's keep-alive stream) and
``nodes/<node>/status`` (when last written, table and routes). Reads the node's block index
and records; `release_node` deletes them through the same keys `Claims` and `Records` own.

Transactions:
- report: puts ``alive`` on a new lease when the one sent has expired, and ``status`` when the
  routes or the table changed, in one transaction, nothing otherwise (neither guarded: only the
  node's own agent writes them);
- release-node: per block, deletes its records with their attachments in chunks while the block
  is the node's, then the block and its index entry while no record is left (records that
  appear meanwhile are removed too, up to `MAX_ATTEMPTS` times, then `Conflict`); finally the
  node's ``alive`` and ``status``.
"""

from __future__ import annotations

import base64
import json
import threading
from collections import defaultdict
from collections.abc import Sequence

from coil_allocator.claims import Claims
from coil_allocator.common import MAX_ATTEMPTS, Context, Part, first
from coil_allocator.keys import Unreadable, decode_record, decode_status
from coil_allocator.records import RELEASES_PER_TXN
from coil_allocator.store import (
    Delete,
    Get,
    Op,
    Put,
    none_with_prefix,
    unchanged,
    value_is,
)
from coil_allocator.view import ClusterView
from coil_core.blocks import (
    Network,
)
from coil_core.errors import (
    CoilError,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from coil_core.model import (
    AllocationRecord,
    HeldBlock,
    Pool,
)
from coil_core.rules import parse_subnet, validate_node_name

NODE_TTL = 180
"""Seconds a node agent counts as alive after its lease was last refreshed (by a report, or every
120 s by the replica that serves its WatchNode stream)."""

MAX_REPORTED_ROUTES = 4096
"""Routes one report may carry: one per block the node holds, far more than any node needs."""

MAX_CIDR_LENGTH = len("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255/128")


MAX_PAGE_SIZE = 5000
"""Records per page of `node_blocks_page`: well under gRPC's 4 MiB default receive limit."""


def _page_token(revision: int, offset: int, node: str) -> str:
    raw = f"{revision}:{offset}:{node}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _parse_page_token(token: str, node: str, op: str) -> tuple[int, int]:
    """(revision, offset) of a token `_page_token` made for `node`; InvalidArgument if not one."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        revision, offset, of = raw.split(":", 2)
        parsed = int(revision), int(offset)
    except ValueError:
        parsed, of = (0, -1), ""
    if of != node or parsed[0] <= 0 or parsed[1] < 0:
        raise InvalidArgument(
            f'{op} "{node}": page token "{token[:50]}" is not one of this node\'s listing'
        )
    return parsed


def validate_routes(routes: Sequence[str], op: str) -> list[str]:
    """The reported routes, canonical and sorted, if each is a CIDR and there are not too many.

    Raises:
        InvalidArgument: more than `MAX_REPORTED_ROUTES` routes, or one that is not a CIDR (the
            message names its position and quotes at most its first 50 characters).
    """
    if len(routes) > MAX_REPORTED_ROUTES:
        raise InvalidArgument(f"{op}: {len(routes)} routes; at most {MAX_REPORTED_ROUTES}")
    out = set()
    for i, text in enumerate(routes):
        if len(text) > MAX_CIDR_LENGTH:
            raise InvalidArgument(
                f'{op} route #{i + 1} "{text[:50]}...": {len(text)} characters, longer than '
                "any CIDR"
            )
        out.add(str(parse_subnet(text, f"{op} route #{i + 1}")))
    return sorted(out)


class Nodes(Part):
    """A node's blocks, heartbeat and release. Thread-safe."""

    def __init__(self, context: Context, claims: Claims, node_ttl: int = NODE_TTL) -> None:
        super().__init__(context)
        self._claims = claims
        self._node_ttl = node_ttl
        # node -> (revision, lease on its alive key, status value) as this replica last wrote
        # them: newer than the view until the view has seen that revision.
        self._written: dict[str, tuple[int, int, bytes | None]] = {}
        self._lock = threading.Lock()

    def node_blocks(
        self, node: str, with_records: bool = False
    ) -> tuple[list[HeldBlock], list[AllocationRecord], int]:
        """The blocks a node holds (and all their records, oldest first), read at one revision.

        Raises InvalidArgument (bad node name)."""
        blocks, records, rev, _ = self.node_blocks_page(node, with_records)
        return blocks, records, rev

    def node_blocks_page(
        self, node: str, with_records: bool = False, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[HeldBlock], list[AllocationRecord], int, str]:
        """The blocks a node holds and one page of their records, and the next page's token.

        Every page has all the blocks, read at the revision of the first page (the token carries
        it), so the pages together are one consistent listing. With `page_size` 0 every record
        comes in one answer, oldest first; else at most `min(page_size, MAX_PAGE_SIZE)`, in
        block order (pool, block, key), and the token is "" after the last page.

        Raises InvalidArgument (bad node name, a token not of this node's listing),
        FailedPrecondition (etcd compacted the token's revision: list again from the start).
        """
        blocks, records, rev, token, _ = self._listing(node, with_records, page_size, page_token)
        return blocks, records, rev, token

    def _listing(
        self, node: str, with_records: bool, page_size: int, page_token: str
    ) -> tuple[list[HeldBlock], list[AllocationRecord], int, str, dict[str, Pool]]:
        """`node_blocks_page`, and every pool read at the same revision (by name)."""
        op = "node blocks"
        validate_node_name(node, op)
        pinned, start = _parse_page_token(page_token, node, op) if page_token else (0, 0)
        prefix = self.keys.node_blocks(node)
        try:
            index, rev = self.store.range(prefix, revision=pinned)
        except Unavailable:
            raise
        except CoilError as e:
            if pinned and "compacted" in str(e):
                raise FailedPrecondition(
                    f'{op} "{node}": the listing\'s revision {pinned} was compacted by etcd; '
                    "list again from the first page"
                ) from None
            raise
        pools, _ = self._pools(rev)
        paged = with_records and page_size > 0
        end = start + min(page_size, MAX_PAGE_SIZE)
        blocks: list[HeldBlock] = []
        records: list[AllocationRecord] = []
        seen = 0  # records of the blocks before this one, in page order
        for kv in index:
            try:
                pool, cidr = self.keys.parse_block(kv.key, prefix)
            except Unreadable as e:
                self._skip("node-index", kv.key, e)
                continue
            records_prefix = self.keys.records(pool, cidr)
            if paged:
                used = self.store.count(records_prefix, revision=rev)
                wanted = seen < end and seen + used > start
                recs = self.store.range(records_prefix, revision=rev)[0] if wanted else []
                recs = recs[max(0, start - seen) : end - seen]
                seen += used
            else:
                recs, _ = self.store.range(records_prefix, keys_only=not with_records, revision=rev)
                used = len(recs)
            reserved = pools[pool].reserved_in(cidr) if pool in pools else 0
            blocks.append(
                HeldBlock(
                    pool, cidr, node, kv.create_revision, self._claimed_at(kv), used, reserved
                )
            )
            if with_records:
                for r in recs:
                    # An unreadable record is left out: its address stays taken in etcd, so
                    # recording it again is refused as ADDRESS_IN_USE.
                    try:
                        _, _, address = self.keys.parse_record(r.key)
                        records.append(decode_record(pool, cidr, address, r.value))
                    except Unreadable as e:
                        self._skip("record", r.key, e)
        blocks.sort(key=lambda b: (b.pool, b.cidr.version, int(b.cidr.network_address)))
        if not paged:
            records.sort(key=lambda r: (r.created_at, int(r.address)))
        more = paged and end < seen
        return blocks, records, rev, _page_token(rev, end, node) if more else "", pools

    def node_snapshot(
        self, node: str
    ) -> tuple[list[Pool], list[HeldBlock], list[AllocationRecord], int]:
        """Every pool, and the node's blocks and records, all read at one revision (WatchNode's
        snapshot)."""
        blocks, records, revision, _, pools = self._listing(node, True, 0, "")
        return [pools[n] for n in sorted(pools)], blocks, records, revision

    def release_node(self, node: str, force: bool = False) -> tuple[list[HeldBlock], int]:
        """Give back every block and record of a node that is gone.

        Returns the blocks released and the number of records removed. Raises InvalidArgument,
        NotFound (the node holds nothing), FailedPrecondition (its agent is alive and `force`
        is not set), Conflict.
        """
        op = "node release"
        validate_node_name(node, op)
        alive = self.store.get(self.keys.node_alive(node))
        if alive is not None and not force:
            raise FailedPrecondition(
                f'{op} "{node}": the node\'s agent is alive (it holds a lease and reports); '
                "releasing would hand its pods' addresses to others. Stop coild on the node "
                "and wait for its lease to expire, or force it"
            )
        blocks, records, _ = self.node_blocks(node, with_records=True)
        if not blocks:
            raise NotFound(f'{op} "{node}": the node holds no block')
        removed = 0
        by_block: dict[tuple[str, Network], list[AllocationRecord]] = defaultdict(list)
        for r in records:
            by_block[(r.pool, r.block)].append(r)
        for block in blocks:
            block_key_ = self.keys.block(block.pool, block.cidr)
            mine = value_is(block_key_, node.encode())
            recs = by_block[(block.pool, block.cidr)]
            for i in range(0, len(recs), RELEASES_PER_TXN):
                chunk = recs[i : i + RELEASES_PER_TXN]
                ops: list[Op] = []
                for r in chunk:
                    ops.append(Delete(self.keys.record(r.pool, r.block, r.address)))
                    ops.append(
                        Delete(
                            self.keys.attachment(
                                r.owner.container_id, r.owner.interface, r.address.version
                            )
                        )
                    )
                if self.store.txn([mine], ops).succeeded:
                    removed += len(chunk)
            for attempt in range(MAX_ATTEMPTS):
                records_prefix = self.keys.records(block.pool, block.cidr)
                result = self.store.txn(
                    [mine, none_with_prefix(records_prefix)],
                    [
                        Delete(block_key_),
                        Delete(self.keys.node_block(node, block.pool, block.cidr)),
                    ],
                    [Get(block_key_), Get(records_prefix, prefix=True)],
                )
                if result.succeeded:
                    self._claims.forget_held(block.pool, block.cidr)
                    break
                holder = first(result.responses[0])
                if holder is None or holder.value.decode(errors="replace") != node:
                    # Someone else released it meanwhile; drop our stale index entry.
                    self.store.txn([], [Delete(self.keys.node_block(node, block.pool, block.cidr))])
                    break
                # Records appeared (the node is still alive?): remove them too and retry.
                late = result.responses[1]
                for kv in late if isinstance(late, list) else []:
                    ops = [Delete(kv.key)]
                    try:
                        _, _, address = self.keys.parse_record(kv.key)
                        r = decode_record(block.pool, block.cidr, address, kv.value)
                        ops.append(
                            Delete(
                                self.keys.attachment(
                                    r.owner.container_id, r.owner.interface, address.version
                                )
                            )
                        )
                    except Unreadable as e:
                        # The node's block is being given back with all it holds; only the
                        # attachment of a record that cannot be read is unknown (check finds it).
                        self._skip("record", kv.key, e)
                    if self.store.txn([unchanged(kv.key, kv.mod_revision)], ops).succeeded:
                        removed += 1
                self._backoff(attempt, "node release")
            else:
                raise Conflict(f'{op} "{node}": block "{block.cidr}" kept changing; try again')
        self.store.txn(
            [], [Delete(self.keys.node_alive(node)), Delete(self.keys.node_status(node))]
        )
        return blocks, removed

    def _known_keys(self, view: ClusterView, node: str) -> tuple[int, bytes | None]:
        """The lease of the node's `alive` key (0: none) and its `status` value (None: none),
        from memory: the view's, or this replica's own last write when the view has not seen it
        yet (the view catches up within milliseconds, but a caller must not wait)."""
        on_key, status, seen_at = view.node_keys(node)
        mine = self._written.get(node)
        if mine is not None and mine[0] > seen_at:
            _, on_key, status = mine
        return on_key, status

    def alive_lease(self, node: str, lease_id: int, view: ClusterView | None = None) -> int:
        """The lease the node's `alive` key lives on (0: the node has none), as it bears on
        `lease_id`, the lease the node's agent names.

        Answered from memory (`view`, by default the replica's, and this replica's own last
        write) when that says `lease_id`: the common case reads nothing from etcd. Otherwise
        memory may only lag behind a report answered a moment ago (on another replica, or
        while the view was behind), so the key is read from etcd, once: the lease of another
        node, or a dead one, costs that one read. Without a current view, always that read.
        Says nothing of whether the lease still lives. Raises Unavailable (the read).
        """
        view = view if view is not None else self._cluster_view
        if view is not None and view.current:
            on_key, _ = self._known_keys(view, node)
            if on_key == lease_id:
                return on_key
        kv = self.store.get(self.keys.node_alive(node))
        return kv.lease if kv is not None else 0

    def report_node(
        self, node: str, lease_id: int, routes: Sequence[str], table: int
    ) -> tuple[int, int]:
        """A node agent's report: make sure it has a live lease, and note its routes.

        Returns the lease to send next time and its TTL. The `alive` key lives on the lease; the
        lease is refreshed by this report (one message on the replica's keep-alive stream, none
        when this replica keeps it alive already for the node's WatchNode stream) and expires
        NODE_TTL seconds after the last refresh. A lease that has expired (or is not the one on
        the alive key) is replaced: a new lease, and the alive key put on it. The `status` key
        is written only when the routes or the table change, or the node comes back alive, so
        a node that reports what it reported before writes nothing. With the replica's view,
        neither key is read from etcd. Only the lease this node's `alive` key lives on counts:
        lease IDs are sequential, and a node that sends another's gets a lease of its own, the
        other lease untouched. Raises InvalidArgument (bad node name; more than
        `MAX_REPORTED_ROUTES` routes or one that is not a CIDR: nothing is stored), Unavailable.
        """
        op = "node report"
        validate_node_name(node, op)
        wanted = validate_routes(routes, f'{op} "{node}"')
        now = self._now()
        view = (
            self._cluster_view
            if self._cluster_view is not None and self._cluster_view.current
            else None
        )
        if view is not None:
            on_key, status = self._known_keys(view, node)
            if lease_id <= 0 and on_key > 0:
                # A first report (a restarted coild, or a retry whose first answer was lost)
                # while the node's alive key lives: carry on with that lease, write nothing.
                lease_id = on_key
            alive = (
                lease_id > 0
                and on_key == lease_id
                and (self.store.lease_held(lease_id) or self.store.keep_alive(lease_id) > 0)
            )
        else:
            alive = False
            if lease_id > 0:
                on_alive = self.store.get(self.keys.node_alive(node))
                alive = on_alive is not None and on_alive.lease == lease_id
                alive = alive and self.store.keep_alive(lease_id) > 0
            current = self.store.get(self.keys.node_status(node))
            status = current.value if current else None
        ops: list[Op] = []
        if not alive:
            lease_id = self.store.grant_lease(self._node_ttl)
            ops.append(
                Put(self.keys.node_alive(node), json.dumps({"since": now}).encode(), lease=lease_id)
            )
        old = None
        if status is not None:
            try:
                old = decode_status(status)
            except Unreadable as e:
                self._skip("node-status", self.keys.node_status(node), e)  # rewritten below
        if not alive or old is None or list(old.routes) != wanted or old.table != table:
            status = json.dumps({"seen_at": now, "table": table, "routes": wanted}).encode()
            ops.append(Put(self.keys.node_status(node), status))
        if ops:
            revision = self.store.txn([], ops).revision
            with self._lock:
                if len(self._written) > 100_000:
                    self._written.clear()
                self._written[node] = (revision, lease_id, status)
        return lease_id, self._node_ttl
