"""Keys coil cannot read, written straight into a real etcd under the test's prefix: each is skipped
where it is read (the rest goes on working), named by `coilctl check`, counted in the allocator's
metrics, and never the basis of a repair."""

from __future__ import annotations

import json

import pytest

from coil_allocator.allocator import Allocator
from coil_allocator.audit import Severity
from coil_allocator.etcd_store import EtcdStore
from coil_allocator.metrics import AllocatorMetrics
from coil_allocator.store import Put
from coil_core import errors
from coil_core.model import Family, Owner, RecordRequest
from tests.conftest import snapshot, usable


@pytest.fixture
def metrics() -> AllocatorMetrics:
    return AllocatorMetrics()


@pytest.fixture
def live(store: EtcdStore, etcd_prefix: str, metrics: AllocatorMetrics) -> Allocator:
    """Pool "default" with node-a alive, holding one block with one record (container c0)."""
    allocator = Allocator(store, etcd_prefix, events=metrics)
    allocator.create_pool("default", ["10.1.0.0/24", "fd00:1::/120"], 4)
    block, _ = allocator.claim_block("node-a", "default", Family.IPV4)
    record(allocator, block.cidr, 0, "c0")
    allocator.report_node("node-a", 0, [str(block.cidr)], 119)
    return allocator


def record(allocator: Allocator, block: object, i: int, cid: str) -> str:
    address = usable(allocator, "default", block)[i]  # type: ignore[arg-type]
    owner = Owner("ns", f"pod-{cid}", cid, "eth0")
    (result,) = allocator.record(
        "node-a", [RecordRequest.from_strings(str(address), "default", str(block), owner)]
    )
    assert result.outcome.value == "recorded", result
    return str(address)


def put(store: EtcdStore, allocator: Allocator, **keys: bytes) -> list[str]:
    """Write raw values at keys under the prefix (given relative to it); return the full keys."""
    full = {allocator.keys.prefix + k.replace("__", "/"): v for k, v in keys.items()}
    store.txn([], [Put(k, v) for k, v in full.items()])
    return sorted(full)


def put_raw(store: EtcdStore, allocator: Allocator, rel: str, value: bytes) -> str:
    key = allocator.keys.prefix + rel
    store.txn([], [Put(key, value)])
    return key


def malformed(allocator: Allocator, repair: bool = False) -> set[str]:
    findings, _ = allocator.check_store(repair)
    found = {f.subject for f in findings if f.kind == "malformed-key"}
    assert all(f.severity == Severity.CRITICAL for f in findings if f.kind == "malformed-key")
    return found


def unreadable_count(metrics: AllocatorMetrics, kind: str) -> float:
    value = metrics.registry.get_sample_value(
        "coil_allocator_unreadable_keys_total", {"kind": kind}
    )
    return value or 0.0


@pytest.mark.parametrize(
    "value", [b"garbage", b"[]", b'{"subnets": [], "block_bits": 4}', b"\xff\xfe"], ids=repr
)
def test_unreadable_pool_is_skipped_and_recording_goes_on(
    live: Allocator, store: EtcdStore, metrics: AllocatorMetrics, value: bytes
) -> None:
    bad = put_raw(store, live, "pools/broken", value)
    # Before: every ListPools and every RecordAllocations failed, so every ADD ended in 999.
    assert [p.name for p in live.list_pools()] == ["default"]
    live.records._pools_cache = (-1e9, {})  # as after a restart: the pools are read afresh
    block = live.node_blocks("node-a")[0][0]
    record(live, block.cidr, 1, "c1")
    assert unreadable_count(metrics, "pool") >= 1
    with pytest.raises(errors.FailedPrecondition, match=f"{bad}.*cannot be read"):
        live.get_pool("broken")
    with pytest.raises(errors.FailedPrecondition, match="cannot be read"):
        live.claim_block("node-a", "broken")
    assert malformed(live) == {bad}


def test_pool_with_block_bits_200_leaves_usage_and_pool_show_working(
    live: Allocator, store: EtcdStore, metrics: AllocatorMetrics
) -> None:
    bad = put_raw(store, live, "pools/huge", b'{"subnets":["10.9.0.0/24"],"block_bits":200}')
    assert {u.pool for u in live.usage()} == {"default"}
    pool, subnets = live.get_pool("default")
    assert sum(len(s.held) for s in subnets) == 1
    assert malformed(live) == {bad}
    assert unreadable_count(metrics, "pool") >= 1


def test_stray_block_keys_leave_usage_pool_show_and_pool_metrics_working(
    live: Allocator, store: EtcdStore, metrics: AllocatorMetrics
) -> None:
    stray = [
        put_raw(store, live, "blocks/noslash", b"node-a"),
        put_raw(store, live, "blocks/default/garbage", b"node-a"),
        put_raw(store, live, "blocks/default/10.1.0.64_28", b"\xff not a node"),
        put_raw(store, live, "records/default/4", b"{}"),
    ]
    v4 = next(u for u in live.usage() if u.family == Family.IPV4)
    # A well-formed block key with an unreadable holder still takes its block out of the pool.
    assert (v4.blocks_held, v4.addresses_used) == (2, 1)
    _, subnets = live.get_pool("default")
    assert [str(b.cidr) for s in subnets for b in s.held] == [
        str(live.node_blocks("node-a")[0][0].cidr)
    ]
    metrics.watch_usage(live)
    held = metrics.registry.get_sample_value(
        "coil_pool_blocks_held", {"pool": "default", "family": "ipv4"}
    )
    assert held == 2
    assert unreadable_count(metrics, "block") >= 3
    assert malformed(live) == set(stray)


def test_malformed_node_index_and_record_do_not_keep_coild_from_starting(
    live: Allocator, store: EtcdStore, metrics: AllocatorMetrics
) -> None:
    """coild rebuilds its state from ListNodeBlocks with records after a restart: it must get
    the blocks and every readable record."""
    block = live.node_blocks("node-a")[0][0]
    good = record(live, block.cidr, 1, "c1")
    index_key = live.keys.node_block("node-a", "default", block.cidr)
    bad_record = live.keys.record("default", block.cidr, usable(live, "default", block.cidr)[2])
    store.txn(
        [],
        [
            Put(index_key, b'{"claimed_at": "yesterday"}'),
            Put(bad_record, b"[]"),
            Put(live.keys.node_blocks("node-a") + "default/garbage", b"{}"),
        ],
    )
    blocks, records, _ = live.node_blocks("node-a", with_records=True)
    assert [b.cidr for b in blocks] == [block.cidr]
    assert blocks[0].used == 3  # the unreadable record still takes its address
    assert sorted(str(r.address) for r in records) == sorted(
        [str(usable(live, "default", block.cidr)[0]), good]
    )
    assert unreadable_count(metrics, "record") >= 1
    assert unreadable_count(metrics, "node-index") >= 1
    # Recording the unreadable record's address again is refused, not overwritten.
    owner = Owner("ns", "pod-c9", "c9", "eth0")
    (result,) = live.record(
        "node-a",
        [
            RecordRequest.from_strings(
                bad_record.rsplit("/", 1)[1], "default", str(block.cidr), owner
            )
        ],
    )
    assert result.outcome.value == "address in use" and bad_record in result.message
    assert malformed(live) == {
        index_key,
        bad_record,
        live.keys.node_blocks("node-a") + "default/garbage",
    }


def test_check_survives_every_kind_of_malformed_value(
    live: Allocator, store: EtcdStore, metrics: AllocatorMetrics
) -> None:
    block = live.node_blocks("node-a")[0][0]
    p = live.keys.prefix
    bad = {
        p + "nodes/node-a/status": b"[]",
        p + "nodes/node-b/status": b'{"seen_at": "now", "table": 119, "routes": []}',
        live.keys.node_block("node-a", "default", block.cidr): b'"just a string"',
        p + "records/default/4/10.1.0.64_28/10.1.0.70": b'{"node": 5}',
        p + "records/default/6/10.1.0.64_28/10.1.0.71": b"{}",
        p + "blocks/default/10.1.0.96_28": b"\xff\xfe",
        p + "attachments/c9/eth0/4": b"default/10.1.0.64_28",
        p + "attachments/c9/eth0/6": b"default/10.1.0.64_28/10.1.0.70",
        p + "pools/Bad_Name": json.dumps({"subnets": ["10.7.0.0/24"], "block_bits": 4}).encode(),
    }
    store.txn([], [Put(k, v) for k, v in bad.items()])
    assert malformed(live) == set(bad)
    assert unreadable_count(metrics, "node-status") >= 2
    assert unreadable_count(metrics, "attachment") >= 2
    # Reports go on: an unreadable status is rewritten.
    live.report_node("node-a", 0, [str(block.cidr)], 119)
    assert p + "nodes/node-a/status" not in malformed(live)


def test_repair_never_builds_keys_from_a_record_with_missing_fields(
    live: Allocator, store: EtcdStore, etcd_prefix: str
) -> None:
    """Before: a record without container_id and interface made the repair create
    `attachments///4`."""
    block = live.node_blocks("node-a")[0][0]
    address = usable(live, "default", block.cidr)[3]
    key = live.keys.record("default", block.cidr, address)
    store.txn([], [Put(key, json.dumps({"node": "node-a", "created_at": 1}).encode())])
    before = snapshot(store, etcd_prefix)
    assert malformed(live, repair=True) == {key}
    assert snapshot(store, etcd_prefix) == before


def test_repair_keeps_the_attachment_of_an_unreadable_record(
    live: Allocator, store: EtcdStore, etcd_prefix: str
) -> None:
    """Before: an unreadable record made the repair delete a live pod's attachment key."""
    block = live.node_blocks("node-a")[0][0]
    address = record(live, block.cidr, 1, "c1")
    key = live.keys.record("default", block.cidr, usable(live, "default", block.cidr)[1])
    store.txn([], [Put(key, b"{not json")])
    before = snapshot(store, etcd_prefix)
    findings, _ = live.check_store(repair=True)
    assert {(f.kind, f.subject) for f in findings} == {("malformed-key", key)}
    assert snapshot(store, etcd_prefix) == before
    assert live.keys.attachment("c1", "eth0", 4) in before
    # Releasing it by address cannot tell whose it is: refused, nothing deleted.
    with pytest.raises(errors.FailedPrecondition, match="cannot be read"):
        live.free_address(address)
    assert snapshot(store, etcd_prefix) == before


def test_attachment_key_must_match_its_records_owner(
    live: Allocator, store: EtcdStore, etcd_prefix: str
) -> None:
    block = live.node_blocks("node-a")[0][0]
    c0 = usable(live, "default", block.cidr)[0]
    foreign = live.keys.attachment("c-other", "eth0", 4)
    store.txn([], [Put(foreign, f"default/{block.key_id}/{c0}".encode())])
    before = snapshot(store, etcd_prefix)
    findings, _ = live.check_store(repair=True)
    mismatch = [f for f in findings if f.kind == "attachment-owner-mismatch"]
    assert len(mismatch) == 1 and mismatch[0].severity == Severity.CRITICAL
    assert "c-other" in mismatch[0].subject and "container c0" in mismatch[0].message
    assert snapshot(store, etcd_prefix) == before  # no repair guesses which one is right
