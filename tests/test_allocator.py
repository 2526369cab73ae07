"""The allocator against a real etcd: pools, claims, records, releases, usage, and bad input that
must change nothing."""

from __future__ import annotations

import ipaddress
import json

import pytest

from coil_allocator.allocator import Allocator
from coil_allocator.etcd_store import EtcdStore
from coil_core import errors
from coil_core.model import (
    Family,
    HeldBlock,
    Owner,
    RecordOutcome,
    RecordRequest,
    ReleaseOutcome,
    ReleaseRequest,
)
from tests.conftest import snapshot, usable


def owner(cid: str, ifname: str = "eth0", pod: str = "p") -> Owner:
    return Owner("ns", pod, cid, ifname)


def rec(address: object, pool: str, block: object, o: Owner) -> RecordRequest:
    return RecordRequest.from_strings(str(address), pool, str(block), o)


# -- pools -------------------------------------------------------------------------------------


def test_pool_create_list_add_subnet_delete(allocator: Allocator) -> None:
    allocator.create_pool("default", ["10.1.0.0/24", "fd00:1::/120"], 5)
    allocator.create_pool("team-a", ["10.2.0.0/24"], 3)
    assert [p.name for p in allocator.list_pools()] == ["default", "team-a"]
    pool = allocator.add_subnet("team-a", "10.3.0.0/26")
    assert [str(s) for s in pool.subnets] == ["10.2.0.0/24", "10.3.0.0/26"]
    assert [str(s) for s in allocator.list_pools()[1].subnets] == ["10.2.0.0/24", "10.3.0.0/26"]
    allocator.delete_pool("team-a")
    assert [p.name for p in allocator.list_pools()] == ["default"]


BAD_POOLS = [
    ("Bad_Name", ["10.9.0.0/24"], 5, errors.InvalidArgument, "not a valid namespace name"),
    ("ok", ["10.9.0.0/33"], 5, errors.InvalidArgument, "10.9.0.0/33"),
    ("ok", ["banana"], 5, errors.InvalidArgument, "banana"),
    ("ok", ["10.0.0.1/16"], 5, errors.InvalidArgument, "not a network address"),
    ("ok", ["10.9.0.0/28"], 5, errors.InvalidArgument, "10.9.0.0/28"),
    ("ok", ["10.9.0.0/24"], -1, errors.InvalidArgument, "negative"),
    ("ok", [], 5, errors.InvalidArgument, "at least one subnet"),
    ("ok", ["10.9.0.0/24", "10.9.0.128/25"], 5, errors.InvalidArgument, "overlap"),
    ("ok", ["10.1.0.128/25"], 5, errors.AlreadyExists, 'pool "default"'),
    ("default", ["10.8.0.0/24"], 5, errors.AlreadyExists, "exists"),
    ("ok", ["fd00:1::80/121"], 2, errors.AlreadyExists, "overlaps"),
    # Ranges pods cannot use: each refused, naming the subnet and the range.
    ("ok", ["127.0.0.0/24"], 5, errors.InvalidArgument, '"127.0.0.0/24": overlaps the loopback'),
    ("ok", ["224.0.0.0/24"], 5, errors.InvalidArgument, '"224.0.0.0/24": overlaps the multicast'),
    ("ok", ["169.254.0.0/24"], 5, errors.InvalidArgument, "overlaps the link-local"),
    ("ok", ["0.0.0.0/24"], 5, errors.InvalidArgument, '"0.0.0.0/24": overlaps the unspecified'),
    ("ok", ["0.0.0.0/0"], 5, errors.InvalidArgument, '"0.0.0.0/0": overlaps'),
    ("ok", ["::/120"], 5, errors.InvalidArgument, '"::/120": overlaps the unspecified'),
    ("ok", ["::ffff:10.9.0.0/120"], 5, errors.InvalidArgument, "IPv4-mapped"),
    ("ok", ["fe80::/64"], 5, errors.InvalidArgument, '"fe80::/64": overlaps the link-local'),
    ("ok", ["ff02::/120"], 5, errors.InvalidArgument, "overlaps the multicast"),
]


@pytest.mark.parametrize(
    "name,subnets,bits,error,text", BAD_POOLS, ids=[f"{p[0]}-{p[1]}-{p[2]}" for p in BAD_POOLS]
)
def test_bad_pool_create_changes_nothing(
    allocator: Allocator,
    store: EtcdStore,
    etcd_prefix: str,
    name: str,
    subnets: list[str],
    bits: int,
    error: type[Exception],
    text: str,
) -> None:
    allocator.create_pool("default", ["10.1.0.0/24", "fd00:1::/120"], 5)
    before = snapshot(store, etcd_prefix)
    with pytest.raises(error) as raised:
        allocator.create_pool(name, subnets, bits)
    assert text in str(raised.value)
    assert str(raised.value).startswith("pool create")
    assert snapshot(store, etcd_prefix) == before


def test_add_subnet_rejects_overlap_and_unknown_pool(
    allocator: Allocator, store: EtcdStore, etcd_prefix: str
) -> None:
    allocator.create_pool("default", ["10.1.0.0/24"], 5)
    allocator.create_pool("other", ["10.2.0.0/24"], 5)
    before = snapshot(store, etcd_prefix)
    with pytest.raises(
        errors.AlreadyExists, match='overlaps subnet "10.1.0.0/24" of pool "default"'
    ):
        allocator.add_subnet("other", "10.1.0.0/16")
    with pytest.raises(errors.NotFound, match='"nope": no such pool'):
        allocator.add_subnet("nope", "10.7.0.0/24")
    with pytest.raises(errors.InvalidArgument, match="10.7.0.0/28"):
        allocator.add_subnet("other", "10.7.0.0/28")  # smaller than one block of 2^5
    with pytest.raises(errors.InvalidArgument, match='"127.1.0.0/24": overlaps the loopback'):
        allocator.add_subnet("other", "127.1.0.0/24")
    assert snapshot(store, etcd_prefix) == before


def test_pool_in_use_cannot_be_deleted(
    allocator: Allocator, store: EtcdStore, etcd_prefix: str
) -> None:
    allocator.create_pool("default", ["10.1.0.0/24"], 5)
    block, _ = allocator.claim_block("node-a", "default")
    before = snapshot(store, etcd_prefix)
    with pytest.raises(errors.FailedPrecondition, match="held \\(by node node-a\\)"):
        allocator.delete_pool("default")
    assert snapshot(store, etcd_prefix) == before
    allocator.release_block("node-a", "default", str(block.cidr))
    allocator.delete_pool("default")
    assert allocator.list_pools() == []


# -- blocks ------------------------------------------------------------------------------------


def test_claims_fill_a_pool_without_duplicates_then_exhaust(allocator: Allocator) -> None:
    allocator.create_pool("small", ["10.5.0.0/26", "fd00:5::/122"], 3)  # 8 blocks per family
    got = [allocator.claim_block(f"n{i}", "small", Family.IPV4)[0].cidr for i in range(8)]
    assert len(set(got)) == 8
    assert all(b.subnet_of(ipaddress.ip_network("10.5.0.0/26")) for b in got)  # type: ignore[arg-type]
    assert sorted(got) == list(ipaddress.ip_network("10.5.0.0/26").subnets(new_prefix=29))
    with pytest.raises(errors.PoolExhausted, match='"small": pool exhausted: no free IPv4 block'):
        allocator.claim_block("late", "small", Family.IPV4)
    # IPv6 is a separate space and still has room.
    block6, _ = allocator.claim_block("late", "small", Family.IPV6)
    assert block6.cidr.prefixlen == 125


def test_claim_errors(allocator: Allocator) -> None:
    allocator.create_pool("v4only", ["10.6.0.0/24"], 5)
    with pytest.raises(errors.NotFound, match='"nope": no such pool'):
        allocator.claim_block("n1", "nope")
    with pytest.raises(errors.InvalidArgument, match="no IPv6 subnet"):
        allocator.claim_block("n1", "v4only", Family.IPV6)
    with pytest.raises(errors.InvalidArgument, match='node "Bad Node"'):
        allocator.claim_block("Bad Node", "v4only")


def test_release_block_only_when_empty_and_held(allocator: Allocator) -> None:
    allocator.create_pool("default", ["10.1.0.0/24"], 5)
    block, _ = allocator.claim_block("node-a", "default")
    addr = usable(allocator, "default", block.cidr)[3]
    allocator.record("node-a", [rec(addr, "default", block.cidr, owner("c1"))])
    with pytest.raises(errors.FailedPrecondition, match="1 address"):
        allocator.release_block("node-a", "default", str(block.cidr))
    with pytest.raises(errors.FailedPrecondition, match='held by node "node-a", not "node-b"'):
        allocator.release_block("node-b", "default", str(block.cidr))
    allocator.release("node-a", [ReleaseRequest(addr, "c1", "eth0")])
    allocator.release_block("node-a", "default", str(block.cidr))
    assert allocator.node_blocks("node-a")[0] == []
    with pytest.raises(errors.FailedPrecondition, match="not held by any node"):
        allocator.release_block("node-a", "default", str(block.cidr))


# -- records -----------------------------------------------------------------------------------


def test_record_is_durable_with_owner_and_idempotent(
    allocator: Allocator, store: EtcdStore, etcd_prefix: str
) -> None:
    allocator.create_pool("default", ["10.1.0.0/24", "fd00:1::/120"], 5)
    b4, _ = allocator.claim_block("node-a", "default", Family.IPV4)
    b6, _ = allocator.claim_block("node-a", "default", Family.IPV6)
    o = Owner("web", "web-0", "abc123", "eth0")
    a4, a6 = usable(allocator, "default", b4.cidr)[1], usable(allocator, "default", b6.cidr)[1]
    results = allocator.record(
        "node-a", [rec(a4, "default", b4.cidr, o), rec(a6, "default", b6.cidr, o)]
    )
    assert [r.outcome for r in results] == [RecordOutcome.RECORDED] * 2
    # The record is in etcd under its block, with every field.
    key = f"{etcd_prefix}records/default/4/{str(b4.cidr).replace('/', '_')}/{a4}"
    stored = json.loads(snapshot(store, etcd_prefix)[key])
    assert stored["namespace"] == "web" and stored["pod"] == "web-0"
    assert stored["container_id"] == "abc123" and stored["interface"] == "eth0"
    assert stored["node"] == "node-a" and stored["created_at"] > 0
    # Repeating the same record is RECORDED again and changes nothing.
    before = snapshot(store, etcd_prefix)
    again = allocator.record("node-a", [rec(a4, "default", b4.cidr, o)])
    assert again[0].outcome == RecordOutcome.RECORDED
    assert snapshot(store, etcd_prefix) == before
    # Another address for the same attachment and family finds the existing one.
    other = allocator.record("node-a", [rec(a4 + 1, "default", b4.cidr, o)])
    assert other[0].outcome == RecordOutcome.EXISTING
    assert other[0].record is not None and other[0].record.address == a4
    assert snapshot(store, etcd_prefix) == before


def test_record_rejects_taken_address_and_foreign_block(
    allocator: Allocator, store: EtcdStore, etcd_prefix: str
) -> None:
    allocator.create_pool("default", ["10.1.0.0/24"], 5)
    mine, _ = allocator.claim_block("node-a", "default")
    theirs, _ = allocator.claim_block("node-b", "default")
    addr = usable(allocator, "default", mine.cidr)[1]
    allocator.record("node-a", [rec(addr, "default", mine.cidr, owner("c1"))])
    before = snapshot(store, etcd_prefix)
    results = allocator.record(
        "node-a",
        [
            rec(addr, "default", mine.cidr, owner("c2")),
            rec(usable(allocator, "default", theirs.cidr)[1], "default", theirs.cidr, owner("c3")),
        ],
    )
    assert results[0].outcome == RecordOutcome.ADDRESS_IN_USE
    assert 'container "c1"' in results[0].message
    assert results[1].outcome == RecordOutcome.BLOCK_NOT_HELD
    assert 'held by node "node-b"' in results[1].message
    assert snapshot(store, etcd_prefix) == before


def test_batch_commits_good_items_beside_bad_ones(allocator: Allocator) -> None:
    allocator.create_pool("default", ["10.1.0.0/22"], 7)  # blocks of 128
    block, _ = allocator.claim_block("node-a", "default")
    base = usable(allocator, "default", block.cidr)
    allocator.record("node-a", [rec(base[5], "default", block.cidr, owner("taken"))])
    items = [rec(base[i], "default", block.cidr, owner(f"c{i}")) for i in range(100)]
    results = allocator.record("node-a", items)
    outcomes = [r.outcome for r in results]
    assert outcomes[5] == RecordOutcome.ADDRESS_IN_USE
    assert outcomes.count(RecordOutcome.RECORDED) == 99
    _, records, _ = allocator.node_blocks("node-a", with_records=True)
    assert len(records) == 100
    assert len({r.address for r in records}) == 100


def test_batch_with_duplicates_is_rejected_per_item(allocator: Allocator) -> None:
    allocator.create_pool("default", ["10.1.0.0/24"], 5)
    block, _ = allocator.claim_block("node-a", "default")
    a = usable(allocator, "default", block.cidr)[1]
    results = allocator.record(
        "node-a",
        [rec(a, "default", block.cidr, owner("c1")), rec(a, "default", block.cidr, owner("c2"))],
    )
    assert results[0].outcome == RecordOutcome.RECORDED
    assert results[1].outcome == RecordOutcome.INVALID


@pytest.mark.parametrize(
    "address,block,cid,ifname,text",
    [
        ("10.1.0.99", "10.1.0.0/27", "c1", "eth0", "not in block"),
        ("nope", "10.1.0.0/27", "c1", "eth0", "not an IP address"),
        ("10.1.0.1", "10.1.0.1/27", "c1", "eth0", "not a"),
        ("10.1.0.1", "10.1.0.0/27", "", "eth0", "container ID"),
        ("10.1.0.1", "10.1.0.0/27", "c1", "a/b", "interface"),
        ("10.1.0.1", "10.1.0.0/27", "c1", "way-too-long-ifname", "interface"),
    ],
    ids=["outside-block", "not-ip", "bad-block", "no-container", "slash-ifname", "long-ifname"],
)
def test_record_request_validation(
    address: str, block: str, cid: str, ifname: str, text: str
) -> None:
    with pytest.raises(errors.InvalidArgument, match=text):
        RecordRequest.from_strings(address, "default", block, Owner("ns", "p", cid, ifname))


def test_release_checks_owner_and_is_idempotent(allocator: Allocator) -> None:
    allocator.create_pool("default", ["10.1.0.0/24"], 5)
    block, _ = allocator.claim_block("node-a", "default")
    addr = usable(allocator, "default", block.cidr)[1]
    allocator.record("node-a", [rec(addr, "default", block.cidr, owner("c1"))])
    wrong = allocator.release("node-a", [ReleaseRequest(addr, "c2", "eth0")])
    assert wrong[0].outcome == ReleaseOutcome.OWNER_MISMATCH
    other_node = allocator.release("node-b", [ReleaseRequest(addr, "c1", "eth0")])
    assert other_node[0].outcome == ReleaseOutcome.OWNER_MISMATCH
    assert allocator.address_info(str(addr)).record is not None
    ok = allocator.release("node-a", [ReleaseRequest(addr, "c1", "eth0")])
    assert ok[0].outcome == ReleaseOutcome.RELEASED
    again = allocator.release("node-a", [ReleaseRequest(addr, "c1", "eth0")])
    assert again[0].outcome == ReleaseOutcome.NOT_RECORDED
    # The attachment may take a new address now.
    results = allocator.record("node-a", [rec(addr + 1, "default", block.cidr, owner("c1"))])
    assert results[0].outcome == RecordOutcome.RECORDED


def test_address_info_and_free(allocator: Allocator, store: EtcdStore, etcd_prefix: str) -> None:
    allocator.create_pool("default", ["10.1.0.0/24"], 5)
    block, _ = allocator.claim_block("node-a", "default")
    addr = usable(allocator, "default", block.cidr)[7]
    allocator.record("node-a", [rec(addr, "default", block.cidr, owner("c7", pod="web-7"))])
    info = allocator.address_info(str(addr))
    assert info.node == "node-a" and info.record is not None
    assert info.record.owner.pod == "web-7"
    free = allocator.address_info(str(addr + 1))
    assert free.node == "node-a" and free.record is None
    before = snapshot(store, etcd_prefix)
    with pytest.raises(errors.NotFound, match="not allocated"):
        allocator.free_address(str(addr + 1))
    with pytest.raises(errors.NotFound, match="in no pool"):
        allocator.address_info("192.0.2.1")
    with pytest.raises(errors.InvalidArgument, match='"x.y": not an IP address'):
        allocator.free_address("x.y")
    assert snapshot(store, etcd_prefix) == before
    removed = allocator.free_address(str(addr))
    assert removed.owner.container_id == "c7"
    assert allocator.address_info(str(addr)).record is None


def test_release_node_gives_everything_back(
    allocator: Allocator, store: EtcdStore, etcd_prefix: str
) -> None:
    allocator.create_pool("default", ["10.1.0.0/24", "fd00:1::/120"], 5)
    allocator.create_pool("other", ["10.2.0.0/24"], 5)
    b1, _ = allocator.claim_block("gone", "default", Family.IPV4)
    b2, _ = allocator.claim_block("gone", "default", Family.IPV6)
    b3, _ = allocator.claim_block("gone", "other")
    kept, _ = allocator.claim_block("alive", "default")
    allocator.record(
        "gone",
        [
            rec(usable(allocator, "default", b1.cidr)[i], "default", b1.cidr, owner(f"c{i}"))
            for i in range(20)
        ]
        + [rec(usable(allocator, "default", b2.cidr)[1], "default", b2.cidr, owner("c0"))],
    )
    allocator.record(
        "alive", [rec(usable(allocator, "default", kept.cidr)[0], "default", kept.cidr, owner("k"))]
    )
    blocks, removed = allocator.release_node("gone")
    assert {b.cidr for b in blocks} == {b1.cidr, b2.cidr, b3.cidr}
    assert removed == 21
    keys = snapshot(store, etcd_prefix)
    assert not [k for k in keys if "/nodes/gone/" in k or b"gone" in keys[k]]
    assert not [k for k in keys if "/attachments/c" in k]  # the gone node's attachments
    assert allocator.node_blocks("alive")[0][0].cidr == kept.cidr
    with pytest.raises(errors.NotFound, match='"gone": the node holds no block'):
        allocator.release_node("gone")
    # The blocks can be claimed by another node.
    allocator.create_pool("tiny", ["10.3.0.0/27"], 5)
    t, _ = allocator.claim_block("gone", "tiny")
    allocator.release_node("gone")
    assert allocator.claim_block("next", "tiny")[0].cidr == t.cidr


def test_usage_counts_per_pool_and_family(allocator: Allocator) -> None:
    allocator.create_pool("default", ["10.1.0.0/24", "fd00:1::/120"], 5)
    allocator.create_pool("team", ["10.2.0.0/25"], 4)
    b, _ = allocator.claim_block("n1", "default", Family.IPV4)
    allocator.claim_block("n2", "default", Family.IPV4)
    t, _ = allocator.claim_block("n1", "team")
    allocator.record(
        "n1",
        [
            rec(usable(allocator, "default", b.cidr)[i], "default", b.cidr, owner(f"c{i}"))
            for i in range(3)
        ],
    )
    allocator.record("n1", [rec(usable(allocator, "team", t.cidr)[0], "team", t.cidr, owner("t"))])
    usage = {(u.pool, u.family): u for u in allocator.usage()}
    d4 = usage[("default", Family.IPV4)]
    # Addresses pods can get: a /24 less its network address, gateway and broadcast.
    assert (d4.blocks_held, d4.blocks_total, d4.addresses_used, d4.addresses_total) == (
        2,
        8,
        3,
        256 - 3,
    )
    d6 = usage[("default", Family.IPV6)]
    assert (d6.blocks_held, d6.addresses_used) == (0, 0)
    team = usage[("team", Family.IPV4)]
    assert (team.blocks_held, team.blocks_total, team.addresses_used, team.addresses_total) == (
        1,
        8,
        1,
        128 - 3,
    )
    assert ("team", Family.IPV6) not in usage


def test_get_pool_lists_held_blocks_per_subnet(allocator: Allocator) -> None:
    allocator.create_pool("default", ["10.1.0.0/24", "10.9.0.0/26"], 5)
    held = {allocator.claim_block(f"n{i}", "default")[0].cidr for i in range(5)}
    pool, subnets = allocator.get_pool("default")
    assert [s.total_blocks for s in subnets] == [8, 2]
    assert {b.cidr for s in subnets for b in s.held} == held
    _, only = allocator.get_pool("default", "10.9.0.0/26")
    assert [str(s.subnet) for s in only] == ["10.9.0.0/26"]
    with pytest.raises(errors.NotFound, match="not one of the pool"):
        allocator.get_pool("default", "10.7.0.0/24")


def test_claim_specific_block(allocator: Allocator, store: EtcdStore, etcd_prefix: str) -> None:
    allocator.create_pool("default", ["10.1.0.0/24"], 5)
    got = allocator.claim_specific_block("node-a", "default", "10.1.0.64/27")
    assert str(got.cidr) == "10.1.0.64/27"
    again = allocator.claim_specific_block("node-a", "default", "10.1.0.64/27")
    assert again.claim_revision == got.claim_revision
    before = snapshot(store, etcd_prefix)
    with pytest.raises(errors.AlreadyExists, match='held by node "node-a"'):
        allocator.claim_specific_block("node-b", "default", "10.1.0.64/27")
    with pytest.raises(errors.InvalidArgument, match='not a block of pool "default"'):
        allocator.claim_specific_block("node-b", "default", "10.1.0.64/26")
    with pytest.raises(errors.InvalidArgument, match='not a block of pool "default"'):
        allocator.claim_specific_block("node-b", "default", "10.2.0.64/27")
    assert snapshot(store, etcd_prefix) == before


def test_node_blocks_pages_are_read_at_the_first_pages_revision(allocator: Allocator) -> None:
    allocator.create_pool("default", ["10.1.0.0/24"], 4)
    blocks = [allocator.claim_block("node-a", "default")[0] for _ in range(3)]

    def add(block: HeldBlock, n: int) -> None:
        address = usable(allocator, "default", block.cidr)[n]
        owner = Owner("ns", f"pod-{address}", f"c-{address}", "eth0")
        request = RecordRequest.from_strings(str(address), "default", str(block.cidr), owner)
        assert allocator.record("node-a", [request])[0].outcome.value == "recorded"

    for block in blocks:
        for n in range(5):
            add(block, n)
    _, everything, _ = allocator.node_blocks("node-a", with_records=True)
    pages, token, revisions = [], "", set()
    while True:
        held, records, rev, token = allocator.node_blocks_page("node-a", True, 4, token)
        assert sum(b.used for b in held) == 15 and len(records) <= 4
        pages.append(records)
        revisions.add(rev)
        if len(pages) == 1:
            add(blocks[2], 7)  # recorded after the first page: not part of this listing
        if not token:
            break
    assert len(pages) == 4 and len(revisions) == 1
    listed = [r for page in pages for r in page]
    assert sorted(listed, key=lambda r: int(r.address)) == sorted(
        everything, key=lambda r: int(r.address)
    )
    with pytest.raises(errors.InvalidArgument, match="page token"):
        allocator.node_blocks_page("node-a", True, 4, "garbage")
    _, _, _, other = allocator.node_blocks_page("node-a", True, 4)
    with pytest.raises(errors.InvalidArgument, match="not one of this node's listing"):
        allocator.node_blocks_page("node-b", True, 4, other)
