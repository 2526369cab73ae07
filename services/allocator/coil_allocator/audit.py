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

from coil_allocator.keys import Keys, decode_pool, parse_record_path, record_ref
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
from coil_core.model import Pool, parse_address


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
    """Every key under coil's prefix at one revision, sorted by kind."""

    keys: Keys
    revision: int
    pools: dict[str, Pool] = field(default_factory=dict)
    blocks: dict[tuple[str, str], KeyValue] = field(default_factory=dict)  # (pool, block id)
    index: dict[tuple[str, str, str], KeyValue] = field(default_factory=dict)  # (node, pool, id)
    alive: dict[str, KeyValue] = field(default_factory=dict)  # node -> leased key
    status: dict[str, KeyValue] = field(default_factory=dict)  # node -> last report
    records: dict[tuple[str, str, str], KeyValue] = field(default_factory=dict)  # pool, id, addr
    attachments: dict[str, KeyValue] = field(default_factory=dict)  # key -> kv

    malformed: list[KeyValue] = field(default_factory=list)

    @classmethod
    def from_kvs(cls, keys: Keys, revision: int, kvs: list[KeyValue]) -> Snapshot:
        snap = cls(keys, revision)
        for kv in kvs:
            try:
                snap._add(kv)
            except Exception:  # noqa: BLE001 - an unreadable key is itself a finding
                snap.malformed.append(kv)
        return snap

    def _add(self, kv: KeyValue) -> None:
        """File one key under its kind; raises if it cannot be read."""
        kind, _, tail = kv.key[len(self.keys.prefix) :].partition("/")
        if kind == "pools":
            self.pools[tail] = decode_pool(tail, kv.value)
        elif kind == "blocks":
            pool, _, block_id = tail.partition("/")
            parse_block_key(block_id, "stored block")
            self.blocks[(pool, block_id)] = kv
        elif kind == "nodes":
            node, _, what = tail.partition("/")
            if what == "alive":
                self.alive[node] = kv
            elif what == "status":
                json.loads(kv.value)
                self.status[node] = kv
            elif what.startswith("blocks/"):
                pool, _, block_id = what[len("blocks/") :].partition("/")
                parse_block_key(block_id, "stored index")
                json.loads(kv.value)
                self.index[(node, pool, block_id)] = kv
        elif kind == "records":
            pool, _family, block_id, address = tail.split("/", 3)
            parse_block_key(block_id, "stored record")
            parse_address(address, "stored record")
            json.loads(kv.value)
            self.records[(pool, block_id, address)] = kv
        elif kind == "attachments":
            parse_record_path(kv.value.decode())
            self.attachments[kv.key] = kv


def _record_owner(kv: KeyValue) -> dict[str, object]:
    data: dict[str, object] = json.loads(kv.value)
    return data


def audit(snap: Snapshot, now: int, empty_grace: int) -> list[Finding]:
    """Every inconsistency of the snapshot, most severe first."""
    keys = snap.keys
    findings: list[Finding] = [
        Finding(
            Severity.CRITICAL,
            "malformed-key",
            kv.key,
            "a key or value coil cannot read; inspect it with etcdctl",
        )
        for kv in snap.malformed
    ]
    records_per_block: dict[tuple[str, str], int] = defaultdict(int)

    # Records: inside a block held by their node, with an attachment pointing back.
    for (pool_name, block_id, address_text), kv in snap.records.items():
        records_per_block[(pool_name, block_id)] += 1
        record = _record_owner(kv)
        node = str(record.get("node", ""))
        subject = f"{address_text} ({pool_name})"
        pool = snap.pools.get(pool_name)
        block = parse_block_key(block_id, "stored record")
        address: Address = parse_address(address_text, "stored record")
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
        elif holder.value.decode() != node:
            findings.append(
                Finding(
                    Severity.CRITICAL,
                    "record-in-foreign-block",
                    subject,
                    f"recorded for node {node}, but block {block} is held by node "
                    f"{holder.value.decode()}, which may hand it out again",
                )
            )
        attachment_key = keys.attachment(
            str(record.get("container_id", "")), str(record.get("interface", "")), address.version
        )
        attachment = snap.attachments.get(attachment_key)
        ref = record_ref(pool_name, block, address)
        if attachment is None:
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
                    f"container {record.get('container_id')} interface {record.get('interface')} "
                    f"has this record and also {attachment.value.decode()}",
                )
            )

    # Attachments that point at no record.
    for key, kv in snap.attachments.items():
        pool_name, block, address = parse_record_path(kv.value.decode())
        if (pool_name, block_key(block), str(address)) not in snap.records:
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
        node = kv.value.decode()
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
        holder = snap.blocks.get((pool_name, block_id))
        if holder is None or holder.value.decode() != node:
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
    for (pool_name, block_id), kv in snap.blocks.items():
        held_by_node[kv.value.decode()].append((pool_name, block_id))
    for node, held in sorted(held_by_node.items()):
        gone = node not in snap.alive
        status = json.loads(snap.status[node].value) if node in snap.status else {}
        if gone:
            seen = status.get("seen_at")
            since = f"since {_ago(now - int(seen))}" if seen else "ever"
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
            index = snap.index.get((node, pool_name, block_id))
            if index is None:
                continue  # its claim time is unknown; the missing index is its own finding
            claimed = int(json.loads(index.value).get("claimed_at", 0))
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
            reported = set(status.get("routes", []))
            expected = {block_id.replace("_", "/") for _, block_id in held}
            missing = sorted(expected - reported)
            extra = sorted(reported - expected)
            if missing or extra:
                findings.append(
                    Finding(
                        Severity.WARNING,
                        "routes-out-of-step",
                        f"node {node}",
                        f"table {status.get('table', '?')} lacks {', '.join(missing) or 'nothing'}"
                        f" and has extra {', '.join(extra) or 'nothing'} (reported "
                        f"{_ago(now - int(status.get('seen_at', now)))} ago)",
                    )
                )
    findings.sort(key=lambda f: (-f.severity, f.kind, f.subject))
    return findings


def _ago(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"
