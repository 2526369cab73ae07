"""coild following the allocator's WatchNode stream, against real allocator servers (in-process,
on loopback TCP) and a real etcd: changes made elsewhere arrive within their deadlines without
polling, a stream survives the death of its replica and resumes on the other without a snapshot
and without losing a change, a compacted history forces one clean snapshot, and a coild that
reaches no allocator fails as before and recovers by itself. No root: routes go to a recording
sink."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from coil_allocator.allocator import Allocator
from coil_allocator.etcd_store import EtcdStore
from coil_allocator.keys import Keys
from coil_allocator.servicer import serve
from coil_allocator.view import ClusterView
from coild.agent import AgentConfig, AllocateRequest, NodeAgent
from coild.allocator_client import AllocatorClient
from coild.errors import AllocatorUnavailable, NotHeld
from tests.harness.etcd import free_port
from tests.test_nodeagent import RecordingRoutes

NODE = "node-w"


def wait_for(what: str, check: Callable[[], Any], timeout: float) -> float:
    """Seconds until `check()` is truthy; fails naming `what` after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout} s")


class Replica:
    """One allocator replica: its own view and server over the shared etcd, counting RPCs."""

    def __init__(
        self,
        shared: EtcdStore,
        prefix: str,
        port: int | None = None,
        max_watchers: int = 50,
        node_ttl: int = 180,
    ) -> None:
        # Its own connections to etcd, and so its own keep-alive stream.
        store = self.store = EtcdStore(shared._config)
        self.view = ClusterView(store, Keys(prefix))
        self.view.start(wait=5)
        self.allocator = Allocator(store, prefix, view=self.view, node_ttl=node_ttl)
        self.port = port or free_port()
        self.calls: Counter[str] = Counter()
        self.dead = False
        self.server, _ = serve(
            self.allocator,
            f"127.0.0.1:{self.port}",
            observe=self._observe,
            max_watchers=max_watchers,
            insecure=True,  # loopback in a test: callers are operators
        )

    def _observe(self, method: str, code: str, seconds: float) -> None:
        self.calls[method] += 1

    def kill(self) -> None:
        """Stop at once: open streams break, as when the process dies."""
        if self.dead:
            return
        self.dead = True
        self.server.stop(grace=None).wait()
        self.view.stop()
        self.store.close()


@pytest.fixture
def replicas(store: EtcdStore, etcd_prefix: str) -> Iterator[list[Replica]]:
    made: list[Replica] = []
    yield made
    for r in made:
        r.kill()


@pytest.fixture
def agents() -> Iterator[list[tuple[NodeAgent, AllocatorClient]]]:
    made: list[tuple[NodeAgent, AllocatorClient]] = []
    yield made
    for agent, client in reversed(made):
        agent.stop()
        client.close()


def start_agent(
    made: list[tuple[NodeAgent, AllocatorClient]],
    target: str,
    stream: bool = True,
    **config: Any,
) -> NodeAgent:
    client = AllocatorClient(target, timeout=config.pop("timeout", 2.0))
    settings: dict[str, Any] = {"release_grace": 0.0, "maintain_interval": 3600.0, **config}
    agent = NodeAgent(
        AgentConfig(node=NODE, **settings),
        client,
        RecordingRoutes(),
    )
    made.append((agent, client))
    agent.start(wait=False)
    assert agent.ready.wait(30), "coild did not become ready within 30 s"
    if stream:
        wait_for("the WatchNode stream", lambda: agent.follower and agent.follower.connected(), 5)
    return agent


def pod(cid: str, namespace: str = "default") -> AllocateRequest:
    return AllocateRequest(cid, "eth0", namespace, f"pod-{cid}")


def test_changes_made_elsewhere_reach_coild_in_time_without_polling(
    store: EtcdStore, etcd_prefix: str, replicas: list[Replica], agents: list[Any]
) -> None:
    replicas.append(Replica(store, etcd_prefix))
    r = replicas[0]
    r.allocator.create_pool("default", ["10.40.0.0/24"], 3)
    agent = start_agent(agents, f"127.0.0.1:{r.port}")
    kept = agent.allocate(pod("kept"))[0].address
    freed = agent.allocate(pod("freed"))[0].address
    before = Counter(r.calls)
    # A pool created by an operator: within 2 s.
    r.allocator.create_pool("team", ["10.41.0.0/24"], 3)
    took = wait_for("the new pool in coild", lambda: "team" in agent.pools(), 2)
    # `coilctl address free`: within 5 s the address is forgotten, and handed out again later.
    r.allocator.free_address(str(freed))

    def forgotten() -> bool:
        try:
            agent.check("freed", "eth0")
            return False
        except NotHeld:
            return True

    wait_for("the freed address forgotten", forgotten, 5)
    assert agent.check("kept", "eth0")[0].address == kept
    # `coilctl node release --force`: within 5 s coild drops its blocks and their routes.
    held = {b.cidr for b in agent.state.blocks}
    assert held
    r.allocator.release_node(NODE, force=True)
    wait_for("the released blocks dropped", lambda: not agent.state.blocks, 5)
    agent.sync_routes()
    routes = agent.routes
    assert isinstance(routes, RecordingRoutes) and routes.desired == set()
    # None of it was asked for: no pool list, no node listing.
    calls = r.calls - before
    assert calls["ListPools"] == 0 and calls["ListNodeBlocks"] == 0, calls
    assert took < 2


def test_the_safety_net_is_one_snapshot_on_the_stream(
    store: EtcdStore, etcd_prefix: str, replicas: list[Replica], agents: list[Any]
) -> None:
    """With a stream open, the periodic safety net is a fresh snapshot on the stream: it takes
    in what the stream does not carry (a block claimed for this node whose answer coild never
    saw), and it asks for no pool list, no node listing and no report."""
    replicas.append(Replica(store, etcd_prefix))
    r = replicas[0]
    r.allocator.create_pool("default", ["10.42.0.0/24"], 3)
    agent = start_agent(
        agents,
        f"127.0.0.1:{r.port}",
        reconcile_interval=1.0,
        report_interval=1.0,
        maintain_interval=0.2,
        release_grace=3600.0,
    )
    agent.allocate(pod("first"))
    before = Counter(r.calls)
    # A claim whose answer was lost: held in etcd for this node, unknown to coild. The stream
    # does not hand coild blocks it did not claim itself; only a full listing does.
    lost = r.allocator.claim_specific_block(NODE, "default", "10.42.0.200/29").cidr
    took = wait_for(
        "the block taken in by the safety net",
        lambda: lost in {b.cidr for b in agent.state.blocks},
        5,
    )
    calls = r.calls - before
    assert calls["WatchNode"] >= 1, calls  # the stream that was ended for a fresh snapshot
    assert calls["ListPools"] == 0 and calls["ListNodeBlocks"] == 0, calls
    assert took < 5
    # The new block's route changed what the node exports: that is reported once. Then three
    # safety-net periods: snapshots only, and no periodic report (the lease rides on the
    # stream).
    wait_for(
        "the new route reported", lambda: agent._reported and not agent._report_due.is_set(), 5
    )
    time.sleep(0.5)
    before = Counter(r.calls)
    snapshots = agent.follower.snapshots if agent.follower else 0
    time.sleep(3.2)
    calls = r.calls - before
    assert calls["WatchNode"] >= 2, calls
    assert calls["ListPools"] == calls["ListNodeBlocks"] == calls["ReportNode"] == 0, calls
    assert agent.follower is not None and agent.follower.snapshots >= snapshots + 2


def test_coild_starts_from_the_streams_first_snapshot(
    store: EtcdStore, etcd_prefix: str, replicas: list[Replica], agents: list[Any]
) -> None:
    """A (re)starting coild makes two calls: a report for its lease and one WatchNode stream,
    whose first snapshot (every pool, the node's blocks and records) is the state it starts
    from. It lists nothing, and what it handed out before it restarted stays taken."""
    replicas.append(Replica(store, etcd_prefix))
    r = replicas[0]
    r.allocator.create_pool("default", ["10.42.0.0/24"], 3)
    target = f"127.0.0.1:{r.port}"
    first = start_agent(agents, target)
    given = {first.allocate(pod(f"p{i}"))[0].address for i in range(3)}
    blocks = {b.cidr for b in first.state.blocks}
    first.stop()
    before = Counter(r.calls)
    second = start_agent(agents, target)
    calls = r.calls - before
    # (A stream is counted when it ends: this one is still open.)
    assert calls["ReportNode"] == 1 and calls["ListPools"] == calls["ListNodeBlocks"] == 0, calls
    assert second.follower is not None
    assert second.follower.streams == second.follower.snapshots == 1
    assert r.view.subscribers() == 1
    assert second.pools() == ["default"]
    assert {b.cidr for b in second.state.blocks} == blocks
    # The same pod's ADD again gets its own address back; a new pod never one of the three.
    assert second.allocate(pod("p0"))[0].address in given
    assert second.allocate(pod("new"))[0].address not in given


def test_without_a_stream_coild_starts_from_a_listing(
    store: EtcdStore,
    etcd_prefix: str,
    replicas: list[Replica],
    agents: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the allocator serves no stream (here: it refuses every watcher), a starting coild
    does not wait for a snapshot for ever: after START_SNAPSHOT_WAIT it lists the pools and its
    blocks and records, becomes ready, and what it handed out before stays taken."""
    import coild.agent

    monkeypatch.setattr(coild.agent, "START_SNAPSHOT_WAIT", 1.0)
    replicas.append(Replica(store, etcd_prefix))
    r = replicas[0]
    r.allocator.create_pool("default", ["10.42.0.0/24"], 3)
    first = start_agent(agents, f"127.0.0.1:{r.port}")
    given = first.allocate(pod("p0"))[0].address
    first.stop()
    r.kill()
    refusing = Replica(store, etcd_prefix, max_watchers=0)
    replicas.append(refusing)
    started = time.monotonic()
    second = start_agent(agents, f"127.0.0.1:{refusing.port}", stream=False)
    assert time.monotonic() - started < 10
    assert refusing.calls["ListPools"] >= 1 and refusing.calls["ListNodeBlocks"] >= 1
    # The attachment made before the restart came back with the listing (not only its address).
    assert ("p0", "eth0") in second.state.attachments
    assert second.allocate(pod("p0"))[0].address == given
    assert second.allocate(pod("new"))[0].address != given


def test_without_a_stream_the_lease_lives_by_reports(
    store: EtcdStore, etcd_prefix: str, replicas: list[Replica], agents: list[Any]
) -> None:
    """An allocator that refuses every stream leaves coild following but never streaming: its
    node must still look alive (reports at least every third of the lease's TTL), or a plain
    `coilctl node release` would free the blocks its pods use."""
    refusing = Replica(store, etcd_prefix, max_watchers=0, node_ttl=3)
    replicas.append(refusing)
    refusing.allocator.create_pool("default", ["10.42.0.0/24"], 3)
    import coild.agent

    wait, coild.agent.START_SNAPSHOT_WAIT = coild.agent.START_SNAPSHOT_WAIT, 0.5
    try:
        agent = start_agent(
            agents, f"127.0.0.1:{refusing.port}", stream=False, maintain_interval=0.2
        )
    finally:
        coild.agent.START_SNAPSHOT_WAIT = wait
    agent.allocate(pod("p0"))
    alive = refusing.allocator.keys.node_alive(NODE)
    for _ in range(4):  # four TTLs
        time.sleep(3)
        assert store.get(alive) is not None, "the node's lease expired while coild ran"


def test_the_stream_survives_its_replica_and_resumes_on_the_other(
    store: EtcdStore, etcd_prefix: str, replicas: list[Replica], agents: list[Any]
) -> None:
    a, b = Replica(store, etcd_prefix), Replica(store, etcd_prefix)
    replicas += [a, b]
    a.allocator.create_pool("default", ["10.42.0.0/24"], 3)
    # One address with both replicas, as a Service would give; the channel uses the first that
    # answers and moves on when it dies.
    agent = start_agent(agents, f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}")
    assert a.view.subscribers() == 1 and b.view.subscribers() == 0
    gone = [agent.allocate(pod(f"p{i}"))[0].address for i in range(3)]
    lease = agent._lease_id
    follower = agent.follower
    assert follower is not None and follower.snapshots == 1
    a.kill()
    # Changes while the stream moves: none may be lost.
    for address in gone:
        b.allocator.free_address(str(address))
    b.allocator.create_pool("moved", ["10.43.0.0/24"], 3)
    wait_for("the stream on the other replica", lambda: b.view.subscribers() == 1, 10)
    wait_for("the pool created meanwhile", lambda: "moved" in agent.pools(), 5)

    def all_forgotten() -> bool:
        with agent._lock:
            return not any(k[0].startswith("p") for k in agent.state.attachments)

    wait_for("every freed address", all_forgotten, 5)
    assert follower.snapshots == 1, "resumed from its revision, not from a snapshot"
    assert follower.streams >= 2
    # The lease moved with the stream: replica b keeps it alive now, coild did not re-report.
    assert agent._lease_id == lease
    assert b.store.lease_held(lease)
    assert store.keep_alive(lease) > 0


def test_a_fresh_lease_is_followed_at_once_on_either_replica(
    store: EtcdStore, etcd_prefix: str, replicas: list[Replica]
) -> None:
    import grpc

    from coil.v1 import allocator_pb2 as apb
    from coil.v1 import allocator_pb2_grpc as apb_grpc

    a, b = Replica(store, etcd_prefix), Replica(store, etcd_prefix)
    replicas += [a, b]
    with (
        grpc.insecure_channel(f"127.0.0.1:{a.port}") as ca,
        grpc.insecure_channel(f"127.0.0.1:{b.port}") as cb,
    ):
        on = {
            "a": (a, apb_grpc.AllocatorServiceStub(ca)),
            "b": (b, apb_grpc.AllocatorServiceStub(cb)),
        }
        for i, there in enumerate("ababab"):
            # A node reports to replica a (a new lease, on its alive key) and follows with
            # it at once, on a or on b (whose view may not have seen the report yet).
            node = f"fresh-{i}"
            lease = on["a"][1].ReportNode(apb.ReportNodeRequest(node=node, table=119), timeout=5)
            replica, stub = on[there]
            stream = stub.WatchNode(
                apb.WatchNodeRequest(node=node, lease_id=lease.lease_id), timeout=10
            )
            first = next(stream)
            assert first.snapshot and not first.lease_lost, (node, there)
            assert replica.store.lease_held(lease.lease_id), (node, there)
            stream.cancel()


def test_a_compacted_revision_forces_one_clean_snapshot(
    store: EtcdStore, etcd_prefix: str, replicas: list[Replica], agents: list[Any]
) -> None:
    port = free_port()
    first = Replica(store, etcd_prefix, port)
    replicas.append(first)
    first.allocator.create_pool("default", ["10.44.0.0/24"], 3)
    agent = start_agent(agents, f"127.0.0.1:{port}")
    freed = agent.allocate(pod("freed"))[0].address
    kept = agent.allocate(pod("kept"))[0].address
    follower = agent.follower
    assert follower is not None
    revision = follower.revision
    first.kill()
    # While coild follows nothing: changes, then etcd forgets the history since its revision.
    allocator = Allocator(store, etcd_prefix)
    allocator.free_address(str(freed))
    allocator.create_pool("later", ["10.45.0.0/24"], 3)
    store.compact(store.status().revision)
    assert store.status().revision > revision
    replicas.append(Replica(store, etcd_prefix, port))
    wait_for("a snapshot", lambda: follower.snapshots == 2, 10)
    assert "later" in agent.pools()
    with pytest.raises(NotHeld):
        agent.check("freed", "eth0")
    assert agent.check("kept", "eth0")[0].address == kept
    assert follower.revision > revision


def test_without_an_allocator_add_fails_fast_and_coild_recovers_by_itself(
    store: EtcdStore, etcd_prefix: str, replicas: list[Replica], agents: list[Any]
) -> None:
    port = free_port()
    replicas.append(Replica(store, etcd_prefix, port))
    replicas[0].allocator.create_pool("default", ["10.46.0.0/24"], 3)
    agent = start_agent(agents, f"127.0.0.1:{port}", timeout=5.0)
    block = next(iter(agent.state.blocks), None)
    assert block is None  # nothing claimed yet: the first ADD must reach the allocator
    replicas.pop().kill()
    started = time.monotonic()
    with pytest.raises(AllocatorUnavailable):
        agent.allocate(pod("c1"))
    assert time.monotonic() - started < 5.5
    wait_for("readiness to say the allocator is unreachable", lambda: not agent.allocator_ok, 8)
    replicas.append(Replica(store, etcd_prefix, port))
    wait_for("readiness back", lambda: agent.allocator_ok, 10)
    address = agent.allocate(pod("c1"))[0].address
    assert address in ipaddress.ip_network("10.46.0.0/24")


def test_concurrent_pods_and_their_own_releases_never_free_a_live_address(
    store: EtcdStore, etcd_prefix: str, replicas: list[Replica], agents: list[Any]
) -> None:
    """coild's own releases come back on the stream; they must not free an address that was
    handed to another pod meanwhile."""
    replicas.append(Replica(store, etcd_prefix))
    r = replicas[0]
    r.allocator.create_pool("default", ["10.47.0.0/26"], 3)
    agent = start_agent(agents, f"127.0.0.1:{r.port}")
    errors: list[BaseException] = []

    def churn(worker: int) -> None:
        try:
            for i in range(15):
                cid = f"w{worker}-{i}"
                agent.allocate(pod(cid))
                agent.release(cid, "eth0")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    live = {f"live{i}": agent.allocate(pod(f"live{i}"))[0].address for i in range(4)}
    threads = [threading.Thread(target=churn, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    time.sleep(1)  # let the last removals arrive
    for cid, address in live.items():
        assert agent.check(cid, "eth0")[0].address == address
    records = {str(kv.key.rsplit("/", 1)[1]) for kv in store.range(f"{etcd_prefix}records/")[0]}
    assert records == {str(a) for a in live.values()}


def test_open_streams_hold_no_thread_and_all_get_a_pool_change(
    store: EtcdStore, etcd_prefix: str, replicas: list[Replica]
) -> None:
    """Streams wait on the server's event loop: two hundred open streams add no thread per
    stream to the replica, every one of them gets a new pool, and each one's end, when the
    client cancels it, reaches the server (which lets go of its subscription there)."""
    import grpc

    from coil.v1 import allocator_pb2 as pb
    from coil.v1 import allocator_pb2_grpc as pb_grpc

    r = Replica(store, etcd_prefix, max_watchers=500)
    replicas.append(r)
    channel = grpc.insecure_channel(f"127.0.0.1:{r.port}")
    stub = pb_grpc.AllocatorServiceStub(channel)
    streams: list[Any] = []
    try:
        # Warm the server: its thread pools start what they need with the first calls.
        warm = stub.WatchNode(pb.WatchNodeRequest(node="node-warm"), timeout=30)
        assert next(warm).snapshot
        warm.cancel()
        before = threading.active_count()
        for i in range(200):
            s = stub.WatchNode(pb.WatchNodeRequest(node=f"node-{i}"), timeout=60)
            assert next(s).snapshot
            streams.append(s)
        grown = threading.active_count() - before
        assert grown < 20, f"{grown} more threads with 200 streams open"
        r.allocator.create_pool("default", ["10.77.0.0/16"], 4)
        for s in streams:
            change = next(s)
            assert [p.name for p in change.pools] == ["default"]
    finally:
        for s in streams:
            s.cancel()
        channel.close()
    ended = r.calls  # the server observes each stream when it ends
    wait_for("every stream to end on the server", lambda: ended["WatchNode"] >= 201, 10)
