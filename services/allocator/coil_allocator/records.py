"""Allocation records: which attachment holds which address, recorded for the node that handed
it out.

Owns in etcd: ``records/<pool>/<family>/<block>/<address>`` (the owner and when) and the
attachment index ``attachments/<container>/<interface>/<family>`` (a reference to the record),
always written and deleted together.

Transactions:
- record: per chunk of up to `RECORDS_PER_TXN` items, every block is held by the node and every
  record and attachment key is absent; on failure the same round trip reads what was there, so
  each item is classified (existing, address in use, block not held) and the rest retried;
- release: per chunk of up to `RELEASES_PER_TXN` items, in one transaction when every attachment
  still points at its record (and every block is the node's); otherwise the records are read and
  each is deleted with its attachment if its revision is unchanged.

Lost compares are retried up to `MAX_ATTEMPTS` times with jittered backoff. Owns the pools cache:
the pools as read at most `POOLS_MAX_AGE` seconds ago, trusted only to say yes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence

from coil_allocator.common import MAX_ATTEMPTS, Context, Part, first
from coil_allocator.keys import (
    Unreadable,
    decode_record,
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
    absent,
    unchanged,
    value_is,
)
from coil_core.blocks import (
    Address,
    Network,
    block_of,
    reserved_addresses,
)
from coil_core.errors import (
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from coil_core.model import (
    AddressInfo,
    AllocationRecord,
    Pool,
    RecordOutcome,
    RecordRequest,
    RecordResult,
    ReleaseOutcome,
    ReleaseRequest,
    ReleaseResult,
)
from coil_core.rules import parse_address, validate_node_name

POOLS_MAX_AGE = 5.0
"""Seconds the record and release paths reuse a read of the pools (see `_recent_pools`)."""

RECORDS_PER_TXN = 40
"""Records per transaction: 2 compares, 2 puts and 3 failure reads each stay under etcd's
default limit of 128 operations per transaction."""

RELEASES_PER_TXN = 60
MAX_BATCH = 1000


class Records(Part):
    """Record and release addresses; look one up or free it. Thread-safe."""

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self._cache_lock = threading.Lock()
        self._pools_cache: tuple[float, dict[str, Pool]] = (-1e9, {})

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
            holders = {blocks[j]: first(result.responses[j]) for j in range(len(blocks))}
            remaining = []
            for n, i in enumerate(chunk):
                it = items[i]
                attachment_kv = first(result.responses[len(blocks) + 2 * n])
                record_kv = first(result.responses[len(blocks) + 2 * n + 1])
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
        """Why an item's compares failed, or None if they held (another item failed).

        An unreadable attachment or record is never overwritten: the item is INVALID (the
        attachment) or ADDRESS_IN_USE without a record (the address), naming the key."""
        if attachment_kv is not None:
            try:
                pool, block, address = parse_record_path(
                    attachment_kv.value.decode(errors="replace")
                )
            except Unreadable as e:
                self._skip("attachment", attachment_kv.key, e)
                return RecordResult(
                    RecordOutcome.INVALID,
                    message=f'record "{it.address}": the attachment key {attachment_kv.key} '
                    "cannot be read; see coilctl check",
                )
            if (pool, block, address) == (it.pool, it.block, it.address) and record_kv:
                return self._recorded(RecordOutcome.RECORDED, it, record_kv)
            existing = self.store.get(self.keys.record(pool, block, address))
            if existing is None:
                return RecordResult(
                    RecordOutcome.INVALID,
                    message=f'record "{it.address}": the attachment refers to a missing record '
                    f'"{address}"; the store is inconsistent (see docs/operations.md)',
                )
            try:
                return RecordResult(
                    RecordOutcome.EXISTING, decode_record(pool, block, address, existing.value)
                )
            except Unreadable as e:
                self._skip("record", existing.key, e)
                return RecordResult(
                    RecordOutcome.INVALID,
                    message=f'record "{it.address}": the attachment\'s record {existing.key} '
                    "cannot be read; see coilctl check",
                )
        if record_kv is not None:
            try:
                other = decode_record(it.pool, it.block, it.address, record_kv.value)
            except Unreadable as e:
                self._skip("record", record_kv.key, e)
                return RecordResult(
                    RecordOutcome.ADDRESS_IN_USE,
                    None,
                    f'record "{it.address}": recorded by a key that cannot be read '
                    f"({record_kv.key}); see coilctl check",
                )
            return RecordResult(
                RecordOutcome.ADDRESS_IN_USE,
                other,
                f'record "{it.address}": held by container "{other.owner.container_id}" '
                f'interface "{other.owner.interface}" on node "{other.node}"',
            )
        if holder is None or holder.value.decode(errors="replace") != node:
            who = f'node "{holder.value.decode(errors="replace")}"' if holder else "no node"
            return RecordResult(
                RecordOutcome.BLOCK_NOT_HELD,
                message=f'record "{it.address}": block "{it.block}" is held by {who}, not "{node}"',
            )
        return None

    def _recorded(self, outcome: RecordOutcome, it: RecordRequest, kv: KeyValue) -> RecordResult:
        """The item's own record, already there; INVALID if it cannot be read."""
        try:
            return RecordResult(outcome, decode_record(it.pool, it.block, it.address, kv.value))
        except Unreadable as e:
            self._skip("record", kv.key, e)
            return RecordResult(
                RecordOutcome.INVALID,
                message=f'record "{it.address}": its record {kv.key} cannot be read; '
                "see coilctl check",
            )

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
                kv = first(found)
                item = items[i]
                if kv is None:
                    results[i] = ReleaseResult(ReleaseOutcome.NOT_RECORDED)
                    continue
                pool, block, address = self.keys.parse_record(key)
                try:
                    rec = decode_record(pool, block, address, kv.value)
                except Unreadable as e:
                    # Whose it is cannot be told: never delete it (nor an attachment) blindly.
                    self._skip("record", key, e)
                    results[i] = ReleaseResult(
                        ReleaseOutcome.INVALID,
                        f'release "{address}": its record {key} cannot be read; see coilctl check',
                    )
                    continue
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
        holder = first(found.responses[0])
        record = first(found.responses[1])
        decoded = None
        if record is not None:
            try:
                decoded = decode_record(pool.name, block, address, record.value)
            except Unreadable as e:
                self._skip("record", record.key, e)
                raise FailedPrecondition(
                    f'{op} "{address}": its record {record.key} cannot be read ({e}); '
                    "see coilctl check"
                ) from None
        return AddressInfo(
            address,
            pool.name,
            block,
            holder.value.decode(errors="replace") if holder else "",
            decoded,
        )

    def free_address(self, address_text: str) -> AllocationRecord:
        """Remove an address's record, whoever holds it (repair tool).

        Raises InvalidArgument, NotFound (not allocated), FailedPrecondition (its record cannot
        be read), Conflict.
        """
        op = "address free"
        address = parse_address(address_text, op)
        (result,) = self.release("", [ReleaseRequest(address)])
        if result.outcome == ReleaseOutcome.INVALID:
            raise FailedPrecondition(f"{op}: {result.message}")
        if result.outcome != ReleaseOutcome.RELEASED or result.record is None:
            raise NotFound(f'{op} "{address}": the address is not allocated')
        return result.record
