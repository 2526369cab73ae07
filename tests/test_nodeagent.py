"""The node agent (coild) against a real allocator over gRPC and a real etcd: what pods get, what
ends up recorded, blocks claimed and given back, restarts, half failures and allocator outages.

Every assertion about durable effects reads the allocator's state in etcd (the `allocator`
fixture), not the agent's memory. No root: routes go to a recording sink.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from coil.v1 import nodeagent_pb2 as pb
from coil.v1 import nodeagent_pb2_grpc as pb_grpc
from coil_allocator.allocator import Allocator
from coil_allocator.servicer import serve as serve_allocator
from coil_core.blocks import Address, Network
from coil_core.model import Family, Owner, RecordOutcome, RecordRequest
from coil_grpc.status import status_of as status_of_error
from coild.agent import AgentConfig, AllocateRequest, NodeAgent, NoEvents, PodAddress
from coild.allocator_client import AllocatorClient
from coild.errors import (
    AddressTaken,
    AllocatorUnavailable,
    Exhausted,
    InvalidRequest,
    NoPool,
    NotHeld,
    RouteError,
    RoutesNotReady,
)
from coild.server import serve as serve_agent
from tests.conftest import snapshot

NODE = "node-a"
OTHER = "node-b"


class RecordingRoutes:
    """A RouteSink that keeps the last desired set instead of touching the kernel."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._desired: set[Network] = set()
        self.syncs = 0

    def sync(self, desired: set[Network]) -> None:
        with self._lock:
            self._desired = set(desired)
            self.syncs += 1

    @property
    def desired(self) -> set[Network]:
        with self._lock:
            return set(self._desired)

    def current(self) -> set[Network]:
        return self.desired


class ManualClock:
    """A monotonic clock the test moves forward by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def started_clock() -> Callable[[], float]:
    """Monotonic time counted from now: the agent's background loop then never thinks a
    maintain_interval of an hour has passed, so only the test calls `maintain()`."""
    origin = time.monotonic()
    return lambda: time.monotonic() - origin


AgentFactory = Callable[..., NodeAgent]


@pytest.fixture
def make_agent(allocator_addr: str) -> Iterator[AgentFactory]:
    """Build and start node agents; every one is stopped (and its channel closed) at the end."""
    made: list[tuple[NodeAgent, AllocatorClient]] = []

    def make(
        node: str = NODE,
        *,
        address: str = allocator_addr,
        wait: bool = True,
        clock: Callable[[], float] | None = None,
        timeout: float = 2.0,
        routes: Any = None,
        **config: Any,
    ) -> NodeAgent:
        settings: dict[str, Any] = {
            "release_grace": 0.0,
            "spare_threshold": 0.8,
            "maintain_interval": 3600.0,
        }
        settings.update(config)
        client = AllocatorClient(address, timeout=timeout)
        agent = NodeAgent(
            AgentConfig(node=node, **settings),
            client,
            routes or RecordingRoutes(),
            clock=clock or started_clock(),
        )
        made.append((agent, client))
        agent.start(wait=wait)
        return agent

    try:
        yield make
    finally:
        for agent, client in reversed(made):
            agent.stop()
            client.close()


def request(cid: str, namespace: str = "default", *requested: str, ifname: str = "eth0") -> Any:
    return AllocateRequest(
        cid, ifname, namespace, f"pod-{cid}", tuple(ipaddress.ip_address(a) for a in requested)
    )


def routes_of(agent: NodeAgent) -> set[Network]:
    sink = agent.routes
    assert isinstance(sink, RecordingRoutes)
    return sink.desired


def held_blocks(allocator: Allocator, node: str = NODE) -> set[Network]:
    blocks, _, _ = allocator.node_blocks(node)
    return {b.cidr for b in blocks}


def records_of(allocator: Allocator, node: str = NODE) -> dict[Address, Owner]:
    _, records, _ = allocator.node_blocks(node, with_records=True)
    return {r.address: r.owner for r in records}


def owner_in_etcd(allocator: Allocator, address: Address) -> Owner | None:
    info = allocator.address_info(str(address))
    return info.record.owner if info.record else None


def pod_addresses_of(block: Network, subnet: Network) -> list[Address]:
    """The addresses of a block of `subnet` that pods can get: the subnet's network address,
    gateway and (IPv4) broadcast address are never handed out."""
    reserved = {subnet.network_address, subnet.network_address + 1}
    if subnet.version == 4:
        reserved.add(subnet.broadcast_address)
    return [a for a in block if a not in reserved]


def usable(block: Network, subnet: Network) -> int:
    return len(pod_addresses_of(block, subnet))


# -- allocate -------------------------------------------------------------------------------


def test_dual_stack_allocation_is_recorded_before_the_answer(
    allocator: Allocator, make_agent: AgentFactory
) -> None:
    allocator.create_pool("default", ["10.10.0.0/16", "fd00:10::/112"], 3)
    agent = make_agent()

    got = agent.allocate(AllocateRequest("c1", "eth0", "web", "web-0"))

    assert [a.address.version for a in got] == [4, 6]
    v4, v6 = got
    assert v4.address in ipaddress.ip_network("10.10.0.0/16")
    assert (v4.prefixlen, v4.gateway, v4.pool) == (16, "10.10.0.1", "default")
    assert v6.address in ipaddress.ip_network("fd00:10::/112")
    assert (v6.prefixlen, v6.gateway, v6.pool) == (112, "fd00:10::1", "default")
    assert v4.cidr == f"{v4.address}/16"
    # Durable before the answer: both records exist in etcd with the pod's identity.
    for a in got:
        info = allocator.address_info(str(a.address))
        assert info.node == NODE
        assert info.record is not None
        assert info.record.node == NODE
        assert info.record.owner == Owner("web", "web-0", "c1", "eth0")
    assert records_of(allocator).keys() == {v4.address, v6.address}
    assert routes_of(agent) == held_blocks(allocator)
    assert len(held_blocks(allocator)) == 2


def test_repeated_allocate_returns_the_same_addresses_and_writes_nothing(
    allocator: Allocator, store: Any, etcd_prefix: str, make_agent: AgentFactory
) -> None:
    allocator.create_pool("default", ["10.11.0.0/24", "fd00:11::/120"], 3)
    agent = make_agent()
    first = agent.allocate(request("c1"))
    before = snapshot(store, etcd_prefix)

    again = [agent.allocate(request("c1")) for _ in range(3)]

    assert again == [first] * 3
    assert snapshot(store, etcd_prefix) == before
    # The same container with another interface is another attachment.
    other = agent.allocate(request("c1", ifname="net1"))
    assert {a.address for a in other}.isdisjoint({a.address for a in first})


def test_namespace_pool_then_default_then_no_pool(
    allocator: Allocator, make_agent: AgentFactory
) -> None:
    allocator.create_pool("team-a", ["10.21.0.0/24"], 3)
    allocator.create_pool("default", ["10.20.0.0/24"], 3)
    agent = make_agent()

    (a,) = agent.allocate(request("c1", "team-a"))
    (b,) = agent.allocate(request("c2", "team-b"))
    (c,) = agent.allocate(request("c3", "default"))

    assert (a.pool, a.address in ipaddress.ip_network("10.21.0.0/24")) == ("team-a", True)
    assert (b.pool, b.address in ipaddress.ip_network("10.20.0.0/24")) == ("default", True)
    assert c.pool == "default"
    assert owner_in_etcd(allocator, a.address) == Owner("team-a", "pod-c1", "c1", "eth0")
    assert owner_in_etcd(allocator, b.address) == Owner("team-b", "pod-c2", "c2", "eth0")


def test_a_burst_just_after_its_namespace_pool_is_created_gets_that_pool(
    allocator: Allocator, make_agent: AgentFactory
) -> None:
    """Regression: the first pod marked the namespace as looked up before its refresh ended,
    so the pods racing it fell through to "default"."""
    allocator.create_pool("default", ["10.23.0.0/24"], 3)
    agent = make_agent()
    allocator.create_pool("team-new", ["10.24.0.0/24"], 3)
    n = 20
    barrier = threading.Barrier(n)

    def allocate(i: int) -> list[PodAddress]:
        barrier.wait(timeout=10)
        return agent.allocate(request(f"burst{i}", "team-new"))

    with ThreadPoolExecutor(max_workers=n) as pool:
        answers = list(pool.map(allocate, range(n)))
    pools = Counter(a.pool for got in answers for a in got)
    assert pools == Counter({"team-new": n})
    assert all(a.address in ipaddress.ip_network("10.24.0.0/24") for got in answers for a in got)


def test_no_pool_names_the_namespace(allocator: Allocator, make_agent: AgentFactory) -> None:
    allocator.create_pool("team-a", ["10.22.0.0/24"], 3)
    agent = make_agent()

    with pytest.raises(NoPool, match='"team-b"'):
        agent.allocate(request("c1", "team-b"))

    assert agent.allocate(request("c2", "team-a"))[0].pool == "team-a"
    with pytest.raises(NotHeld):
        agent.check("c1", "eth0")


def test_the_same_attachment_on_a_second_node_is_a_conflict(
    allocator: Allocator, make_agent: AgentFactory
) -> None:
    """Regression: the second node took the record of the first node's block as its own (both
    pods got one address) and its DEL "succeeded" while freeing nothing."""
    allocator.create_pool("default", ["10.25.0.0/24"], 3)
    first, second = make_agent(NODE), make_agent(OTHER)
    (held,) = first.allocate(request("twin"))
    with pytest.raises(InvalidRequest, match=f'"{held.address}" on node "{NODE}"'):
        second.allocate(request("twin"))
    with pytest.raises(NotHeld):
        second.check("twin", "eth0")
    assert second.release("twin", "eth0") == []
    # The first node's record is untouched, and the second node recorded nothing.
    assert records_of(allocator, NODE) == {
        held.address: Owner("default", "pod-twin", "twin", "eth0")
    }
    assert records_of(allocator, OTHER) == {}
    assert first.check("twin", "eth0")[0].address == held.address
    # Once the first node lets it go, the second may have it.
    assert first.release("twin", "eth0") == [held.address]
    (moved,) = second.allocate(request("twin"))
    assert records_of(allocator, OTHER) == {
        moved.address: Owner("default", "pod-twin", "twin", "eth0")
    }


# -- static addresses -----------------------------------------------------------------------


def test_static_address_free_in_a_held_block_and_in_an_unheld_one(
    allocator: Allocator, make_agent: AgentFactory
) -> None:
    subnet = ipaddress.ip_network("10.30.0.0/24")
    allocator.create_pool("default", [str(subnet)], 3)
    agent = make_agent()
    (dynamic,) = agent.allocate(request("c0"))
    (held,) = held_blocks(allocator)
    # A free address of the block the node holds already (the last one, away from the cursor).
    in_held = pod_addresses_of(held, subnet)[-1]
    assert in_held != dynamic.address
    # An address of a block nobody holds yet: the agent claims exactly that block.
    unheld = next(
        b for b in map(ipaddress.ip_network, ("10.30.0.128/29", "10.30.0.136/29")) if b != held
    )
    wanted = unheld.network_address + 3

    (s1,) = agent.allocate(request("c1", "default", str(in_held)))
    (s2,) = agent.allocate(request("c2", "default", str(wanted)))

    assert (s1.address, s1.prefixlen, s1.gateway) == (in_held, 24, "10.30.0.1")
    assert s2.address == wanted
    assert held_blocks(allocator) == {held, unheld}
    assert owner_in_etcd(allocator, in_held) == Owner("default", "pod-c1", "c1", "eth0")
    assert owner_in_etcd(allocator, wanted) == Owner("default", "pod-c2", "c2", "eth0")
    agent.sync_routes()
    assert routes_of(agent) == {held, unheld}
    # Static addresses are not handed out dynamically afterwards.
    dynamic_rest = {agent.allocate(request(f"d{i}"))[0].address for i in range(12)}
    assert dynamic_rest.isdisjoint({dynamic.address, in_held, wanted})
    assert len(records_of(allocator)) == 15


def test_static_address_refusals(
    allocator: Allocator, store: Any, etcd_prefix: str, make_agent: AgentFactory
) -> None:
    allocator.create_pool("default", ["10.31.0.0/24", "fd00:31::/120"], 3)
    allocator.create_pool("team-a", ["10.32.0.0/24"], 3)
    allocator.claim_specific_block(OTHER, "default", "10.31.0.64/29")
    agent = make_agent()
    (taken, _) = agent.allocate(request("c0"))
    (taken_block,) = (b for b in held_blocks(allocator) if b.version == 4)

    # Outside the namespace's pool (though inside another pool): InvalidRequest naming it.
    with pytest.raises(InvalidRequest, match=r'"10\.32\.0\.9".*"default"'):
        agent.allocate(request("c1", "default", "10.32.0.9"))
    with pytest.raises(InvalidRequest, match=r'"192\.0\.2\.1"'):
        agent.allocate(request("c1", "team-a", "192.0.2.1"))
    # Two addresses of one family.
    with pytest.raises(InvalidRequest, match="at most one per family"):
        agent.allocate(request("c1", "default", "10.31.0.20", "10.31.0.21"))
    # The subnet's gateway is never a pod's.
    with pytest.raises(InvalidRequest, match=r"10\.31\.0\.1"):
        agent.allocate(request("c1", "default", "10.31.0.1"))
    after_gateway = snapshot(store, etcd_prefix)
    # Held by another pod of this node.
    with pytest.raises(AddressTaken, match=str(taken.address)):
        agent.allocate(request("c1", "default", str(taken.address)))
    # Its block is held by another node.
    with pytest.raises(AddressTaken, match=OTHER):
        agent.allocate(request("c1", "default", "10.31.0.66"))

    # Nothing was recorded for c1. (The gateway request may have claimed the gateway's block,
    # an empty block that maintain returns later; nothing changed after that.)
    assert snapshot(store, etcd_prefix) == after_gateway
    v4_blocks = {b for b in held_blocks(allocator) if b.version == 4}
    assert v4_blocks <= {taken_block, ipaddress.ip_network("10.31.0.0/29")}
    assert all(o.container_id == "c0" for o in records_of(allocator).values())
    assert records_of(allocator, OTHER) == {}
    with pytest.raises(NotHeld):
        agent.check("c1", "eth0")
    # The attachment can still be served once it asks for something valid.
    (v6_block,) = (b for b in held_blocks(allocator) if b.version == 6)
    free_v4 = pod_addresses_of(taken_block, ipaddress.ip_network("10.31.0.0/24"))[-1]
    free_v6 = pod_addresses_of(v6_block, ipaddress.ip_network("fd00:31::/120"))[-1]
    got = agent.allocate(request("c1", "default", str(free_v4), str(free_v6)))
    assert [a.address for a in got] == [free_v4, free_v6]


# -- release --------------------------------------------------------------------------------


def test_release_frees_records_and_is_idempotent(
    allocator: Allocator, make_agent: AgentFactory
) -> None:
    allocator.create_pool("default", ["10.40.0.0/24", "fd00:40::/120"], 3)
    agent = make_agent()
    got = agent.allocate(request("c1"))
    keep = agent.allocate(request("c2"))

    released = agent.release("c1", "eth0")

    assert sorted(released, key=str) == sorted((a.address for a in got), key=str)
    for a in got:
        assert owner_in_etcd(allocator, a.address) is None
    assert records_of(allocator).keys() == {a.address for a in keep}
    with pytest.raises(NotHeld):
        agent.check("c1", "eth0")
    assert agent.release("c1", "eth0") == []
    assert agent.release("never-seen", "eth0") == []
    assert records_of(allocator).keys() == {a.address for a in keep}


def test_freed_addresses_are_not_reused_right_away(
    allocator: Allocator, make_agent: AgentFactory
) -> None:
    # One block of 16 addresses: 13 usable (network, gateway and broadcast are reserved).
    allocator.create_pool("default", ["10.41.0.0/28"], 4)
    agent = make_agent()
    (first,) = agent.allocate(request("c0"))
    agent.release("c0", "eth0")

    following = [agent.allocate(request(f"c{i}"))[0].address for i in range(1, 13)]

    assert first.address not in following
    assert len(set(following)) == 12
    # Only when every other address is in use does the freed one come back.
    (last,) = agent.allocate(request("c13"))
    assert last.address == first.address
    with pytest.raises(Exhausted):
        agent.allocate(request("c14"))
    assert len(records_of(allocator)) == 13


# -- concurrency and batching ---------------------------------------------------------------


def test_concurrent_allocations_are_unique_recorded_and_batched(
    allocator: Allocator, make_agent: AgentFactory
) -> None:
    allocator.create_pool("default", ["10.50.0.0/20", "fd00:50::/116"], 3)
    agent = make_agent()
    calls = Counter[str]()
    record = agent.allocator.record

    def counting_record(node: str, items: Any) -> Any:
        calls["record"] += 1
        calls["items"] += len(items)
        return record(node, items)

    agent.allocator.record = counting_record  # type: ignore[method-assign]
    n = 200
    barrier = threading.Barrier(n)

    def allocate(i: int) -> list[PodAddress]:
        barrier.wait(timeout=10)
        return agent.allocate(request(f"c{i}"))

    with ThreadPoolExecutor(max_workers=n) as pool:
        answers = list(pool.map(allocate, range(n)))

    told = {a.address: f"c{i}" for i, got in enumerate(answers) for a in got}
    assert all([x.address.version for x in got] == [4, 6] for got in answers)
    assert len(told) == 2 * n, "an address was handed out twice"
    stored = records_of(allocator)
    assert {a: o.container_id for a, o in stored.items()} == told
    assert all(
        o == Owner("default", f"pod-{o.container_id}", o.container_id, "eth0")
        for o in stored.values()
    )
    # Several blocks of 8 per family had to be claimed.
    blocks = held_blocks(allocator)
    assert sum(b.version == 4 for b in blocks) >= n // 8
    # Every record lies in a block this node holds.
    _, records, _ = allocator.node_blocks(NODE, with_records=True)
    assert all(r.block in blocks and r.address in r.block for r in records)
    # Group commit merged concurrent records into fewer allocator calls.
    assert calls["items"] >= 2 * n
    assert calls["record"] < n, calls
    agent.sync_routes()
    assert routes_of(agent) == blocks


def test_batches_are_observed_and_merged(allocator: Allocator, allocator_addr: str) -> None:
    allocator.create_pool("default", ["10.51.0.0/22"], 4)
    sizes: list[int] = []

    class Events(NoEvents):
        def batch(self, kind: str, size: int) -> None:
            if kind == "record":
                sizes.append(size)

    client = AllocatorClient(allocator_addr, timeout=2.0)
    agent = NodeAgent(
        AgentConfig(node=NODE, maintain_interval=3600.0),
        client,
        RecordingRoutes(),
        events=Events(),
        clock=started_clock(),
    )
    agent.start(wait=True)
    try:
        with ThreadPoolExecutor(max_workers=64) as pool:
            list(pool.map(lambda i: agent.allocate(request(f"c{i}")), range(64)))
    finally:
        agent.stop()
        client.close()
    assert sum(sizes) == 64
    assert max(sizes) > 1 and len(sizes) < 64
    assert len(records_of(allocator)) == 64


# -- blocks: fill, spare, return, routes ----------------------------------------------------


def test_a_full_block_makes_the_agent_claim_another(
    allocator: Allocator, make_agent: AgentFactory
) -> None:
    subnet = ipaddress.ip_network("10.60.0.0/24")
    allocator.create_pool("default", [str(subnet)], 3)
    agent = make_agent(spare_threshold=1.0)
    (a0,) = agent.allocate(request("c0"))
    (first,) = held_blocks(allocator)
    capacity = usable(first, subnet)
    rest = [agent.allocate(request(f"c{i}"))[0] for i in range(1, capacity)]
    assert all(a.address in first for a in rest)
    assert held_blocks(allocator) == {first}

    (overflow,) = agent.allocate(request("c-over"))

    assert overflow.address not in first
    blocks = held_blocks(allocator)
    assert len(blocks) == 2 and first in blocks
    agent.sync_routes()
    assert routes_of(agent) == blocks


def test_maintain_claims_a_spare_once_usage_crosses_the_threshold(
    allocator: Allocator, make_agent: AgentFactory
) -> None:
    subnet = ipaddress.ip_network("10.61.0.0/24")
    allocator.create_pool("default", [str(subnet)], 3)
    agent = make_agent(spare_threshold=0.5)
    agent.allocate(request("c0"))
    (first,) = held_blocks(allocator)
    capacity = usable(first, subnet)
    used = 1
    while used + 1 < 0.5 * capacity:
        agent.allocate(request(f"c{used}"))
        used += 1
    agent.maintain()
    assert held_blocks(allocator) == {first}, "claimed a spare below the threshold"

    agent.allocate(request(f"c{used}"))
    agent.maintain()

    blocks = held_blocks(allocator)
    assert len(blocks) == 2 and first in blocks
    agent.sync_routes()
    assert routes_of(agent) == blocks
    # The spare waits: new pods still fill the older block first.
    (more,) = agent.allocate(request("c-more"))
    assert more.address in first


def test_maintain_returns_blocks_empty_past_the_grace_but_keeps_the_last(
    allocator: Allocator, make_agent: AgentFactory
) -> None:
    subnet = ipaddress.ip_network("10.62.0.0/24")
    allocator.create_pool("default", [str(subnet)], 3)
    clock = ManualClock()
    agent = make_agent(clock=clock, release_grace=30.0, spare_threshold=0.9)
    (a0,) = agent.allocate(request("c0"))
    (first,) = held_blocks(allocator)
    capacity = usable(first, subnet)
    for i in range(1, capacity + 2):
        agent.allocate(request(f"c{i}"))
    blocks = held_blocks(allocator)
    (second,) = blocks - {first}
    agent.sync_routes()
    assert routes_of(agent) == {first, second}
    for i in range(1, capacity + 2):
        agent.release(f"c{i}", "eth0")
    assert records_of(allocator).keys() == {a0.address}

    clock.advance(29)
    agent.maintain()
    assert held_blocks(allocator) == {first, second}, "returned within the grace period"

    clock.advance(2)
    agent.maintain()
    assert held_blocks(allocator) == {first}
    agent.sync_routes()
    assert routes_of(agent) == {first}
    assert [u.blocks_held for u in allocator.usage()] == [1]

    # The last block of the pool and family stays, even empty past the grace.
    agent.release("c0", "eth0")
    clock.advance(3600)
    agent.maintain()
    assert held_blocks(allocator) == {first}
    assert records_of(allocator) == {}
    agent.sync_routes()
    assert routes_of(agent) == {first}
    # And it still serves.
    (again,) = agent.allocate(request("c-again"))
    assert again.address in first


def test_routes_follow_claims_in_the_background(
    allocator: Allocator, make_agent: AgentFactory
) -> None:
    allocator.create_pool("default", ["10.63.0.0/24", "fd00:63::/120"], 3)
    agent = make_agent()
    assert routes_of(agent) == set()
    agent.allocate(request("c0"))
    blocks = held_blocks(allocator)
    deadline = time.monotonic() + 5
    while routes_of(agent) != blocks and time.monotonic() < deadline:
        time.sleep(0.02)
    assert routes_of(agent) == blocks


# -- restart --------------------------------------------------------------------------------


class UnwritableRoutes(RecordingRoutes):
    """A route sink that can read the table but not write it while `writable` is false, as
    coild without CAP_NET_ADMIN."""

    def __init__(self) -> None:
        super().__init__()
        self.writable = False

    def sync(self, desired: set[Network]) -> None:
        if desired != self.desired and not self.writable:
            raise RouteError(
                f"table 119: writing {sorted(map(str, desired))}: Operation not permitted"
            )
        super().sync(desired)


def test_no_address_is_handed_out_of_a_block_whose_route_cannot_be_written(
    allocator: Allocator, make_agent: AgentFactory
) -> None:
    """Regression: the claim's route write failed, was logged, and the ADD succeeded anyway:
    the pod got an address no route led to (docs/coild.md: the route exists before the claim
    returns)."""
    allocator.create_pool("default", ["10.26.0.0/24"], 3)
    routes = UnwritableRoutes()
    agent = make_agent(routes=routes)
    for attempt in ("first", "again"):
        with pytest.raises(RoutesNotReady, match="routes cannot be written") as raised:
            agent.allocate(request(attempt))
        assert status_of_error(raised.value) == grpc.StatusCode.UNAVAILABLE
        assert records_of(allocator) == {}
    # The failure is "try again later" (UNAVAILABLE, CNI 11), and it is: once routes can be
    # written, the same pods get addresses whose block is routed.
    routes.writable = True
    (got,) = agent.allocate(request("again"))
    assert any(got.address in block for block in routes_of(agent))
    assert routes_of(agent) == held_blocks(allocator)


def test_restart_rebuilds_blocks_and_attachments_from_the_allocator(
    allocator: Allocator, store: Any, etcd_prefix: str, make_agent: AgentFactory
) -> None:
    allocator.create_pool("default", ["10.70.0.0/24", "fd00:70::/120"], 3)
    allocator.create_pool("team-a", ["10.71.0.0/24"], 3)
    old = make_agent()
    before: dict[str, list[PodAddress]] = {}
    for i in range(10):
        before[f"c{i}"] = old.allocate(request(f"c{i}"))
    before["t0"] = old.allocate(request("t0", "team-a"))
    # Static addresses in a block t0 does not use (the agent claims it).
    static_block = next(
        b
        for b in map(ipaddress.ip_network, ("10.71.0.200/29", "10.71.0.208/29"))
        if before["t0"][0].address not in b
    )
    static, static_later = static_block[1], static_block[2]
    before["s0"] = old.allocate(request("s0", "team-a", str(static)))
    old.release("c3", "eth0")
    del before["c3"]
    old.stop()

    new = make_agent()

    assert routes_of(new) == held_blocks(allocator)
    for cid, addresses in before.items():
        assert new.check(cid, "eth0") == addresses
    with pytest.raises(NotHeld):
        new.check("c3", "eth0")
    state = snapshot(store, etcd_prefix)
    for cid, addresses in before.items():
        namespace = "team-a" if cid in ("t0", "s0") else "default"
        assert new.allocate(request(cid, namespace)) == addresses
    assert snapshot(store, etcd_prefix) == state

    old_addresses = {a.address for got in before.values() for a in got}
    fresh = [new.allocate(request(f"n{i}"))[0] for i in range(30)]
    fresh += [new.allocate(request("n-static", "team-a", str(static_later)))[0]]
    assert {a.address for a in fresh}.isdisjoint(old_addresses)
    assert len({a.address for a in fresh}) == len(fresh)
    with pytest.raises(AddressTaken):
        new.allocate(request("n-clash", "team-a", str(static)))

    # DEL of an attachment made before the restart frees its records.
    new.release("c0", "eth0")
    for a in before["c0"]:
        assert owner_in_etcd(allocator, a.address) is None
    # c1..c9 without c3 (dual-stack), t0 and s0, then 30 fresh dual-stack and one static.
    assert len(records_of(allocator)) == 8 * 2 + 2 + 30 * 2 + 1


# -- half failures --------------------------------------------------------------------------


def test_dual_stack_half_failure_leaves_no_record_and_no_leak(
    allocator: Allocator, store: Any, etcd_prefix: str, make_agent: AgentFactory
) -> None:
    # The IPv6 subnet is one block, held by another node: IPv6 is exhausted for this node.
    allocator.create_pool("default", ["10.80.0.0/29", "fd00:80::/125"], 3)
    allocator.claim_block(OTHER, "default", Family.IPV6)
    agent = make_agent()

    # More attempts than the IPv4 block has addresses: a leaked IPv4 reservation per
    # attempt would fill the block and make the agent claim another (or run out).
    for i in range(8):
        with pytest.raises(Exhausted, match="IPv6|exhausted"):
            agent.allocate(request(f"c{i}"))
        with pytest.raises(NotHeld):
            agent.check(f"c{i}", "eth0")

    assert records_of(allocator) == {}
    assert {u.family: u.addresses_used for u in allocator.usage()} == {4: 0, 6: 0}
    (v4_block,) = held_blocks(allocator)
    # Once IPv6 has room, the node's IPv4 block still has all its addresses to give.
    (v6_block,) = held_blocks(allocator, OTHER)
    allocator.release_block(OTHER, "default", str(v6_block))
    got = [agent.allocate(request(f"ok{i}")) for i in range(5)]
    assert all(v4.address in v4_block for v4, _ in got)
    assert len(records_of(allocator)) == 10


def test_static_dual_stack_half_failure_releases_the_recorded_address(
    allocator: Allocator, make_agent: AgentFactory
) -> None:
    v6_subnet = ipaddress.ip_network("fd00:81::/120")
    allocator.create_pool("default", ["10.81.0.0/24", str(v6_subnet)], 3)
    agent = make_agent()
    (_, v6_taken) = agent.allocate(request("c0"))
    (v6_block,) = (b for b in held_blocks(allocator) if b.version == 6)
    wanted_v4 = ipaddress.ip_address("10.81.0.100")

    # The IPv6 address is in use by a pod the agent knows: refused before anything is recorded.
    with pytest.raises(AddressTaken):
        agent.allocate(request("c1", "default", str(wanted_v4), str(v6_taken.address)))
    assert owner_in_etcd(allocator, wanted_v4) is None

    # The IPv6 address is recorded in etcd behind the agent's back: the IPv4 address is
    # recorded first, the IPv6 record is refused, and the IPv4 record is released again.
    ghost_v6 = pod_addresses_of(v6_block, v6_subnet)[-1]
    ghost = Owner("default", "ghost", "ghost", "eth0")
    (result,) = allocator.record(NODE, [RecordRequest(ghost_v6, "default", v6_block, ghost)])
    assert result.outcome == RecordOutcome.RECORDED
    with pytest.raises(AddressTaken, match="ghost"):
        agent.allocate(request("c1", "default", str(wanted_v4), str(ghost_v6)))

    assert owner_in_etcd(allocator, wanted_v4) is None
    assert {o.container_id for o in records_of(allocator).values()} == {"c0", "ghost"}
    with pytest.raises(NotHeld):
        agent.check("c1", "eth0")
    # The IPv4 address is free again for the next pod asking for it.
    # (its IPv6 address: any free one of the held block; a fixed one could be c0's random pick)
    free_v6 = next(
        a for a in pod_addresses_of(v6_block, v6_subnet) if a not in {v6_taken.address, ghost_v6}
    )
    (v4, v6) = agent.allocate(request("c2", "default", str(wanted_v4), str(free_v6)))
    assert v4.address == wanted_v4
    assert owner_in_etcd(allocator, wanted_v4) == Owner("default", "pod-c2", "c2", "eth0")


# -- garbage collection ---------------------------------------------------------------------


def test_garbage_collect_releases_exactly_the_attachments_not_valid(
    allocator: Allocator, make_agent: AgentFactory
) -> None:
    allocator.create_pool("default", ["10.90.0.0/24", "fd00:90::/120"], 3)
    agent = make_agent()
    keys = [(f"c{i}", "eth0") for i in range(6)] + [("c0", "net1"), ("c1", "net1")]
    got = {key: agent.allocate(request(key[0], ifname=key[1])) for key in keys}
    valid = {("c0", "eth0"), ("c1", "net1"), ("c2", "eth0"), ("c5", "eth0"), ("gone", "eth0")}

    released = agent.garbage_collect(valid)

    stale = set(keys) - valid
    assert set(released) == stale and len(released) == len(stale)
    stored = {(o.container_id, o.interface) for o in records_of(allocator).values()}
    assert stored == set(keys) & valid
    for key in stale:
        for a in got[key]:
            assert owner_in_etcd(allocator, a.address) is None
    for key in set(keys) & valid:
        assert agent.check(*key) == got[key]
    assert agent.garbage_collect(valid) == []


# -- allocator outages ----------------------------------------------------------------------


def test_unreachable_allocator_is_not_ready(tmp_path: Path, make_agent: AgentFactory) -> None:
    agent = make_agent(address=f"unix:{tmp_path}/nothing.sock", wait=False, timeout=0.5)

    assert not agent.ready.wait(0.5)
    with pytest.raises(AllocatorUnavailable):
        agent.allocate(request("c1"))
    with pytest.raises(AllocatorUnavailable):
        agent.status()
    with pytest.raises(AllocatorUnavailable):
        agent.release("c1", "eth0")


def test_allocations_resume_when_the_allocator_comes_back(
    allocator: Allocator, tmp_path: Path, make_agent: AgentFactory
) -> None:
    allocator.create_pool("default", ["10.95.0.0/24"], 3)
    socket = tmp_path / "allocator.sock"
    server, _ = serve_allocator(allocator, f"unix:{socket}")
    try:
        agent = make_agent(address=f"unix:{socket}", timeout=1.0)
        (a0,) = agent.allocate(request("c0"))
        assert agent.status() == ["default"]
    finally:
        server.stop(grace=None).wait()

    started = time.monotonic()
    with pytest.raises(AllocatorUnavailable):
        agent.allocate(request("c1"))
    assert time.monotonic() - started < 5
    with pytest.raises(AllocatorUnavailable):
        agent.status()
    # What needs no allocator still works: a repeated request and a check.
    assert agent.allocate(request("c0")) == [a0]
    assert agent.check("c0", "eth0") == [a0]
    with pytest.raises(NotHeld):
        agent.check("c1", "eth0")
    assert owner_in_etcd(allocator, a0.address) is not None
    assert set(records_of(allocator)) == {a0.address}

    if socket.exists():
        os.unlink(socket)
    server, _ = serve_allocator(allocator, f"unix:{socket}")
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                (a1,) = agent.allocate(request("c1"))
                break
            except AllocatorUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert a1.address != a0.address
        assert owner_in_etcd(allocator, a1.address) == Owner("default", "pod-c1", "c1", "eth0")
        (a2,) = agent.allocate(request("c2"))
        assert len({a0.address, a1.address, a2.address}) == 3
        assert agent.status() == ["default"]
        assert set(records_of(allocator)) == {a0.address, a1.address, a2.address}
    finally:
        agent.stop()
        server.stop(grace=None).wait()


# -- the gRPC face --------------------------------------------------------------------------


@pytest.fixture
def agent_stub(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[NodeAgent], pb_grpc.NodeAgentServiceStub]]:
    """Serve agents on UNIX sockets and hand out stubs; servers and channels are closed."""
    servers: list[grpc.Server] = []
    channels: list[grpc.Channel] = []
    counter = itertools.count()

    def stub_for(agent: NodeAgent) -> pb_grpc.NodeAgentServiceStub:
        path = str(tmp_path_factory.mktemp("coild") / f"coild-{next(counter)}.sock")
        servers.append(serve_agent(agent, path, workers=4))
        channel = grpc.insecure_channel(f"unix:{path}")
        channels.append(channel)
        return pb_grpc.NodeAgentServiceStub(channel)

    try:
        yield stub_for
    finally:
        for channel in channels:
            channel.close()
        for server in servers:
            server.stop(grace=None).wait()


def status_of(call: Any, message: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call(message, timeout=10)
    return raised.value.code(), raised.value.details()


def attachment(cid: str, ifname: str = "eth0") -> pb.Attachment:
    return pb.Attachment(container_id=cid, interface=ifname)


def test_grpc_status_codes(
    allocator: Allocator,
    tmp_path: Path,
    make_agent: AgentFactory,
    agent_stub: Callable[[NodeAgent], pb_grpc.NodeAgentServiceStub],
) -> None:
    # No "default" pool: a namespace without its own pool has none. team-a: 5 usable addresses.
    allocator.create_pool("team-a", ["10.99.0.0/29"], 3)
    stub = agent_stub(make_agent())

    ok = stub.Allocate(
        pb.AllocateRequest(attachment=attachment("c0"), namespace="team-a", pod="p0"), timeout=10
    )
    (first,) = ok.addresses
    assert (first.gateway, first.pool) == ("10.99.0.1", "team-a")
    assert first.address.endswith("/29")
    assert owner_in_etcd(allocator, ipaddress.ip_address(first.address.split("/")[0])) == Owner(
        "team-a", "p0", "c0", "eth0"
    )
    taken = first.address.split("/")[0]

    cases = [
        (
            stub.Allocate,
            pb.AllocateRequest(attachment=attachment("c1"), namespace="team-b"),
            grpc.StatusCode.FAILED_PRECONDITION,
            '"team-b"',
        ),
        (
            stub.Allocate,
            pb.AllocateRequest(
                attachment=attachment("c1"), namespace="team-a", requested_addresses=["10.1.2.3"]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            '"10.1.2.3"',
        ),
        (
            stub.Allocate,
            pb.AllocateRequest(
                attachment=attachment("c1"), namespace="team-a", requested_addresses=["nope"]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            '"nope"',
        ),
        (
            stub.Allocate,
            pb.AllocateRequest(attachment=attachment(""), namespace="team-a"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "container ID",
        ),
        (
            stub.Allocate,
            pb.AllocateRequest(
                attachment=attachment("c1"), namespace="team-a", requested_addresses=[taken]
            ),
            grpc.StatusCode.ALREADY_EXISTS,
            taken,
        ),
        (stub.Check, pb.CheckRequest(attachment=attachment("c9")), grpc.StatusCode.NOT_FOUND, "c9"),
    ]
    for call, message, code, text in cases:
        got, details = status_of(call, message)
        assert (got, text in details) == (code, True), (message, got, details)

    for i in range(1, 5):
        stub.Allocate(
            pb.AllocateRequest(attachment=attachment(f"c{i}"), namespace="team-a"), timeout=10
        )
    got, details = status_of(
        stub.Allocate, pb.AllocateRequest(attachment=attachment("c5"), namespace="team-a")
    )
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert len(records_of(allocator)) == 5

    checked = stub.Check(pb.CheckRequest(attachment=attachment("c0")), timeout=10)
    assert list(checked.addresses) == [first]
    released = stub.Release(pb.ReleaseRequest(attachment=attachment("c0")), timeout=10)
    assert list(released.addresses) == [taken]
    again = stub.Release(pb.ReleaseRequest(attachment=attachment("c0")), timeout=10)
    assert list(again.addresses) == []
    collected = stub.GarbageCollect(
        pb.GarbageCollectRequest(
            valid_attachments=[attachment("c1"), attachment("c2")], valid_list_complete=True
        ),
        timeout=10,
    )
    assert {a.container_id for a in collected.released} == {"c3", "c4"}
    assert {o.container_id for o in records_of(allocator).values()} == {"c1", "c2"}
    assert list(stub.Status(pb.StatusRequest(), timeout=10).pools) == ["team-a"]

    # An agent whose allocator cannot be reached answers UNAVAILABLE.
    down = agent_stub(make_agent(address=f"unix:{tmp_path}/nothing.sock", wait=False, timeout=0.5))
    for call, message in [
        (down.Allocate, pb.AllocateRequest(attachment=attachment("c1"), namespace="team-a")),
        (down.Status, pb.StatusRequest()),
    ]:
        got, details = status_of(call, message)
        assert got == grpc.StatusCode.UNAVAILABLE, details


def test_malformed_protobuf_is_invalid_argument_with_one_log_line(
    allocator: Allocator,
    tmp_path_factory: pytest.TempPathFactory,
    make_agent: AgentFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: gRPC answered INTERNAL and logged a traceback for every such request."""
    path = str(tmp_path_factory.mktemp("coild") / "coild.sock")
    server = serve_agent(make_agent(), path, workers=2)
    try:
        with grpc.insecure_channel(f"unix:{path}") as channel:
            call = channel.unary_unary("/coil.v1.NodeAgentService/Allocate")
            caplog.clear()
            with pytest.raises(grpc.RpcError) as raised:
                call(b"\x0a\xff\xff", timeout=10)
    finally:
        server.stop(grace=None).wait()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    logged = [r for r in caplog.records if r.levelno >= 30]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert logged[0].exc_info is None and "Allocate" in logged[0].getMessage()


def test_reconcile_catches_up_with_changes_made_elsewhere(
    allocator: Allocator, make_agent: AgentFactory
) -> None:
    allocator.create_pool("default", ["10.30.0.0/24"], 3)
    allocator.create_pool("other", ["10.31.0.0/24"], 3)
    agent = make_agent()
    kept = agent.allocate(request("kept"))[0].address
    freed = agent.allocate(request("freed"))[0].address
    # An operator frees one address; another pool's block is claimed for this node elsewhere
    # (a claim whose answer was lost looks the same).
    allocator.free_address(str(freed))
    adopted, _ = allocator.claim_block(NODE, "other")
    agent.reconcile()
    agent.sync_routes()
    assert agent.check("kept", "eth0")[0].address == kept
    with pytest.raises(NotHeld):
        agent.check("freed", "eth0")
    assert adopted.cidr in routes_of(agent)
    assert routes_of(agent) == held_blocks(allocator)
    # The freed address is free again for this agent: filling the block hands it out too.
    block = ipaddress.ip_network(f"{kept}/29", strict=False)
    room = usable(block, ipaddress.ip_network("10.30.0.0/24")) - 1
    handed = [agent.allocate(request(f"n{i}"))[0].address for i in range(room)]
    assert freed in handed and kept not in handed
    assert all(a in block for a in handed)
    # A forced release of the whole node: the agent drops every block and its routes.
    allocator.release_node(NODE, force=True)
    agent.reconcile()
    agent.sync_routes()
    assert routes_of(agent) == set() == held_blocks(allocator)


def test_a_restarted_agent_never_hands_out_a_subnets_reserved_addresses(
    allocator: Allocator, make_agent: AgentFactory
) -> None:
    """After a restart the blocks come back from the allocator (the stream's first snapshot, or
    a listing); the subnet's network address, gateway and broadcast address must stay out of
    pods' reach as they did before, or the allocator refuses the record and the ADD fails."""
    allocator.create_pool("default", ["10.72.0.0/29"], 3)  # one block: the whole subnet
    subnet = ipaddress.ip_network("10.72.0.0/29")
    reserved = {subnet.network_address, subnet.network_address + 1, subnet.broadcast_address}
    old = make_agent()
    first = old.allocate(request("p0"))
    old.stop()

    new = make_agent()
    got = [a.address for a in first]
    for i in range(1, 8):
        try:
            got += [a.address for a in new.allocate(request(f"p{i}"))]
        except Exhausted:
            break
    assert not reserved & set(got), f"handed out reserved addresses: {sorted(reserved & set(got))}"
    assert sorted(got) == sorted(set(subnet) - reserved)
