"""The store audit behind `coilctl check`: what is inconsistent, how bad, and what is safe to fix.

Pure logic over one snapshot of coil's keys (read at one revision by the allocator). Each finding
may carry a repair: a transaction (compares and operations) that fixes it only if the keys it
read are unchanged. Repairs never free an address that may be in use: they re-create missing
index entries, delete entries that point at nothing, claim a block back for the node whose
records lie in it, and return empty blocks of nodes whose agent is gone.
"""

from __future__ import annotations

import enum
import json
from collections import defaultdict
from dataclasses import dataclass, field

from coil_allocator.keys import (
    Keys,
    NodeStatus,
    Unreadable,
    decode_claimed_at,
    decode_holder,
    decode_pool,
    decode_record,
    decode_status,
    parse_record_path,
    record_ref,
)
from coil_allocator.store import (
    Compare,
    Delete,
    KeyValue,
    Op,
    Put,
    absent,
    none_with_prefix,
    unchanged,
    value_is,
)
from coil_core.blocks import Address, Network, block_key, parse_block_key
from coil_core.errors import InvalidArgument
from coil_core.model import AllocationRecord, Pool
from coil_core.rules import validate_attachment, validate_node_name


class Severity(enum.IntEnum):
    INFO = 1
    WARNING = 2
    CRITICAL = 3


@dataclass(frozen=True)
class Repair:
    """A transaction that fixes a finding if nothing it depends on changed."""

    description: str
    compares: tuple[Compare, ...]
    ops: tuple[Op, ...]


@dataclass
class Finding:
    severity: Severity
    kind: str
    subject: str
    message: str
    repair: Repair | None = None
    repaired: str = ""


@dataclass
class Snapshot:
    """Every key under coil's prefix at one revision, sorted by kind and decoded.

    A key that cannot be read goes to `unreadable` (with its kind and why) and nowhere else, so
    the audit never builds a finding, let alone a repair, from a field it could not read."""

    keys: Keys
    revision: int
    pools: dict[str, Pool] = field(default_factory=dict)
    blocks: dict[tuple[str, str], KeyValue] = field(default_factory=dict)  # (pool, block id)
    holders: dict[tuple[str, str], str] = field(default_factory=dict)  # (pool, block id) -> node
    index: dict[tuple[str, str, str], KeyValue] = field(default_factory=dict)  # (node, pool, id)
    claimed_at: dict[tuple[str, str, str], int] = field(default_factory=dict)
    alive: dict[str, KeyValue] = field(default_factory=dict)  # node -> leased key
    status: dict[str, NodeStatus] = field(default_factory=dict)  # node -> last report
    records: dict[tuple[str, str, str], KeyValue] = field(default_factory=dict)  # pool, id, addr
    decoded: dict[tuple[str, str, str], AllocationRecord] = field(default_factory=dict)
    attachments: dict[str, KeyValue] = field(default_factory=dict)  # key -> kv
    refs: dict[str, tuple[str, Network, Address]] = field(default_factory=dict)  # key -> record
    present: set[str] = field(default_factory=set)  # every key, readable or not

    unreadable: list[tuple[str, KeyValue, str]] = field(default_factory=list)  # kind, kv, why

    @property
    def malformed(self) -> list[KeyValue]:
        return [kv for _, kv, _ in self.unreadable]

    @classmethod
    def from_kvs(cls, keys: Keys, revision: int, kvs: list[KeyValue]) -> Snapshot:
        snap = cls(keys, revision)
        for kv in kvs:
            snap.present.add(kv.key)
            try:
                snap._add(kv)
            except (Unreadable, InvalidArgument, ValueError, UnicodeDecodeError) as e:
                snap.unreadable.append((_kind_of(keys, kv.key), kv, str(e)))
        return snap

    def _add(self, kv: KeyValue) -> None:
        """File one key under its kind; raises Unreadable (or another ValueError) if it cannot
        be read."""
        kind, _, tail = kv.key[len(self.keys.prefix) :].partition("/")
        if kind == "pools":
            self.pools[tail] = decode_pool(tail, kv.value)
        elif kind == "blocks":
            pool, block = self.keys.parse_block(kv.key, self.keys.all_blocks)
            node = decode_holder(kv.value)
            self.blocks[(pool, block_key(block))] = kv
            self.holders[(pool, block_key(block))] = node
        elif kind == "nodes":
            node, _, what = tail.partition("/")
            validate_node_name(node, "stored node")
            if what == "alive":
                self.alive[node] = kv
            elif what == "status":
                self.status[node] = decode_status(kv.value)
            elif what.startswith("blocks/"):
                pool, block = self.keys.parse_block(kv.key, self.keys.node_blocks(node))
                entry = (node, pool, block_key(block))
                self.claimed_at[entry] = decode_claimed_at(kv.value)
                self.index[entry] = kv
        elif kind == "records":
            pool, block, address = self.keys.parse_record(kv.key)
            entry = (pool, block_key(block), str(address))
            self.decoded[entry] = decode_record(pool, block, address, kv.value)
            self.records[entry] = kv
        elif kind == "attachments":
            container_id, interface, family = tail.split("/")
            validate_attachment(container_id, interface, "stored attachment")
            ref = parse_record_path(kv.value.decode())
            if family != str(ref[2].version):
                raise Unreadable(f"family {family[:10]} is not that of {ref[2]}")
            self.attachments[kv.key] = kv
            self.refs[kv.key] = ref


def _kind_of(keys: Keys, key: str) -> str:
    """The kind of key for the unreadable-keys metric: pool, block, node-index, node-status,
    node-alive, record, attachment, or other."""
    kind, _, tail = key[len(keys.prefix) :].partition("/")
    if kind == "nodes":
        what = tail.partition("/")[2]
        return "node-index" if what.startswith("blocks/") else f"node-{what or 'other'}"[:20]
    return {"pools": "pool", "blocks": "block", "records": "record"}.get(
        kind, "attachment" if kind == "attachments" else "other"
    )


def audit(snap: Snapshot, now: int, empty_grace: int) -> list[Finding]:
    """Every inconsistency of the snapshot, most severe first."""
    keys = snap.keys
    findings: list[Finding] = [
        Finding(
            Severity.CRITICAL,
            "malformed-key",
            kv.key,
            f"a {kind} key coil cannot read ({why[:200]}); coil skips it and repairs nothing "
            "from it; inspect it with etcdctl",
        )
        for kind, kv, why in snap.unreadable
    ]
    findings += _overlaps(snap)
    # Every record key counts, readable or not: a block with an unreadable record is not empty.
    records_per_block: dict[tuple[str, str], int] = defaultdict(int)
    for key in snap.present:
        if key.startswith(keys.all_records):
            parts = key[len(keys.all_records) :].split("/")
            if len(parts) == 4:
                records_per_block[(parts[0], parts[2])] += 1

    # Records: inside a block held by their node, with an attachment pointing back.
    for (pool_name, block_id, address_text), kv in snap.records.items():
        record = snap.decoded[(pool_name, block_id, address_text)]
        node = record.node
        subject = f"{address_text} ({pool_name})"
        pool = snap.pools.get(pool_name)
        block = record.block
        address: Address = record.address
        if pool is None or pool.subnet_of(block) is None:
            findings.append(
                Finding(
                    Severity.CRITICAL,
                    "record-outside-pool",
                    subject,
                    f"recorded for node {node} in block {block}, which no pool contains",
                )
            )
            continue
        holder = snap.blocks.get((pool_name, block_id))
        if holder is None:
            holder_key = keys.block(pool_name, block)
            findings.append(
                Finding(
                    Severity.CRITICAL,
                    "record-outside-held-block",
                    subject,
                    f"recorded for node {node}, but no node holds block {block}: another node "
                    "could claim it and hand the address out again",
                    Repair(
                        f"claimed block {block} back for node {node}",
                        (absent(holder_key),),
                        (
                            Put(holder_key, node.encode()),
                            Put(
                                keys.node_block(node, pool_name, block),
                                json.dumps({"claimed_at": now}).encode(),
                            ),
                        ),
                    )
                    if node
                    else None,
                )
            )
        elif snap.holders[(pool_name, block_id)] != node:
            findings.append(
                Finding(
                    Severity.CRITICAL,
                    "record-in-foreign-block",
                    subject,
                    f"recorded for node {node}, but block {block} is held by node "
                    f"{snap.holders[(pool_name, block_id)]}, which may hand it out again",
                )
            )
        attachment_key = keys.attachment(
            record.owner.container_id, record.owner.interface, address.version
        )
        attachment = snap.attachments.get(attachment_key)
        ref = record_ref(pool_name, block, address)
        if attachment is None and attachment_key in snap.present:
            pass  # an unreadable attachment key: its own finding, nothing to re-create
        elif attachment is None:
            findings.append(
                Finding(
                    Severity.WARNING,
                    "record-without-attachment",
                    subject,
                    "the record has no attachment key, so a repeated request for its pod would "
                    "not find it",
                    Repair(
                        "re-created the attachment key",
                        (unchanged(kv.key, kv.mod_revision), absent(attachment_key)),
                        (Put(attachment_key, ref),),
                    ),
                )
            )
        elif attachment.value != ref:
            findings.append(
                Finding(
                    Severity.CRITICAL,
                    "attachment-recorded-twice",
                    subject,
                    f"container {record.owner.container_id} interface {record.owner.interface} "
                    f"has this record and also {attachment.value.decode()}",
                )
            )

    # Attachments that point at no record, or at a record of another attachment.
    for key, kv in snap.attachments.items():
        pool_name, block, address = snap.refs[key]
        entry = (pool_name, block_key(block), str(address))
        target = snap.decoded.get(entry)
        if target is not None:
            container_id, interface, _ = key[len(keys.prefix) :].split("/")[1:]
            if (target.owner.container_id, target.owner.interface) != (container_id, interface):
                findings.append(
                    Finding(
                        Severity.CRITICAL,
                        "attachment-owner-mismatch",
                        key[len(keys.prefix) :],
                        f"points at {kv.value.decode()}, which is recorded for container "
                        f"{target.owner.container_id} interface {target.owner.interface}",
                    )
                )
        elif keys.record(pool_name, block, address) not in snap.present:
            # (A record that exists but cannot be read is its own finding: never delete the
            # attachment of what may be a live pod's address.)
            findings.append(
                Finding(
                    Severity.WARNING,
                    "attachment-without-record",
                    key[len(keys.prefix) :],
                    f"points at {kv.value.decode()}, which is not recorded",
                    Repair(
                        "deleted the attachment key",
                        (unchanged(key, kv.mod_revision),),
                        (Delete(key),),
                    ),
                )
            )

    # Blocks and the node index mirror each other.
    for (pool_name, block_id), kv in snap.blocks.items():
        node = snap.holders[(pool_name, block_id)]
        pool = snap.pools.get(pool_name)
        cidr: Network = parse_block_key(block_id, "stored block")
        if pool is None or pool.subnet_of(cidr) is None:
            findings.append(
                Finding(
                    Severity.CRITICAL,
                    "block-outside-pool",
                    f"{cidr} ({pool_name})",
                    f"held by node {node}, but no pool contains it",
                )
            )
        index_key = keys.node_block(node, pool_name, cidr)
        if (node, pool_name, block_id) not in snap.index:
            findings.append(
                Finding(
                    Severity.WARNING,
                    "block-missing-from-node-index",
                    f"{cidr} ({pool_name})",
                    f"held by node {node}, but missing from its index (coild would not see it)",
                    Repair(
                        "re-created the index entry",
                        (value_is(kv.key, node.encode()), absent(index_key)),
                        (Put(index_key, json.dumps({"claimed_at": now}).encode()),),
                    ),
                )
            )
    for (node, pool_name, block_id), kv in snap.index.items():
        if snap.holders.get((pool_name, block_id)) != node:
            findings.append(
                Finding(
                    Severity.WARNING,
                    "stale-node-index",
                    f"{block_id.replace('_', '/')} ({pool_name})",
                    f"listed for node {node}, which does not hold it",
                    Repair(
                        "deleted the index entry",
                        (unchanged(kv.key, kv.mod_revision),),
                        (Delete(kv.key),),
                    ),
                )
            )

    # Nodes: gone agents, empty blocks, routes out of step.
    held_by_node: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for pool_name, block_id in snap.blocks:
        held_by_node[snap.holders[(pool_name, block_id)]].append((pool_name, block_id))
    for node, held in sorted(held_by_node.items()):
        gone = node not in snap.alive
        status = snap.status.get(node)
        if gone:
            since = f"since {_ago(now - status.seen_at)}" if status else "ever"
            used = sum(records_per_block[b] for b in held)
            findings.append(
                Finding(
                    Severity.WARNING,
                    "node-agent-gone",
                    f"node {node}",
                    f"holds {len(held)} block(s) with {used} address(es), but its agent has not "
                    f"reported {since}; if the node is gone: coilctl node release {node}",
                )
            )
        families: dict[tuple[str, int], int] = defaultdict(int)
        for pool_name, block_id in held:
            families[(pool_name, 6 if ":" in block_id else 4)] += 1
        for pool_name, block_id in held:
            if records_per_block[(pool_name, block_id)]:
                continue
            claimed = snap.claimed_at.get((node, pool_name, block_id))
            if claimed is None:
                continue  # its claim time is unknown; the missing index is its own finding
            family = 6 if ":" in block_id else 4
            if now - claimed < empty_grace:
                continue
            if not gone and families[(pool_name, family)] <= 1:
                continue  # a live agent keeps its last block on purpose
            cidr = parse_block_key(block_id, "stored block")
            empty_key = keys.block(pool_name, cidr)
            findings.append(
                Finding(
                    Severity.WARNING if gone else Severity.INFO,
                    "empty-block-held",
                    f"{cidr} ({pool_name})",
                    f"held empty by node {node} for {_ago(now - claimed)}"
                    + (" and its agent is gone" if gone else ""),
                    Repair(
                        f"returned empty block {cidr} of gone node {node} to the pool",
                        (
                            value_is(empty_key, node.encode()),
                            none_with_prefix(keys.records(pool_name, cidr)),
                            absent(keys.node_alive(node)),  # still gone when repaired
                        ),
                        (Delete(empty_key), Delete(keys.node_block(node, pool_name, cidr))),
                    )
                    if gone
                    else None,
                )
            )
        if not gone and status:
            reported = set(status.routes)
            expected = {block_id.replace("_", "/") for _, block_id in held}
            missing = sorted(expected - reported)
            extra = sorted(reported - expected)
            if missing or extra:
                findings.append(
                    Finding(
                        Severity.WARNING,
                        "routes-out-of-step",
                        f"node {node}",
                        f"table {status.table} lacks {', '.join(missing) or 'nothing'}"
                        f" and has extra {', '.join(extra) or 'nothing'} (reported "
                        f"{_ago(now - status.seen_at)} ago)",
                    )
                )
    findings.sort(key=lambda f: (-f.severity, f.kind, f.subject))
    return findings


def _overlaps(snap: Snapshot) -> list[Finding]:
    """Pools whose subnets overlap (the API refuses them; etcdctl or a restore mix-up does not)
    and blocks that share addresses, held in two pools: the same address may be handed out
    twice."""
    findings = []
    subnets = sorted(
        ((s, name) for name, pool in snap.pools.items() for s in pool.subnets),
        key=lambda x: (x[0].version, int(x[0].network_address), x[0].prefixlen, x[1]),
    )
    for i, (a, pool_a) in enumerate(subnets):
        for b, pool_b in subnets[i + 1 :]:
            if b.version != a.version or int(b.network_address) > int(a.broadcast_address):
                break
            findings.append(
                Finding(
                    Severity.CRITICAL,
                    "pools-overlap",
                    f"pool {pool_a}"
                    if pool_a == pool_b
                    else "pools {} and {}".format(*sorted((pool_a, pool_b))),
                    f'subnet {a} of pool "{pool_a}" overlaps subnet {b} of pool "{pool_b}": '
                    "their blocks may be handed out twice (claims refuse a block that overlaps "
                    "one held in another pool); remove the overlap with etcdctl",
                )
            )
    held = sorted(
        (
            (parse_block_key(block_id, "stored block"), pool, snap.holders[(pool, block_id)])
            for pool, block_id in snap.blocks
        ),
        key=lambda x: (x[0].version, int(x[0].network_address), -x[0].num_addresses),
    )
    widest: tuple[Network, str, str] | None = None  # the held block reaching furthest so far
    for block, pool, node in held:
        if (
            widest is not None
            and widest[0].version == block.version
            and int(block.network_address) <= int(widest[0].broadcast_address)
        ):
            findings.append(
                Finding(
                    Severity.CRITICAL,
                    "address-space-held-twice",
                    f"{block} ({pool})",
                    f"held by node {node}, and overlaps block {widest[0]} of pool {widest[1]} "
                    f"held by node {widest[2]}: the same addresses may be handed out twice",
                )
            )
        if (
            widest is None
            or widest[0].version != block.version
            or int(block.broadcast_address) > int(widest[0].broadcast_address)
        ):
            widest = (block, pool, node)
    return findings


def _ago(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"
