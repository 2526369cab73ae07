"""The allocator's view, fed by an etcd watch: pools from memory, each node's changes to the node
that follows them, resume from a revision, and a clean resync when etcd compacted the view's
revision. Real etcd, real allocator transactions."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from coil_allocator.allocator import Allocator
from coil_allocator.etcd_store import EtcdConfig, EtcdStore
from coil_allocator.keys import Keys
from coil_allocator.view import ClusterView, NodeChange, Resync, Subscription
from coil_core.model import Owner, RecordRequest
from tests.harness.etcd import start_etcd


@pytest.fixture
def view(store: EtcdStore, etcd_prefix: str) -> Iterator[ClusterView]:
    v = ClusterView(store, Keys(etcd_prefix))
    v.start(wait=5)
    try:
        yield v
    finally:
        v.stop()


def _drain(sub: Subscription, until: int, timeout: float = 5) -> list[NodeChange]:
    """Changes of `sub` until one at `until` or later arrived."""
    out: list[NodeChange] = []
    while not out or out[-1].revision < until:
        item = sub.get(timeout)
        assert isinstance(item, NodeChange), f"got {item!r} after {out}"
        out.append(item)
    return out


def _record(allocator: Allocator, node: str, block: ipaddress.IPv4Network, i: int) -> str:
    address = block.network_address + 2 + i
    (result,) = allocator.record(
        node, [RecordRequest(address, "default", block, Owner("ns", f"p{i}", f"c{i}", "eth0"))]
    )
    assert result.outcome.name == "RECORDED", result
    return str(address)


def test_pools_come_from_the_watch(allocator: Allocator, view: ClusterView) -> None:
    assert view.pools() == []
    allocator.create_pool("default", ["10.9.0.0/24"], 4)
    assert view.wait_for(allocator.store.status().revision, 5)
    assert [p.name for p in view.pools()] == ["default"]
    allocator.add_subnet("default", "10.9.1.0/24")
    allocator.create_pool("other", ["10.8.0.0/24"], 4)
    allocator.delete_pool("other")
    assert view.wait_for(allocator.store.status().revision, 5)
    assert [(p.name, [str(s) for s in p.subnets]) for p in view.pools()] == [
        ("default", ["10.9.0.0/24", "10.9.1.0/24"])
    ]


def test_a_node_gets_its_own_changes_and_every_pool_change(
    allocator: Allocator, view: ClusterView
) -> None:
    allocator.create_pool("default", ["10.9.0.0/24"], 4)
    start = allocator.store.status().revision
    assert view.wait_for(start, 5)
    got = view.subscribe("node-a", start)
    assert got is not None
    sub, pools = got
    assert [p.name for p in pools] == ["default"]
    try:
        mine, _ = allocator.claim_block("node-a", "default")
        allocator.claim_block("node-b", "default")  # not node-a's business
        address = _record(allocator, "node-a", mine.cidr, 0)
        _record(allocator, "node-a", mine.cidr, 1)
        allocator.free_address(address)  # an operator's `address free`
        allocator.create_pool("late", ["10.7.0.0/24"], 4)
        blocks, removed = allocator.release_node("node-a", force=True)
        changes = _drain(sub, allocator.store.status().revision)
    finally:
        sub.close()
    claimed = [b.cidr for c in changes for b in c.blocks]
    assert claimed == [mine.cidr]
    recorded = [str(r.address) for c in changes for r in c.records]
    assert recorded == [address, str(mine.cidr.network_address + 3)]
    freed = [(str(r.address), r.owner.container_id) for c in changes for r in c.released_records]
    assert freed == [(address, "c0"), (str(mine.cidr.network_address + 3), "c1")]
    released = [b.cidr for c in changes for b in c.released_blocks]
    assert released == [mine.cidr] and [b.cidr for b in blocks] == [mine.cidr]
    assert [p.name for c in changes for p in c.pools] == ["late"]
    assert all(c.revision > start for c in changes)


def test_a_subscriber_resumes_from_its_revision(allocator: Allocator, view: ClusterView) -> None:
    allocator.create_pool("default", ["10.9.0.0/24"], 4)
    block, _ = allocator.claim_block("node-a", "default")
    seen = allocator.store.status().revision
    # Changes while node-a follows nothing (its stream broke).
    first = _record(allocator, "node-a", block.cidr, 0)
    second = _record(allocator, "node-a", block.cidr, 1)
    allocator.free_address(first)
    assert view.wait_for(allocator.store.status().revision, 5)
    got = view.subscribe("node-a", seen)
    assert got is not None
    sub, _ = got
    try:
        changes = _drain(sub, allocator.store.status().revision)
    finally:
        sub.close()
    assert [str(r.address) for c in changes for r in c.records] == [first, second]
    assert [str(r.address) for c in changes for r in c.released_records] == [first]
    # A revision from before the view's history cannot be resumed: snapshot instead.
    assert view.subscribe("node-a", 1) is None


def test_a_compacted_revision_makes_the_view_resync_and_its_followers_start_over() -> None:
    server = start_etcd("coil-view")
    store = EtcdStore(EtcdConfig((server.endpoint,), timeout=3))
    allocator = Allocator(store, "/coil/")
    view = ClusterView(store, Keys("/coil/"))
    try:
        allocator.create_pool("default", ["10.9.0.0/24"], 4)
        view.load()
        loaded = view.revision
        got = view.subscribe("node-a", loaded)
        assert got is not None
        sub, _ = got
        # While the view is away, pools change and etcd forgets the history in between.
        allocator.create_pool("later", ["10.6.0.0/24"], 4)
        allocator.delete_pool("default")
        store.compact(store.status().revision)
        view.start()
        assert isinstance(sub.get(10), Resync)
        assert view.relists == 1
        assert [p.name for p in view.pools()] == ["later"]
        # After the resync it follows again from the fresh list.
        got = view.subscribe("node-a", view.revision)
        assert got is not None
        sub, _ = got
        allocator.create_pool("newest", ["10.5.0.0/24"], 4)
        (change,) = _drain(sub, store.status().revision)
        assert [p.name for p in change.pools] == ["newest"]
        sub.close()
    finally:
        view.stop()
        store.close()
        server.stop()
