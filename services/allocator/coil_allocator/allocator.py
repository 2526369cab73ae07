"""The allocator: pools, block claims and allocation records, each change one etcd transaction.

Every state change is a single transaction guarded by compares on exactly the keys it depends on
(see docs/design.md). When a compare is lost to a concurrent writer the change is retried here,
and only here, after re-reading what changed, a bounded number of times with jittered backoff;
then `Conflict` is raised. Store unavailability (`Unavailable`) is never retried here: a
transaction whose reply was lost may have committed, so the caller decides.

All public methods raise the domain errors of `coil_core.errors`:
`InvalidArgument`, `NotFound`, `AlreadyExists`, `FailedPrecondition`, `PoolExhausted`, `Conflict`,
`Unavailable`, as their docstrings say.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from coil_allocator.audit import Finding, Snapshot, audit
from coil_allocator.keys import (
    Keys,
    decode_pool,
    decode_record,
    encode_pool,
    encode_record,
    parse_record_path,
    record_ref,
)
from coil_allocator.store import (
    Compare,
    Delete,
    Get,
    KeyValue,
    Op,
    Put,
    Store,
    absent,
    none_changed_since,
    none_with_prefix,
    unchanged,
    value_is,
)
from coil_core.blocks import (
    Address,
    Network,
    block_at,
    block_count,
    block_key,
    block_of,
    find_overlap,
    parse_block_key,
    parse_subnet,
    reserved_addresses,
    validate_block_size,
    validate_pool_subnet,
)
from coil_core.errors import (
    AlreadyExists,
    CoilError,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PoolExhausted,
)
from coil_core.model import (
    AddressInfo,
    AllocationRecord,
    Family,
    HeldBlock,
    Pool,
    PoolUsage,
    RecordOutcome,
    RecordRequest,
    RecordResult,
    ReleaseOutcome,
    ReleaseRequest,
    ReleaseResult,
    SubnetBlocks,
    parse_address,
)
from coil_core.rules import validate_node_name, validate_pool_name

MAX_ATTEMPTS = 8
"""How often a change is tried when it keeps losing compares to concurrent writers."""

NODE_TTL = 90
"""Seconds a node agent counts as alive after its last report (it reports every 30 s)."""

STATUS_REFRESH = 300
"""A node's status key is rewritten at least this often while it reports (last-seen time)."""

POOLS_MAX_AGE = 5.0
"""Seconds the record and release paths reuse a read of the pools (see `_recent_pools`)."""

MAX_CLAIM_ATTEMPTS = 16
"""Claims re-read the held blocks with every lost race, so each retry sees the others' progress."""

RECORDS_PER_TXN = 40
"""Records per transaction: 2 compares, 2 puts and 3 failure reads each stay under etcd's
default limit of 128 operations per transaction."""

RELEASES_PER_TXN = 60
MAX_BATCH = 1000


class AllocatorEvents(Protocol):
    """What the allocator reports to metrics (see coil_allocator.metrics)."""

    def retried(self, operation: str) -> None: ...

    def claimed(self, pool: str, retries: int) -> None: ...


class _NoEvents:
    def retried(self, operation: str) -> None:
        pass

    def claimed(self, pool: str, retries: int) -> None:
        pass


def _first(result: list[KeyValue] | int | None) -> KeyValue | None:
    if isinstance(result, list) and result:
        return result[0]
    return None


class Allocator:
    """Pools, blocks and records over a `Store`. Thread-safe; replicas may run side by side."""

    def __init__(
        self,
        store: Store,
        prefix: str = "/coil/",
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        events: AllocatorEvents | None = None,
        sleep: Callable[[float], None] = time.sleep,
        node_ttl: int = NODE_TTL,
    ) -> None:
        self.store = store
        self.keys = Keys(prefix)
        self._clock = clock
        self._rng = rng or random.Random()
        self._events = events or _NoEvents()
        self._sleep = sleep
        self._node_ttl = node_ttl
        # Per pool: the pool and the held block ids as last seen by this replica. Claims pick
        # from it without reading etcd first; a stale view only costs a lost compare, whose
        # failure branch brings the fresh one (see claim_block).
        self._claim_cache: dict[str, tuple[Pool, KeyValue, set[str]]] = {}
        self._cache_lock = threading.Lock()
        self._pools_cache: tuple[float, dict[str, Pool]] = (-1e9, {})

    # -- helpers ----------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self._clock())

    def _backoff(self, attempt: int, operation: str) -> None:
        self._events.retried(operation)
        self._sleep(self._rng.uniform(0, min(0.05, 0.002 * 2**attempt)))

    def _load_pool(self, name: str, op: str) -> tuple[Pool, KeyValue]:
        kv = self.store.get(self.keys.pool(name))
        if kv is None:
            raise NotFound(f'{op} "{name}": no such pool')
        return decode_pool(name, kv.value), kv

    def _pools(self, revision: int = 0) -> tuple[dict[str, Pool], int]:
        kvs, rev = self.store.range(self.keys.pools, revision=revision)
        pools = {}
        for kv in kvs:
            name = self.keys.strip(kv.key, self.keys.pools)
            pools[name] = decode_pool(name, kv.value)
        return pools, rev

    def _recent_pools(self, fresh: bool = False) -> dict[str, Pool]:
        """The pools as read at most POOLS_MAX_AGE seconds ago (now, with `fresh`).

        For the record and release paths, which would otherwise read every pool per batch.
        Callers trust a cached pool only to say yes (this address lies in that pool's subnet,
        which never changes once added); where it says no, they ask again with `fresh`.
        """
        now = time.monotonic()
        with self._cache_lock:
            at, pools = self._pools_cache
        if fresh or now - at > POOLS_MAX_AGE:
            pools, _ = self._pools()
            with self._cache_lock:
                self._pools_cache = (now, pools)
        return pools

    def _locate(self, pools: Iterable[Pool], address: Address) -> tuple[Pool, Network] | None:
        for pool in pools:
            subnet = pool.subnet_of(address)
            if subnet is not None:
                return pool, block_of(subnet, pool.block_bits, address, "locate")
        return None

    # -- pools ------------------------------------------------------------------------------

    def create_pool(self, name: str, subnets: Sequence[str], block_bits: int) -> Pool:
        """Create a pool.

        Raises InvalidArgument (bad name, subnet or block size; no subnet; two given subnets
        overlap), AlreadyExists (name taken, or a subnet overlaps another pool's), Conflict.
        """
        op = "pool create"
        validate_pool_name(name, op)
        if not subnets:
            raise InvalidArgument(f'{op} "{name}": at least one subnet is required')
        if block_bits < 0:
            raise InvalidArgument(f'{op} "{name}": block size {block_bits} is negative')
        parsed: list[Network] = []
        for text in subnets:
            subnet = parse_subnet(text, f'{op} "{name}" subnet')
            validate_pool_subnet(subnet, f'{op} "{name}" subnet')
            validate_block_size(subnet, block_bits, f'{op} "{name}"')
            clash = find_overlap(subnet, [(name, s) for s in parsed])
            if clash:
                raise InvalidArgument(f'{op} "{name}": subnets "{clash[1]}" and "{subnet}" overlap')
            parsed.append(subnet)
        pool = Pool(name, tuple(parsed), block_bits)
        for attempt in range(MAX_ATTEMPTS):
            pools, rev = self._pools()
            if name in pools:
                raise AlreadyExists(f'{op} "{name}": a pool of that name exists')
            self._check_overlap(op, name, parsed, pools)
            result = self.store.txn(
                [absent(self.keys.pool(name)), none_changed_since(self.keys.pools, rev)],
                [Put(self.keys.pool(name), encode_pool(pool))],
            )
            if result.succeeded:
                return pool
            self._backoff(attempt, "pool create")
        raise Conflict(f'{op} "{name}": pools kept changing; try again')

    def _check_overlap(
        self, op: str, name: str, subnets: Iterable[Network], pools: dict[str, Pool]
    ) -> None:
        existing = [(p.name, s) for p in pools.values() for s in p.subnets]
        for subnet in subnets:
            clash = find_overlap(subnet, existing)
            if clash:
                raise AlreadyExists(
                    f'{op} "{name}": subnet "{subnet}" overlaps subnet "{clash[1]}" '
                    f'of pool "{clash[0]}"'
                )

    def add_subnet(self, name: str, subnet_text: str) -> Pool:
        """Add a subnet to a pool. Raises InvalidArgument, NotFound, AlreadyExists, Conflict."""
        op = "pool add-subnet"
        validate_pool_name(name, op)
        subnet = parse_subnet(subnet_text, f'{op} "{name}" subnet')
        validate_pool_subnet(subnet, f'{op} "{name}" subnet')
        for attempt in range(MAX_ATTEMPTS):
            pools, rev = self._pools()
            pool = pools.get(name)
            if pool is None:
                raise NotFound(f'{op} "{name}": no such pool')
            validate_block_size(subnet, pool.block_bits, f'{op} "{name}"')
            self._check_overlap(op, name, [subnet], pools)
            updated = Pool(name, (*pool.subnets, subnet), pool.block_bits)
            result = self.store.txn(
                [none_changed_since(self.keys.pools, rev)],
                [Put(self.keys.pool(name), encode_pool(updated))],
                [Get(self.keys.pool(name))],
            )
            if result.succeeded:
                return updated
            if _first(result.responses[0]) is None:
                raise NotFound(f'{op} "{name}": no such pool (deleted meanwhile)')
            self._backoff(attempt, "pool add-subnet")
        raise Conflict(f'{op} "{name}": pools kept changing; try again')

    def list_pools(self) -> list[Pool]:
        """Every pool, sorted by name."""
        pools, _ = self._pools()
        return [pools[n] for n in sorted(pools)]

    def get_pool(self, name: str, subnet_text: str = "") -> tuple[Pool, list[SubnetBlocks]]:
        """A pool with the held blocks of each subnet (or of the one given).

        Raises InvalidArgument, NotFound (no such pool, or the subnet is not one of its).
        """
        op = "pool show"
        validate_pool_name(name, op)
        pool, kv = self._load_pool(name, op)
        subnets = pool.subnets
        if subnet_text:
            wanted = parse_subnet(subnet_text, op)
            if wanted not in pool.subnets:
                raise NotFound(f'{op} "{name}": subnet "{wanted}" is not one of the pool\'s')
            subnets = (wanted,)
        blocks, rev = self.store.range(self.keys.blocks(name))
        # Per block: "<family>/<block-id>/<address>" after the pool's prefix.
        records_prefix = self.keys.pool_records(name)
        used = Counter(
            key[len(records_prefix) :].split("/", 2)[1]
            for key in self.store.keys(records_prefix, revision=rev)
        )
        by_subnet: dict[Network, list[HeldBlock]] = defaultdict(list)
        for b in blocks:
            block_id = self.keys.strip(b.key, self.keys.blocks(name))
            cidr = parse_block_key(block_id, "stored block")
            subnet = pool.subnet_of(cidr)
            if subnet is None:
                continue
            by_subnet[subnet].append(
                HeldBlock(
                    name,
                    cidr,
                    b.value.decode(),
                    b.create_revision,
                    0,
                    used[block_id],
                    pool.reserved_in(cidr),
                )
            )
        return pool, [
            SubnetBlocks(
                s,
                block_count(s, pool.block_bits),
                tuple(sorted(by_subnet[s], key=lambda h: int(h.cidr.network_address))),
            )
            for s in subnets
        ]

    def delete_pool(self, name: str) -> None:
        """Delete a pool that has no held block.

        Raises InvalidArgument, NotFound, FailedPrecondition (blocks held), Conflict.
        """
        op = "pool delete"
        validate_pool_name(name, op)
        for attempt in range(MAX_ATTEMPTS):
            _, kv = self._load_pool(name, op)
            result = self.store.txn(
                [unchanged(kv.key, kv.mod_revision), none_with_prefix(self.keys.blocks(name))],
                [Delete(kv.key)],
                [Get(self.keys.blocks(name), prefix=True)],
            )
            if result.succeeded:
                return
            held = result.responses[0]
            if isinstance(held, list) and held:
                nodes = sorted({h.value.decode() for h in held})
                shown = ", ".join(nodes[:5]) + (", ..." if len(nodes) > 5 else "")
                raise FailedPrecondition(
                    f'{op} "{name}": {len(held)} block(s) are held (by node {shown}); '
                    "release them first"
                )
            self._backoff(attempt, "pool delete")
        raise Conflict(f'{op} "{name}": the pool kept changing; try again')

    # -- blocks -----------------------------------------------------------------------------

    def claim_specific_block(self, node: str, pool_name: str, block_text: str) -> HeldBlock:
        """Claim exactly the block `block_text` (CIDR) of a pool, for a static address request.

        Returns the block; if `node` holds it already, returns it as held. Raises InvalidArgument
        (bad names, not a block of the pool), NotFound (no such pool), AlreadyExists (another node
        holds it), Conflict.
        """
        op = "block claim"
        validate_node_name(node, op)
        validate_pool_name(pool_name, op)
        block = parse_block_key(block_text.replace("/", "_", 1), op)
        for attempt in range(MAX_ATTEMPTS):
            pool, pool_kv = self._load_pool(pool_name, op)
            subnet = pool.subnet_of(block)
            if subnet is None or block.prefixlen != block.max_prefixlen - pool.block_bits:
                raise InvalidArgument(f'{op} "{block}": not a block of pool "{pool_name}"')
            key = self.keys.block(pool_name, block)
            now = self._now()
            result = self.store.txn(
                [unchanged(pool_kv.key, pool_kv.mod_revision), absent(key)],
                [
                    Put(key, node.encode()),
                    Put(
                        self.keys.node_block(node, pool_name, block),
                        json.dumps({"claimed_at": now}).encode(),
                    ),
                ],
                [Get(key), Get(self.keys.node_block(node, pool_name, block))],
            )
            if result.succeeded:
                self._events.claimed(pool_name, attempt)
                return HeldBlock(
                    pool_name, block, node, result.revision, now, 0, pool.reserved_in(block)
                )
            holder = _first(result.responses[0])
            if holder is not None:
                if holder.value.decode() != node:
                    raise AlreadyExists(f'{op} "{block}": held by node "{holder.value.decode()}"')
                index = _first(result.responses[1])
                claimed_at = int(json.loads(index.value)["claimed_at"]) if index else 0
                used, _ = self.store.range(self.keys.records(pool_name, block), keys_only=True)
                return HeldBlock(
                    pool_name,
                    block,
                    node,
                    holder.create_revision,
                    claimed_at,
                    len(used),
                    pool.reserved_in(block),
                )
            self._backoff(attempt, "block claim")
        raise Conflict(f'{op} "{block}": the pool kept changing; try again')

    def claim_block(
        self, node: str, pool_name: str, family: Family | None = None
    ) -> tuple[HeldBlock, int]:
        """Claim a free block of a pool for a node; return it and how many races it lost.

        The block is chosen at random among the free ones, so that nodes claiming at the same
        time rarely want the same block; the transaction compares only that block's key (and
        the pool's revision), so claims of different blocks never conflict. The choice uses this
        replica's last view of the pool, so a claim is usually one round trip to etcd: a stale
        view loses the compare, and the failure branch returns the current view.

        Raises InvalidArgument (bad node or pool name, family absent from the pool), NotFound
        (no such pool), PoolExhausted (no free block of the family), Conflict.
        """
        op = "block claim"
        validate_node_name(node, op)
        validate_pool_name(pool_name, op)
        blocks_prefix = self.keys.blocks(pool_name)
        with self._cache_lock:
            cached = self._claim_cache.get(pool_name)
        fresh = cached is None
        if cached is None:
            pool, pool_kv = self._load_pool(pool_name, op)
            held_kvs, _ = self.store.range(blocks_prefix, keys_only=True)
            held = {self.keys.strip(kv.key, blocks_prefix) for kv in held_kvs}
        else:
            pool, pool_kv, held = cached
        fam = family or (pool.families() or (Family.IPV4,))[0]
        for attempt in range(MAX_CLAIM_ATTEMPTS):
            subnets = pool.subnets_of(fam)
            if not subnets:
                raise InvalidArgument(f'{op} "{pool_name}": the pool has no IPv{int(fam)} subnet')
            with self._cache_lock:
                block = self._pick_free(pool, subnets, held)
            if block is None and not fresh:
                # The cached view may be stale (blocks released through another replica).
                pool, pool_kv = self._load_pool(pool_name, op)
                held_kvs, _ = self.store.range(blocks_prefix, keys_only=True)
                held = {self.keys.strip(kv.key, blocks_prefix) for kv in held_kvs}
                fresh = True
                with self._cache_lock:
                    self._claim_cache[pool_name] = (pool, pool_kv, held)
                    block = self._pick_free(pool, subnets, held)
            if block is None:
                raise PoolExhausted(
                    f'{op} "{pool_name}": pool exhausted: no free IPv{int(fam)} block '
                    f"(all {sum(block_count(s, pool.block_bits) for s in subnets)} are held)"
                )
            now = self._now()
            block_key_ = self.keys.block(pool_name, block)
            result = self.store.txn(
                [unchanged(pool_kv.key, pool_kv.mod_revision), absent(block_key_)],
                [
                    Put(block_key_, node.encode()),
                    Put(
                        self.keys.node_block(node, pool_name, block),
                        json.dumps({"claimed_at": now}).encode(),
                    ),
                ],
                # Lost: read what changed in the same round trip, so the next pick is informed.
                [Get(pool_kv.key), Get(blocks_prefix, prefix=True, keys_only=True)],
            )
            if result.succeeded:
                with self._cache_lock:
                    held.add(block_key(block))
                    self._claim_cache[pool_name] = (pool, pool_kv, held)
                self._events.claimed(pool_name, attempt)
                return HeldBlock(
                    pool_name, block, node, result.revision, now, 0, pool.reserved_in(block)
                ), attempt
            current = _first(result.responses[0])
            if current is None:
                with self._cache_lock:
                    self._claim_cache.pop(pool_name, None)
                raise NotFound(f'{op} "{pool_name}": no such pool (deleted meanwhile)')
            if current.mod_revision != pool_kv.mod_revision:
                pool, pool_kv = decode_pool(pool_name, current.value), current
            now_held = result.responses[1]
            if isinstance(now_held, list):
                held = {self.keys.strip(kv.key, blocks_prefix) for kv in now_held}
                fresh = True
            with self._cache_lock:
                self._claim_cache[pool_name] = (pool, pool_kv, held)
            self._backoff(attempt, "block claim")
        raise Conflict(
            f'{op} "{pool_name}": lost {MAX_CLAIM_ATTEMPTS} races for free blocks; try again'
        )

    def _forget_held(self, pool_name: str, block: Network) -> None:
        """Keep this replica's claim view in step with a release it made itself."""
        with self._cache_lock:
            cached = self._claim_cache.get(pool_name)
            if cached is not None:
                cached[2].discard(block_key(block))

    def _pick_free(self, pool: Pool, subnets: Sequence[Network], held: set[str]) -> Network | None:
        counts = [block_count(s, pool.block_bits) for s in subnets]
        total = sum(counts)
        held_here = sum(1 for h in held if (":" in h) == (subnets[0].version == 6))
        if held_here >= total:
            return None
        start = self._rng.randrange(total)
        # Probe forward from a random block: among held + 1 blocks, plus the few that hold only
        # reserved addresses, one is free.
        for step in range(min(total, held_here + 1 + 3 * len(subnets))):
            block = self._block_by_index(pool, subnets, counts, (start + step) % total)
            # A one-address block holding only a reserved address would be of no use.
            if block_key(block) not in held and pool.reserved_in(block) < block.num_addresses:
                return block
        return None

    @staticmethod
    def _block_by_index(
        pool: Pool, subnets: Sequence[Network], counts: Sequence[int], index: int
    ) -> Network:
        for subnet, count in zip(subnets, counts, strict=True):
            if index < count:
                return block_at(subnet, pool.block_bits, index, "block claim")
            index -= count
        raise ValueError(f"block index {index} beyond the pool's subnets")

    def release_block(self, node: str, pool_name: str, block_text: str) -> None:
        """Give back an empty block held by `node`.

        Raises InvalidArgument, FailedPrecondition (held by another node, not held, or addresses
        still recorded in it), Conflict.
        """
        op = "block release"
        validate_node_name(node, op)
        validate_pool_name(pool_name, op)
        block = parse_block_key(block_text.replace("/", "_", 1), op)
        key = self.keys.block(pool_name, block)
        records = self.keys.records(pool_name, block)
        result = self.store.txn(
            [value_is(key, node.encode()), none_with_prefix(records)],
            [Delete(key), Delete(self.keys.node_block(node, pool_name, block))],
            [Get(key), Get(records, prefix=True, keys_only=True)],
        )
        if result.succeeded:
            self._forget_held(pool_name, block)
            return
        holder = _first(result.responses[0])
        if holder is None:
            raise FailedPrecondition(f'{op} "{block}": not held by any node')
        if holder.value.decode() != node:
            raise FailedPrecondition(
                f'{op} "{block}": held by node "{holder.value.decode()}", not "{node}"'
            )
        used = result.responses[1]
        count = len(used) if isinstance(used, list) else 0
        raise FailedPrecondition(f'{op} "{block}": {count} address(es) are still recorded in it')

    def node_blocks(
        self, node: str, with_records: bool = False
    ) -> tuple[list[HeldBlock], list[AllocationRecord], int]:
        """The blocks a node holds (and their records), read at one revision."""
        op = "node blocks"
        validate_node_name(node, op)
        prefix = self.keys.node_blocks(node)
        index, rev = self.store.range(prefix)
        pools, _ = self._pools(rev)
        blocks: list[HeldBlock] = []
        records: list[AllocationRecord] = []
        for kv in index:
            pool, block_id = self.keys.strip(kv.key, prefix).split("/", 1)
            cidr = parse_block_key(block_id, "stored block")
            recs, _ = self.store.range(
                self.keys.records(pool, cidr), keys_only=not with_records, revision=rev
            )
            claimed_at = int(json.loads(kv.value).get("claimed_at", 0))
            reserved = pools[pool].reserved_in(cidr) if pool in pools else 0
            blocks.append(
                HeldBlock(pool, cidr, node, kv.create_revision, claimed_at, len(recs), reserved)
            )
            if with_records:
                for r in recs:
                    address = parse_address(r.key.rsplit("/", 1)[1], "stored record")
                    records.append(decode_record(pool, cidr, address, r.value))
        blocks.sort(key=lambda b: (b.pool, b.cidr.version, int(b.cidr.network_address)))
        records.sort(key=lambda r: (r.created_at, int(r.address)))
        return blocks, records, rev

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
                    self._forget_held(block.pool, block.cidr)
                    break
                holder = _first(result.responses[0])
                if holder is None or holder.value.decode() != node:
                    # Someone else released it meanwhile; drop our stale index entry.
                    self.store.txn([], [Delete(self.keys.node_block(node, block.pool, block.cidr))])
                    break
                # Records appeared (the node is still alive?): remove them too and retry.
                late = result.responses[1]
                for kv in late if isinstance(late, list) else []:
                    address = parse_address(kv.key.rsplit("/", 1)[1], "stored record")
                    r = decode_record(block.pool, block.cidr, address, kv.value)
                    attachment = self.keys.attachment(
                        r.owner.container_id, r.owner.interface, address.version
                    )
                    if self.store.txn(
                        [unchanged(kv.key, kv.mod_revision)],
                        [Delete(kv.key), Delete(attachment)],
                    ).succeeded:
                        removed += 1
                self._backoff(attempt, "node release")
            else:
                raise Conflict(f'{op} "{node}": block "{block.cidr}" kept changing; try again')
        self.store.txn(
            [], [Delete(self.keys.node_alive(node)), Delete(self.keys.node_status(node))]
        )
        return blocks, removed

    # -- node liveness and audit ------------------------------------------------------------

    def report_node(
        self, node: str, lease_id: int, routes: Sequence[str], table: int
    ) -> tuple[int, int]:
        """A node agent's heartbeat: keep (or create) its lease and note its routes.

        Returns the lease to send next time and its TTL. The `alive` key lives on the lease, so
        it disappears NODE_TTL seconds after the agent stops reporting; the `status` key stays,
        telling when the agent was last seen (rewritten when its routes change, or every
        STATUS_REFRESH seconds). Raises InvalidArgument, Unavailable.
        """
        op = "node report"
        validate_node_name(node, op)
        now = self._now()
        alive = lease_id > 0 and self.store.keep_alive(lease_id) > 0
        if alive:
            alive = self.store.get(self.keys.node_alive(node)) is not None
        if not alive:
            lease_id = self.store.grant_lease(self._node_ttl)
            self.store.txn(
                [],
                [
                    Put(
                        self.keys.node_alive(node),
                        json.dumps({"since": now}).encode(),
                        lease=lease_id,
                    )
                ],
            )
        wanted = sorted(routes)
        current = self.store.get(self.keys.node_status(node))
        old = json.loads(current.value) if current else {}
        if (
            not alive
            or old.get("routes") != wanted
            or old.get("table") != table
            or now - int(old.get("seen_at", 0)) >= STATUS_REFRESH
        ):
            status = {"seen_at": now, "table": table, "routes": wanted}
            self.store.txn([], [Put(self.keys.node_status(node), json.dumps(status).encode())])
        return lease_id, self._node_ttl

    def check_store(self, repair: bool, empty_grace: int = 600) -> tuple[list[Finding], int]:
        """Audit every key under the prefix at one revision; with `repair`, apply the safe
        repairs (each its own transaction, applied only if what it read is unchanged).

        Returns the findings (with what was repaired) and the revision read.
        """
        kvs, revision = self.store.range(self.keys.prefix)
        snap = Snapshot.from_kvs(self.keys, revision, kvs)
        findings = audit(snap, self._now(), empty_grace)
        if repair:
            for finding in findings:
                if finding.repair is None:
                    continue
                result = self.store.txn(finding.repair.compares, finding.repair.ops)
                if result.succeeded:
                    finding.repaired = finding.repair.description
            # A repair may fix another finding too (claiming a block back re-creates its index
            # entry): look again, and call what is gone fixed.
            kvs, revision = self.store.range(self.keys.prefix)
            after = audit(Snapshot.from_kvs(self.keys, revision, kvs), self._now(), empty_grace)
            remaining = {(f.kind, f.subject) for f in after}
            for finding in findings:
                if finding.repair is None or finding.repaired:
                    continue
                finding.repaired = (
                    "fixed by another repair"
                    if (finding.kind, finding.subject) not in remaining
                    else "not repaired: the keys changed meanwhile; run the check again"
                )
        return findings, revision

    # -- records ----------------------------------------------------------------------------

    def record(self, node: str, items: Sequence[RecordRequest]) -> list[RecordResult]:
        """Record addresses a node handed out; one result per item, in order.

        Each item is committed only if its block is held by `node`, its address is not recorded
        and its attachment (container ID, interface, family) holds no address yet; a repeat of
        an item already recorded for the same attachment is RECORDED again, and an attachment
        that holds another address gets EXISTING with that record. Items share transactions of
        up to RECORDS_PER_TXN. Raises InvalidArgument (bad node, too many items), Conflict.
        """
        op = "record"
        validate_node_name(node, op)
        if len(items) > MAX_BATCH:
            raise InvalidArgument(f"{op}: {len(items)} items; at most {MAX_BATCH} per request")
        results: list[RecordResult | None] = [None] * len(items)
        seen_attachments: set[str] = set()
        seen_addresses: set[str] = set()
        pending: list[int] = []
        pools = self._recent_pools()
        for i, item in enumerate(items):
            refused = self._unrecordable(pools, item)
            if refused:
                pools = self._recent_pools(fresh=True)  # a pool or subnet added just now?
                refused = self._unrecordable(pools, item)
            if refused:
                results[i] = RecordResult(RecordOutcome.INVALID, message=f"{op} {refused}")
                continue
            attachment = self.keys.attachment(
                item.owner.container_id, item.owner.interface, item.address.version
            )
            address = self.keys.record(item.pool, item.block, item.address)
            if attachment in seen_attachments or address in seen_addresses:
                results[i] = RecordResult(
                    RecordOutcome.INVALID,
                    message=f'{op} "{item.address}": repeats an attachment or address of the batch',
                )
                continue
            seen_attachments.add(attachment)
            seen_addresses.add(address)
            pending.append(i)
        for start in range(0, len(pending), RECORDS_PER_TXN):
            self._record_chunk(node, items, pending[start : start + RECORDS_PER_TXN], results)
        return [r if r is not None else RecordResult(RecordOutcome.INVALID) for r in results]

    @staticmethod
    def _unrecordable(pools: dict[str, Pool], item: RecordRequest) -> str:
        """Why an item can never be recorded ("" if it can): no such pool, a block that is not
        one of the pool's, or a reserved address (network, gateway, broadcast)."""
        pool = pools.get(item.pool)
        if pool is None:
            return f'"{item.address}": no pool "{item.pool}"'
        subnet = pool.subnet_of(item.block)
        if subnet is None or item.block.prefixlen != item.block.max_prefixlen - pool.block_bits:
            return f'"{item.address}": block "{item.block}" is not a block of pool "{pool.name}"'
        if item.address in reserved_addresses(subnet):
            return (
                f'"{item.address}": reserved in subnet "{subnet}" (network address, gateway or '
                "broadcast address)"
            )
        return ""

    def _record_chunk(
        self,
        node: str,
        items: Sequence[RecordRequest],
        chunk: list[int],
        results: list[RecordResult | None],
    ) -> None:
        for attempt in range(MAX_ATTEMPTS):
            if not chunk:
                return
            now = self._now()
            blocks = sorted({(items[i].pool, items[i].block) for i in chunk}, key=str)
            compares: list[Compare] = [
                value_is(self.keys.block(p, b), node.encode()) for p, b in blocks
            ]
            success: list[Op] = []
            failure: list[Op] = [Get(self.keys.block(p, b)) for p, b in blocks]
            for i in chunk:
                it = items[i]
                attachment = self.keys.attachment(
                    it.owner.container_id, it.owner.interface, it.address.version
                )
                record = self.keys.record(it.pool, it.block, it.address)
                compares += [absent(attachment), absent(record)]
                success += [
                    Put(record, encode_record(node, it.owner, now)),
                    Put(attachment, record_ref(it.pool, it.block, it.address)),
                ]
                failure += [Get(attachment), Get(record)]
            result = self.store.txn(compares, success, failure)
            if result.succeeded:
                for i in chunk:
                    it = items[i]
                    results[i] = RecordResult(
                        RecordOutcome.RECORDED,
                        AllocationRecord(it.address, it.pool, it.block, node, it.owner, now),
                    )
                return
            holders = {blocks[j]: _first(result.responses[j]) for j in range(len(blocks))}
            remaining = []
            for n, i in enumerate(chunk):
                it = items[i]
                attachment_kv = _first(result.responses[len(blocks) + 2 * n])
                record_kv = _first(result.responses[len(blocks) + 2 * n + 1])
                outcome = self._classify_record(
                    node, it, holders[(it.pool, it.block)], attachment_kv, record_kv
                )
                if outcome is None:
                    remaining.append(i)
                else:
                    results[i] = outcome
            if len(remaining) == len(chunk):
                self._backoff(attempt, "record")
            chunk = remaining
        for i in chunk:
            results[i] = RecordResult(
                RecordOutcome.INVALID, message="record: lost too many races; try again"
            )

    def _classify_record(
        self,
        node: str,
        it: RecordRequest,
        holder: KeyValue | None,
        attachment_kv: KeyValue | None,
        record_kv: KeyValue | None,
    ) -> RecordResult | None:
        """Why an item's compares failed, or None if they held (another item failed)."""
        if attachment_kv is not None:
            pool, block, address = parse_record_path(attachment_kv.value.decode())
            if (pool, block, address) == (it.pool, it.block, it.address) and record_kv:
                return RecordResult(
                    RecordOutcome.RECORDED,
                    decode_record(pool, block, address, record_kv.value),
                )
            existing = self.store.get(self.keys.record(pool, block, address))
            if existing is None:
                return RecordResult(
                    RecordOutcome.INVALID,
                    message=f'record "{it.address}": the attachment refers to a missing record '
                    f'"{address}"; the store is inconsistent (see docs/operations.md)',
                )
            return RecordResult(
                RecordOutcome.EXISTING, decode_record(pool, block, address, existing.value)
            )
        if record_kv is not None:
            other = decode_record(it.pool, it.block, it.address, record_kv.value)
            return RecordResult(
                RecordOutcome.ADDRESS_IN_USE,
                other,
                f'record "{it.address}": held by container "{other.owner.container_id}" '
                f'interface "{other.owner.interface}" on node "{other.node}"',
            )
        if holder is None or holder.value.decode() != node:
            who = f'node "{holder.value.decode()}"' if holder else "no node"
            return RecordResult(
                RecordOutcome.BLOCK_NOT_HELD,
                message=f'record "{it.address}": block "{it.block}" is held by {who}, not "{node}"',
            )
        return None

    def release(self, node: str, items: Sequence[ReleaseRequest]) -> list[ReleaseResult]:
        """Remove allocation records; one result per item, in order.

        An item whose address is not recorded is NOT_RECORDED (idempotent success). With a
        container ID, only that attachment's record is removed; with a node, only records made
        by that node. Raises InvalidArgument (bad node, too many items), Conflict.
        """
        op = "release"
        if node:
            validate_node_name(node, op)
        if len(items) > MAX_BATCH:
            raise InvalidArgument(f"{op}: {len(items)} items; at most {MAX_BATCH} per request")
        results: list[ReleaseResult | None] = [None] * len(items)
        pools = self._recent_pools()
        located: list[tuple[int, str]] = []
        blocks: dict[int, tuple[str, Network]] = {}
        seen: set[str] = set()
        for i, item in enumerate(items):
            where = self._locate(pools.values(), item.address)
            if where is None:
                pools = self._recent_pools(fresh=True)
                where = self._locate(pools.values(), item.address)
            if where is None:
                results[i] = ReleaseResult(
                    ReleaseOutcome.NOT_RECORDED, f'"{item.address}" is in no pool'
                )
                continue
            key = self.keys.record(where[0].name, where[1], item.address)
            if key in seen:
                results[i] = ReleaseResult(ReleaseOutcome.INVALID, f'"{item.address}" repeated')
                continue
            seen.add(key)
            located.append((i, key))
            blocks[i] = (where[0].name, where[1])
        for start in range(0, len(located), RELEASES_PER_TXN):
            chunk = located[start : start + RELEASES_PER_TXN]
            if not self._release_known(node, items, chunk, blocks, results):
                self._release_chunk(node, items, chunk, results)
        return [r if r is not None else ReleaseResult(ReleaseOutcome.INVALID) for r in results]

    def _release_known(
        self,
        node: str,
        items: Sequence[ReleaseRequest],
        chunk: list[tuple[int, str]],
        blocks: dict[int, tuple[str, Network]],
        results: list[ReleaseResult | None],
    ) -> bool:
        """The common case in one transaction: every item names its attachment, whose key must
        still point at the record (and, with a node, every block is still the node's). Returns
        False, having changed nothing, when any compare fails; the caller then sorts the items
        out one by one."""
        if not node or any(not items[i].container_id or not items[i].interface for i, _ in chunk):
            return False
        compares: list[Compare] = [
            value_is(self.keys.block(pool, block), node.encode())
            for pool, block in sorted({blocks[i] for i, _ in chunk}, key=str)
        ]
        deletes: list[Op] = []
        for i, key in chunk:
            item = items[i]
            pool, block = blocks[i]
            attachment = self.keys.attachment(
                item.container_id, item.interface, item.address.version
            )
            compares.append(value_is(attachment, record_ref(pool, block, item.address)))
            deletes += [Delete(key), Delete(attachment)]
        if not self.store.txn(compares, deletes).succeeded:
            return False
        for i, _ in chunk:
            results[i] = ReleaseResult(ReleaseOutcome.RELEASED)
        return True

    def _release_chunk(
        self,
        node: str,
        items: Sequence[ReleaseRequest],
        chunk: list[tuple[int, str]],
        results: list[ReleaseResult | None],
    ) -> None:
        for attempt in range(MAX_ATTEMPTS):
            if not chunk:
                return
            read = self.store.txn([], [Get(key) for _, key in chunk])
            compares: list[Compare] = []
            deletes: list[Op] = []
            going: list[tuple[int, str, AllocationRecord]] = []
            for (i, key), found in zip(chunk, read.responses, strict=True):
                kv = _first(found)
                item = items[i]
                if kv is None:
                    results[i] = ReleaseResult(ReleaseOutcome.NOT_RECORDED)
                    continue
                pool, block, address = self.keys.parse_record(key)
                rec = decode_record(pool, block, address, kv.value)
                if item.container_id and (
                    rec.owner.container_id != item.container_id
                    or (item.interface and rec.owner.interface != item.interface)
                ):
                    results[i] = ReleaseResult(
                        ReleaseOutcome.OWNER_MISMATCH,
                        f'release "{address}": held by container "{rec.owner.container_id}" '
                        f'interface "{rec.owner.interface}", not "{item.container_id}" '
                        f'"{item.interface}"',
                        rec,
                    )
                    continue
                if node and rec.node != node:
                    results[i] = ReleaseResult(
                        ReleaseOutcome.OWNER_MISMATCH,
                        f'release "{address}": recorded by node "{rec.node}", not "{node}"',
                        rec,
                    )
                    continue
                compares.append(unchanged(key, kv.mod_revision))
                deletes.append(Delete(key))
                deletes.append(
                    Delete(
                        self.keys.attachment(
                            rec.owner.container_id, rec.owner.interface, address.version
                        )
                    )
                )
                going.append((i, key, rec))
            if not going:
                return
            if self.store.txn(compares, deletes).succeeded:
                for i, _, rec in going:
                    results[i] = ReleaseResult(ReleaseOutcome.RELEASED, record=rec)
                return
            chunk = [(i, key) for i, key, _ in going]
            self._backoff(attempt, "release")
        raise Conflict("release: records kept changing; try again")

    def address_info(self, address_text: str) -> AddressInfo:
        """Where an address lies and who holds it. Raises InvalidArgument, NotFound (in no pool)."""
        op = "address info"
        address = parse_address(address_text, op)
        pools, _ = self._pools()
        where = self._locate(pools.values(), address)
        if where is None:
            raise NotFound(f'{op} "{address}": the address is in no pool')
        pool, block = where
        found = self.store.txn(
            [],
            [
                Get(self.keys.block(pool.name, block)),
                Get(self.keys.record(pool.name, block, address)),
            ],
        )
        holder = _first(found.responses[0])
        record = _first(found.responses[1])
        return AddressInfo(
            address,
            pool.name,
            block,
            holder.value.decode() if holder else "",
            decode_record(pool.name, block, address, record.value) if record else None,
        )

    def free_address(self, address_text: str) -> AllocationRecord:
        """Remove an address's record, whoever holds it (repair tool).

        Raises InvalidArgument, NotFound (not allocated), Conflict.
        """
        op = "address free"
        address = parse_address(address_text, op)
        (result,) = self.release("", [ReleaseRequest(address)])
        if result.outcome != ReleaseOutcome.RELEASED or result.record is None:
            raise NotFound(f'{op} "{address}": the address is not allocated')
        return result.record

    def usage(self) -> list[PoolUsage]:
        """Blocks and addresses used per pool and family, read at one revision."""
        pools, rev = self._pools()
        held: Counter[tuple[str, int]] = Counter()
        for key in self.store.keys(self.keys.all_blocks, revision=rev):
            pool_name, block_id = key[len(self.keys.all_blocks) :].split("/", 1)
            held[(pool_name, 6 if ":" in block_id else 4)] += 1
        # Records are counted by etcd, per pool and family, without listing them.
        used = {
            (name, int(fam)): self.store.count(
                self.keys.family_records(name, int(fam)), revision=rev
            )
            for name, pool in pools.items()
            for fam in pool.families()
        }
        out = []
        for name in sorted(pools):
            pool = pools[name]
            for fam in pool.families():
                subnets = pool.subnets_of(fam)
                out.append(
                    PoolUsage(
                        name,
                        fam,
                        held[(name, int(fam))],
                        sum(block_count(s, pool.block_bits) for s in subnets),
                        used[(name, int(fam))],
                        sum(int(s.num_addresses) - len(reserved_addresses(s)) for s in subnets),
                    )
                )
        return out


__all__ = ["Allocator", "CoilError"]
