"""The allocator's view, fed by an etcd watch: pools from memory, each node's changes to the node
that follows them, resume from a revision, and a clean resync when etcd compacted the view's
revision. Real etcd, real allocator transactions."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator
from typing import Any

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


def test_a_pool_change_reaches_every_reader_on_a_loop_in_one_wake_up_and_in_order(
    allocator: Allocator, view: ClusterView
) -> None:
    """Streams read their subscriptions on the server's event loop: a pool change for ten
    thousand of them must not wake the loop once per stream (each wake-up is a system call
    and a hand-over of the interpreter lock). And a read that gives up (its stream went away
    mid-wait) must not swallow what comes next."""
    allocator.create_pool("default", ["10.9.0.0/24"], 4)
    start = allocator.store.status().revision
    assert view.wait_for(start, 5)
    loop = asyncio.new_event_loop()
    wake_ups = 0
    threadsafe = loop.call_soon_threadsafe

    def counted(callback: Any, *args: Any) -> Any:
        nonlocal wake_ups
        wake_ups += 1
        return threadsafe(callback, *args)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign,assignment]
    subs = []
    try:
        for i in range(200):
            got = view.subscribe(f"node-{i}", start, loop)
            assert got is not None
            subs.append(got[0])

        async def read_all() -> list[list[str]]:
            # One reader gives up waiting before anything comes, then reads again.
            waiting = asyncio.ensure_future(subs[0].get_async())
            await asyncio.sleep(0.05)
            waiting.cancel()
            before = wake_ups
            allocator.create_pool("a", ["10.8.0.0/24"], 4)
            allocator.create_pool("b", ["10.7.0.0/24"], 4)
            seen: list[list[str]] = []
            for sub in subs:
                names = []
                for _ in range(2):
                    item = await asyncio.wait_for(sub.get_async(), 5)
                    assert isinstance(item, NodeChange), item
                    names += [p.name for p in item.pools]
                seen.append(names)
            assert wake_ups - before == 2, "one wake-up of the loop for each pool change"
            return seen

        seen = loop.run_until_complete(read_all())
    finally:
        for sub in subs:
            sub.close()
        loop.close()
    assert seen == [["a", "b"]] * len(subs)
