"""Block claims: which node holds which block of a pool.

Owns in etcd: ``blocks/<pool>/<block>`` (value: the holder's node name) and the node's index
entry ``nodes/<node>/blocks/<pool>/<block>`` (when it was claimed), always written and deleted
together.

Transactions:
- claim (any free block, or a specific one): the pool key is unchanged, the block key is absent
  and no pool key changed since the pools were read; only if another pool's subnets overlap this
  pool's (written by hand or restored by mistake), also no block of that pool was claimed since
  its held blocks were read (and none of them overlaps the chosen block). Puts the block and its
  index entry. A lost claim reads the pools and the held blocks in the same round trip and picks
  again, up to `MAX_CLAIM_ATTEMPTS` times (`MAX_ATTEMPTS` for a specific block), then `Conflict`;
- release: the block key holds this node and no record lies in the block; deletes both keys.

Owns the claim cache: per pool, the pool and the held block ids as this replica last saw them,
so a claim is usually one round trip. A stale view costs only a lost compare.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence

from coil_allocator.common import MAX_ATTEMPTS, Context, Part, first
from coil_allocator.keys import Unreadable, decode_pool
from coil_allocator.store import (
    Compare,
    Delete,
    Get,
    KeyValue,
    Op,
    Put,
    TxnResult,
    absent,
    none_changed_since,
    none_with_prefix,
    unchanged,
    value_is,
)
from coil_core.blocks import (
    Network,
    block_at,
    block_count,
    block_key,
    blocks_overlapping,
    overlapping,
    parse_block_key,
)
from coil_core.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PoolExhausted,
)
from coil_core.model import (
    Family,
    HeldBlock,
    Pool,
)
from coil_core.rules import validate_node_name, validate_pool_name

MAX_CLAIM_ATTEMPTS = 16
"""Claims re-read the held blocks with every lost race, so each retry sees the others' progress."""


class Claims(Part):
    """Claim and release blocks. Thread-safe; replicas may claim side by side."""

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        # Per pool: the pool and the held block ids as last seen by this replica. Claims pick
        # from it without reading etcd first; a stale view only costs a lost compare, whose
        # failure branch brings the fresh one (see claim_block).
        self._claim_cache: dict[str, tuple[Pool, KeyValue, set[str]]] = {}
        # Every pool, as read at a revision: claims compare that no pool changed since, so a
        # pool written by hand over this one's space is seen before a block is claimed.
        self._view: tuple[int, dict[str, Pool]] | None = None
        self._cache_lock = threading.Lock()

    def _pools_view(self, refresh: bool = False) -> tuple[int, dict[str, Pool]]:
        """Every readable pool and the revision they were read at (this replica's last read,
        or now with `refresh`)."""
        with self._cache_lock:
            view = self._view
        if view is None or refresh:
            pools, rev = self._pools()
            view = (rev, pools)
            with self._cache_lock:
                self._view = view
        return view

    def _set_view(self, kvs: list[KeyValue], revision: int) -> tuple[int, dict[str, Pool]]:
        """Keep the pools a failed claim read (every pool key, at `revision`) as the view."""
        pools: dict[str, Pool] = {}
        for kv in kvs:
            name = self.keys.strip(kv.key, self.keys.pools)
            try:
                pools[name] = decode_pool(name, kv.value)
            except Unreadable as e:
                self._skip("pool", kv.key, e)
        with self._cache_lock:
            self._view = (revision, pools)
        return revision, pools

    def _overlap_guard(
        self, pools: dict[str, Pool], pool: Pool, subnets: Sequence[Network]
    ) -> tuple[dict[str, str], list[Compare]]:
        """What other pools hold of the space of `subnets`, and the compares that keep it so.

        Pools never overlap when made through the API, but one written by hand or restored
        from a mix-up can: then a block of this pool may share addresses with a block another
        pool holds. Only in that case, the other pool's held blocks are read; returned are the
        ids of this pool's blocks they overlap (with what overlaps them) and, per overlapping
        pool, a compare that none of its blocks was claimed since that read. No overlap: no
        read and no compare."""
        taken: dict[str, str] = {}
        compares: list[Compare] = []
        for other in pools.values():
            if other.name == pool.name:
                continue
            shared = [s for s in subnets if any(overlapping(s, t) for t in other.subnets)]
            if not shared:
                continue
            prefix = self.keys.blocks(other.name)
            held, rev = self.store.range(prefix)
            compares.append(none_changed_since(prefix, rev))
            for kv in held:
                try:
                    _, block = self.keys.parse_block(kv.key, self.keys.all_blocks)
                except Unreadable as e:
                    self._skip("block", kv.key, e)
                    continue
                what = (
                    f'block "{block}" of pool "{other.name}" held by node '
                    f'"{kv.value.decode(errors="replace")}" (pools overlap; see coilctl check)'
                )
                for subnet in shared:
                    for mine in blocks_overlapping(subnet, pool.block_bits, block):
                        taken[block_key(mine)] = what
        return taken, compares

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
            view_rev, pools = self._pools_view(refresh=attempt > 0)
            taken, guard = self._overlap_guard(pools, pool, [subnet])
            if block_key(block) in taken:
                raise AlreadyExists(f'{op} "{block}": overlaps {taken[block_key(block)]}')
            key = self.keys.block(pool_name, block)
            now = self._now()
            result = self._claim_txn(
                node,
                pool_name,
                pool_kv,
                block,
                now,
                [Get(key), Get(self.keys.node_block(node, pool_name, block))],
                [none_changed_since(self.keys.pools, view_rev), *guard],
            )
            if result.succeeded:
                self._events.claimed(pool_name, attempt)
                return HeldBlock(
                    pool_name, block, node, result.revision, now, 0, pool.reserved_in(block)
                )
            holder = first(result.responses[0])
            if holder is not None:
                other = holder.value.decode(errors="replace")
                if other != node:
                    raise AlreadyExists(f'{op} "{block}": held by node "{other}"')
                claimed_at = self._claimed_at(first(result.responses[1]))
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
        view_rev, pools = self._pools_view(refresh=fresh)
        fam = family or (pool.families() or (Family.IPV4,))[0]
        for attempt in range(MAX_CLAIM_ATTEMPTS):
            subnets = pool.subnets_of(fam)
            if not subnets:
                raise InvalidArgument(f'{op} "{pool_name}": the pool has no IPv{int(fam)} subnet')
            taken, guard = self._overlap_guard(pools, pool, subnets)
            with self._cache_lock:
                block = self._pick_free(pool, subnets, held | taken.keys() if taken else held)
            if block is None and not fresh:
                # The cached view may be stale (blocks released through another replica).
                pool, pool_kv = self._load_pool(pool_name, op)
                held_kvs, _ = self.store.range(blocks_prefix, keys_only=True)
                held = {self.keys.strip(kv.key, blocks_prefix) for kv in held_kvs}
                fresh = True
                view_rev, pools = self._pools_view(refresh=True)
                taken, guard = self._overlap_guard(pools, pool, subnets)
                with self._cache_lock:
                    self._claim_cache[pool_name] = (pool, pool_kv, held)
                    block = self._pick_free(pool, subnets, held | taken.keys() if taken else held)
            if block is None:
                raise PoolExhausted(
                    f'{op} "{pool_name}": pool exhausted: no free IPv{int(fam)} block '
                    f"(all {sum(block_count(s, pool.block_bits) for s in subnets)} are held"
                    + (
                        ", some by other pools that overlap it; see coilctl check)"
                        if taken
                        else ")"
                    )
                )
            now = self._now()
            result = self._claim_txn(
                node,
                pool_name,
                pool_kv,
                block,
                now,
                # Lost: read what changed in the same round trip, so the next pick is informed.
                [
                    Get(self.keys.pools, prefix=True),
                    Get(blocks_prefix, prefix=True, keys_only=True),
                ],
                [none_changed_since(self.keys.pools, view_rev), *guard],
            )
            if result.succeeded:
                with self._cache_lock:
                    held.add(block_key(block))
                    self._claim_cache[pool_name] = (pool, pool_kv, held)
                self._events.claimed(pool_name, attempt)
                return HeldBlock(
                    pool_name, block, node, result.revision, now, 0, pool.reserved_in(block)
                ), attempt
            read = result.responses[0]
            pool_kvs = read if isinstance(read, list) else []
            view_rev, pools = self._set_view(pool_kvs, result.revision)
            current = next((kv for kv in pool_kvs if kv.key == pool_kv.key), None)
            if current is None:
                with self._cache_lock:
                    self._claim_cache.pop(pool_name, None)
                raise NotFound(f'{op} "{pool_name}": no such pool (deleted meanwhile)')
            if current.mod_revision != pool_kv.mod_revision:
                with self._cache_lock:
                    self._claim_cache.pop(pool_name, None)
                pool, pool_kv = self._decode_pool(pool_name, current, op), current
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

    def _claim_txn(
        self,
        node: str,
        pool_name: str,
        pool_kv: KeyValue,
        block: Network,
        now: int,
        on_failure: list[Op],
        guard: Sequence[Compare] = (),
    ) -> TxnResult:
        """The one claim transaction: if the pool is unchanged, the block is free and the
        `guard` compares hold (no pool changed, no overlapping pool claimed anything: see
        `_overlap_guard`), put the block (value: the node) and the node's index entry; else run
        the `on_failure` reads."""
        key = self.keys.block(pool_name, block)
        return self.store.txn(
            [unchanged(pool_kv.key, pool_kv.mod_revision), absent(key), *guard],
            [
                Put(key, node.encode()),
                Put(
                    self.keys.node_block(node, pool_name, block),
                    json.dumps({"claimed_at": now}).encode(),
                ),
            ],
            on_failure,
        )

    def forget_held(self, pool_name: str, block: Network) -> None:
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
            self.forget_held(pool_name, block)
            return
        holder = first(result.responses[0])
        if holder is None:
            raise FailedPrecondition(f'{op} "{block}": not held by any node')
        other = holder.value.decode(errors="replace")
        if other != node:
            raise FailedPrecondition(f'{op} "{block}": held by node "{other}", not "{node}"')
        used = result.responses[1]
        count = len(used) if isinstance(used, list) else 0
        raise FailedPrecondition(f'{op} "{block}": {count} address(es) are still recorded in it')
