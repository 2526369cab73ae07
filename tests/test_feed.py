"""A node's feed (what WatchNode streams) on a real etcd: snapshot then changes, resume without a
snapshot, the node's lease kept alive while it follows (only its own: not another node's), and
`lease_lost` when its alive key goes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from coil_allocator.allocator import Allocator
from coil_allocator.etcd_store import EtcdStore
from coil_allocator.feed import Follow, NodeFeed
from coil_allocator.keys import Keys
from coil_allocator.view import ClusterView
from coil_core.model import NodeChange, Owner, RecordRequest

TTL = 3


@pytest.fixture
def short_lived(store: EtcdStore, etcd_prefix: str) -> Allocator:
    return Allocator(store, etcd_prefix, node_ttl=TTL)


@pytest.fixture
def feed(store: EtcdStore, etcd_prefix: str, short_lived: Allocator) -> Iterator[NodeFeed]:
    view = ClusterView(store, Keys(etcd_prefix))
    view.start(wait=5)
    try:
        yield NodeFeed(
            view, store, short_lived.nodes.node_snapshot, TTL, short_lived.nodes.alive_lease
        )
    finally:
        view.stop()


class Reader:
    """Iterates a Follow in a thread, keeping the messages."""

    def __init__(self, follow: Follow) -> None:
        self.follow = follow
        self.messages: list[NodeChange] = []
        self.error: Exception | None = None
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for m in self.follow:
                self.messages.append(m)
        except Exception as e:
            self.error = e
        finally:
            self.done.set()

    def wait(self, predicate, timeout: float = 5) -> list[NodeChange]:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not predicate(self.messages):
            time.sleep(0.02)
        assert predicate(self.messages), (self.messages, self.error)
        return self.messages

    def close(self) -> None:
        self.follow.cancel()
        assert self.done.wait(5)


def test_a_new_follower_gets_a_snapshot_then_each_change(
    short_lived: Allocator, feed: NodeFeed
) -> None:
    a = short_lived
    a.create_pool("default", ["10.9.0.0/24"], 4)
    block, _ = a.claim_block("node-a", "default")
    owner = Owner("ns", "p", "c1", "eth0")
    a.record(
        "node-a", [RecordRequest(block.cidr.network_address + 2, "default", block.cidr, owner)]
    )
    r = Reader(feed.follow("node-a", 0, 0))
    try:
        (snap,) = r.wait(lambda m: len(m) == 1)
        assert snap.snapshot
        assert [p.name for p in snap.pools] == ["default"]
        assert [b.cidr for b in snap.blocks] == [block.cidr]
        assert [x.owner.container_id for x in snap.records] == ["c1"]
        a.create_pool("second", ["10.8.0.0/24"], 4)
        a.free_address(str(block.cidr.network_address + 2))
        msgs = r.wait(lambda m: len(m) >= 3)
        assert not any(m.snapshot for m in msgs[1:])
        assert [p.name for m in msgs[1:] for p in m.pools] == ["second"]
        assert [x.owner.container_id for m in msgs[1:] for x in m.released_records] == ["c1"]
        assert msgs[-1].revision == a.store.status().revision
    finally:
        r.close()


def test_a_follower_resumes_without_a_snapshot(short_lived: Allocator, feed: NodeFeed) -> None:
    a = short_lived
    a.create_pool("default", ["10.9.0.0/24"], 4)
    r = Reader(feed.follow("node-a", 0, 0))
    (snap,) = r.wait(lambda m: len(m) == 1)
    r.close()
    block, _ = a.claim_block("node-a", "default")  # while it is away
    r = Reader(feed.follow("node-a", snap.revision, 0))
    try:
        hello, change = r.wait(lambda m: len(m) == 2)
        # First word: up to date from the revision named, no snapshot; then what was missed.
        assert not hello and hello.revision == snap.revision
        assert not change.snapshot
        assert [b.cidr for b in change.blocks] == [block.cidr]
    finally:
        r.close()


def test_the_lease_lives_while_the_node_follows_and_lapses_after(
    short_lived: Allocator, feed: NodeFeed, store: EtcdStore
) -> None:
    a = short_lived
    lease, _ = a.report_node("node-a", 0, [], 119)
    r = Reader(feed.follow("node-a", 0, lease))
    try:
        r.wait(lambda m: len(m) == 1)
        time.sleep(TTL * 2 + 1)  # no report meanwhile
        assert store.get(a.keys.node_alive("node-a")) is not None
    finally:
        r.close()
    time.sleep(TTL + 2)
    assert store.get(a.keys.node_alive("node-a")) is None


def test_a_follower_hears_that_its_lease_is_gone(short_lived: Allocator, feed: NodeFeed) -> None:
    a = short_lived
    a.create_pool("default", ["10.9.0.0/24"], 4)
    a.claim_block("node-a", "default")
    lease, _ = a.report_node("node-a", 0, [], 119)
    # A lease that is not the node's (expired, or made up) is refused at once.
    stale = Reader(feed.follow("node-a", 0, lease + 12345))
    (msg,) = stale.wait(lambda m: len(m) == 1)
    assert msg.lease_lost and stale.done.wait(2)
    r = Reader(feed.follow("node-a", 0, lease))
    r.wait(lambda m: len(m) == 1)
    a.release_node("node-a", force=True)  # an operator's `node release --force`
    msgs = r.wait(lambda m: any(x.lease_lost for x in m))
    assert r.done.wait(2)
    assert [b.cidr for m in msgs for b in m.released_blocks]


def test_watch_node_over_grpc_streams_snapshot_then_changes(
    allocator: Allocator, allocator_addr: str
) -> None:
    import grpc

    from coil.v1 import allocator_pb2 as apb
    from coil.v1 import allocator_pb2_grpc as apb_grpc

    allocator.create_pool("default", ["10.9.0.0/24"], 4)
    with grpc.insecure_channel(allocator_addr) as channel:
        stub = apb_grpc.AllocatorServiceStub(channel)
        stream = stub.WatchNode(apb.WatchNodeRequest(node="node-a"), timeout=20)
        first = next(stream)
        assert first.snapshot and [p.name for p in first.pools] == ["default"]
        allocator.create_pool("second", ["10.8.0.0/24"], 4)
        change = next(stream)
        assert not change.snapshot and [p.name for p in change.pools] == ["second"]
        assert change.revision > first.revision
        stream.cancel()
        bad = stub.WatchNode(apb.WatchNodeRequest(node="Bad_Name"), timeout=5)
        with pytest.raises(grpc.RpcError) as e:
            next(bad)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Bad_Name" in (e.value.details() or "")


def test_a_report_writes_only_what_changed(allocator: Allocator, store: EtcdStore) -> None:
    lease, _ = allocator.report_node("node-a", 0, ["10.9.0.0/28"], 119)
    settled = store.status().revision
    # Right away, again and again (the view may not have seen the first write yet): nothing.
    for _ in range(5):
        assert allocator.report_node("node-a", lease, ["10.9.0.0/28"], 119)[0] == lease
    assert store.status().revision == settled
    # New routes: one write, same lease.
    assert allocator.report_node("node-a", lease, ["10.9.0.0/28", "10.9.0.16/28"], 119)[0] == lease
    assert store.status().revision == settled + 1
    status = store.get(allocator.keys.node_status("node-a"))
    assert status is not None and b"10.9.0.16/28" in status.value
    # A first report while the node is alive (coild restarted, or the answer was lost): the
    # same lease, nothing written.
    assert allocator.report_node("node-a", 0, ["10.9.0.0/28", "10.9.0.16/28"], 119)[0] == lease
    assert store.status().revision == settled + 1
    # A lease that is not the node's: a new one, on the alive key.
    fresh, _ = allocator.report_node("node-a", lease + 777, ["10.9.0.0/28"], 119)
    assert fresh != lease
    alive = store.get(allocator.keys.node_alive("node-a"))
    assert alive is not None and alive.lease == fresh


@pytest.mark.parametrize("a_follows", [False, True], ids=["a-away", "a-following-here"])
def test_a_node_cannot_keep_another_nodes_lease_alive_by_following(
    short_lived: Allocator,
    feed: NodeFeed,
    store: EtcdStore,
    a_follows: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = short_lived
    la, _ = a.report_node("node-a", 0, [], 119)
    lb, _ = a.report_node("node-b", 0, [], 119)
    assert lb != la
    if a_follows:
        # This replica keeps node-a's lease alive already, for node-a's own stream.
        ra = Reader(feed.follow("node-a", 0, la))
        ra.wait(lambda m: len(m) == 1)
        ra.close()
    gone_at = time.monotonic()  # from now on nobody honest keeps node-a's lease alive
    # node-b names node-a's lease, again each time it is told lease_lost, for longer than
    # node-a's lease may live on by itself (what is left of its TTL, and the linger).
    refused = 0
    while store.get(a.keys.node_alive("node-a")) is not None:
        assert time.monotonic() - gone_at < TTL + feed._linger + 5, "node-a stays alive"
        rb = Reader(feed.follow("node-b", 0, la))
        try:
            (msg,) = rb.wait(lambda m: len(m) >= 1)
            assert msg.lease_lost and rb.done.wait(2), msg
        finally:
            rb.close()
        refused += 1
        time.sleep(0.2)
    assert refused >= 1
    assert not store.lease_held(la)  # node-b's streams did not take it over
    assert any(
        'watch node "node-b"' in r.getMessage() and str(la) in r.getMessage()
        for r in caplog.records
    )


def test_a_fresh_lease_is_taken_even_before_the_view_has_seen_it(
    store: EtcdStore, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two replicas on one etcd whose views are stopped: neither sees a report it did not
    # answer itself, as a view just behind it would (its watch catches up in milliseconds).
    replicas = []
    for _ in range(2):
        view = ClusterView(store, Keys(etcd_prefix))
        view.start(wait=5)
        view.stop()
        assert view.current
        a = Allocator(store, etcd_prefix, view=view, node_ttl=TTL)
        replicas.append((a, NodeFeed(view, store, a.nodes.node_snapshot, TTL, a.nodes.alive_lease)))
    (one, feed_one), (_, feed_two) = replicas
    reads: list[str] = []
    get = store.get

    def counted(key: str):  # type: ignore[no-untyped-def]
        if key.endswith("/alive"):
            reads.append(key)
        return get(key)

    monkeypatch.setattr(store, "get", counted)
    for node, feed in (("node-a", feed_one), ("node-c", feed_two)):
        # The node reports to replica one and at once follows, with its new lease, on replica
        # one (it wrote the alive key: it knows without reading) or two (one read of the key).
        lease, _ = one.report_node(node, 0, [], 119)
        r = Reader(feed.follow(node, 0, lease))
        try:
            (snap,) = r.wait(lambda m: len(m) == 1)
            assert snap.snapshot and not snap.lease_lost
            assert store.lease_held(lease)  # kept alive while it follows
        finally:
            r.close()
    assert reads == [one.keys.node_alive("node-c")]


def test_a_follow_closed_while_it_starts_lets_go_of_the_lease_and_subscription(
    short_lived: Allocator, store: EtcdStore, etcd_prefix: str
) -> None:
    """A stream whose client goes away while its snapshot is still being read (the server runs
    that step in a thread, and cannot stop it) keeps neither a subscription nor the node's
    lease once the step ends."""
    a = short_lived
    view = ClusterView(store, Keys(etcd_prefix))
    view.start(wait=5)
    reading, go_on = threading.Event(), threading.Event()

    def slow_snapshot(node: str):  # type: ignore[no-untyped-def]
        reading.set()
        assert go_on.wait(10)
        return a.nodes.node_snapshot(node)

    feed = NodeFeed(view, store, slow_snapshot, TTL, a.nodes.alive_lease)
    try:
        lease, _ = a.report_node("node-a", 0, [], 119)
        follow = feed.follow("node-a", 0, lease)
        answers: list[object] = []
        starting = threading.Thread(target=lambda: answers.append(follow.start()))
        starting.start()
        assert reading.wait(5)
        assert store.lease_held(lease)  # taken over while the stream starts
        follow.close()  # the client went away
        go_on.set()
        starting.join(10)
        assert answers == [None]
        assert view.subscribers() == 0
        deadline = time.monotonic() + 5
        while store.lease_held(lease) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not store.lease_held(lease), "the lease is still kept alive for a closed stream"
    finally:
        go_on.set()
        view.stop()
