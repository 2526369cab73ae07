"""The pools: their definitions, and what is held and used of them.

Owns in etcd: ``pools/<name>`` (the pool's subnets and block size). Reads, never writes, the
blocks and records of a pool (for `get_pool`, `delete_pool` and `usage`).

Transactions:
- create: the pool key is absent and no pool changed since the overlap check read them;
- add-subnet: no pool changed since the overlap check (the pool key is read back on failure, to
  tell "deleted meanwhile" from a lost race);
- delete: the pool key is unchanged and no block of the pool is held.

Each is retried after a lost compare up to `MAX_ATTEMPTS` times with jittered backoff, then
`Conflict`. Raises the errors of `coil_core.errors` as each method says.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from coil_allocator.common import MAX_ATTEMPTS, Part, first
from coil_allocator.keys import (
    Unreadable,
    decode_holder,
    encode_pool,
)
from coil_allocator.store import (
    Delete,
    Get,
    Put,
    absent,
    none_changed_since,
    none_with_prefix,
    unchanged,
)
from coil_core.blocks import (
    Network,
    block_count,
    block_key,
    find_overlap,
    reserved_addresses,
    validate_block_size,
    validate_pool_subnet,
)
from coil_core.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    NotFound,
)
from coil_core.model import (
    HeldBlock,
    Pool,
    PoolUsage,
    SubnetBlocks,
)
from coil_core.rules import parse_subnet, validate_pool_name


class Pools(Part):
    """Create, change, list, delete pools; their usage. Pools are read fresh, except the list,
    which comes from the replica's watch-fed view when it has one (a change this replica makes
    waits until the view shows it)."""

    def create_pool(self, name: str, subnets: Sequence[str], block_bits: int) -> Pool:
        """Create a pool.

        Raises InvalidArgument (bad name, subnet or block size; no subnet; two given subnets
        overlap), AlreadyExists (name taken, or a subnet overlaps another pool's), Conflict.
        """
        op = "pool create"
        pool = Pool.from_strings(name, subnets, block_bits, op)
        for attempt in range(MAX_ATTEMPTS):
            pools, rev = self._pools()
            if name in pools:
                raise AlreadyExists(f'{op} "{name}": a pool of that name exists')
            self._check_overlap(op, name, pool.subnets, pools)
            result = self.store.txn(
                [absent(self.keys.pool(name)), none_changed_since(self.keys.pools, rev)],
                [Put(self.keys.pool(name), encode_pool(pool))],
            )
            if result.succeeded:
                self._seen(result.revision)
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
                self._seen(result.revision)
                return updated
            if first(result.responses[0]) is None:
                raise NotFound(f'{op} "{name}": no such pool (deleted meanwhile)')
            self._backoff(attempt, "pool add-subnet")
        raise Conflict(f'{op} "{name}": pools kept changing; try again')

    def list_pools(self) -> list[Pool]:
        """Every pool, sorted by name: from the replica's view while its watch is current (no
        etcd read), else read from etcd."""
        if self._cluster_view is not None and self._cluster_view.current:
            return self._cluster_view.pools()
        pools, _ = self._pools()
        return [pools[n] for n in sorted(pools)]

    def get_pool(self, name: str, subnet_text: str = "") -> tuple[Pool, list[SubnetBlocks]]:
        """A pool with the held blocks of each subnet (or of the one given).

        Raises InvalidArgument, NotFound (no such pool, or the subnet is not one of its).
        """
        op = "pool show"
        validate_pool_name(name, op)
        # The input is checked before the store is read (as coilctl checks it before sending).
        wanted = parse_subnet(subnet_text, op) if subnet_text else None
        pool, kv = self._load_pool(name, op)
        subnets = pool.subnets
        if wanted is not None:
            if wanted not in pool.subnets:
                raise NotFound(f'{op} "{name}": subnet "{wanted}" is not one of the pool\'s')
            subnets = (wanted,)
        blocks, rev = self.store.range(self.keys.blocks(name))
        # Per block: "<family>/<block-id>/<address>" after the pool's prefix.
        records_prefix = self.keys.pool_records(name)
        used: Counter[str] = Counter()
        for key in self.store.keys(records_prefix, revision=rev):
            parts = key[len(records_prefix) :].split("/", 2)
            if len(parts) == 3:
                used[parts[1]] += 1
            else:
                self._skip("record", key, Unreadable("not a record key"))
        by_subnet: dict[Network, list[HeldBlock]] = defaultdict(list)
        for b in blocks:
            try:
                _, cidr = self.keys.parse_block(b.key, self.keys.all_blocks)
                holder = decode_holder(b.value)
            except Unreadable as e:
                self._skip("block", b.key, e)
                continue
            subnet = pool.subnet_of(cidr)
            if subnet is None:
                continue
            by_subnet[subnet].append(
                HeldBlock(
                    name,
                    cidr,
                    holder,
                    b.create_revision,
                    0,
                    used[block_key(cidr)],
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
                self._seen(result.revision)
                return
            held = result.responses[0]
            if isinstance(held, list) and held:
                nodes = sorted({h.value.decode(errors="replace") for h in held})
                shown = ", ".join(nodes[:5]) + (", ..." if len(nodes) > 5 else "")
                raise FailedPrecondition(
                    f'{op} "{name}": {len(held)} block(s) are held (by node {shown}); '
                    "release them first"
                )
            self._backoff(attempt, "pool delete")
        raise Conflict(f'{op} "{name}": the pool kept changing; try again')

    def usage(self) -> list[PoolUsage]:
        """Blocks and addresses used per pool and family, read at one revision."""
        pools, rev = self._pools()
        held: Counter[tuple[str, int]] = Counter()
        for key in self.store.keys(self.keys.all_blocks, revision=rev):
            try:
                pool_name, block = self.keys.parse_block(key, self.keys.all_blocks)
            except Unreadable as e:
                self._skip("block", key, e)
                continue
            held[(pool_name, block.version)] += 1
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
