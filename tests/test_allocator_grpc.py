"""The allocator over gRPC: status codes for domain errors, and 200 nodes racing through two
allocator replicas against one real etcd."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from coil.v1 import allocator_pb2 as pb
from coil.v1 import allocator_pb2_grpc as pb_grpc
from coil_allocator.allocator import Allocator
from coil_allocator.etcd_store import EtcdConfig, EtcdStore
from coil_allocator.servicer import NodeStarts, serve
from coil_core import errors
from tests.harness.etcd import EtcdServer


@pytest.fixture
def stub(allocator_addr: str) -> Iterator[pb_grpc.AllocatorServiceStub]:
    with grpc.insecure_channel(allocator_addr) as channel:
        yield pb_grpc.AllocatorServiceStub(channel)


def code_of(call, request) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as raised:
        call(request, timeout=10)
    return raised.value.code(), raised.value.details()


def test_domain_errors_map_to_status_codes(stub: pb_grpc.AllocatorServiceStub) -> None:
    stub.CreatePool(
        pb.CreatePoolRequest(name="default", subnets=["10.1.0.0/28"], block_size_bits=2)
    )
    cases = [
        (
            stub.CreatePool,
            pb.CreatePoolRequest(name="Bad", subnets=["10.2.0.0/24"], block_size_bits=2),
            grpc.StatusCode.INVALID_ARGUMENT,
            'pool create "Bad"',
        ),
        (
            stub.CreatePool,
            pb.CreatePoolRequest(name="default", subnets=["10.2.0.0/24"], block_size_bits=2),
            grpc.StatusCode.ALREADY_EXISTS,
            "exists",
        ),
        (stub.GetPool, pb.GetPoolRequest(name="nope"), grpc.StatusCode.NOT_FOUND, "no such pool"),
        (stub.ReleaseNode, pb.ReleaseNodeRequest(node="ghost"), grpc.StatusCode.NOT_FOUND, "ghost"),
        (
            stub.FreeAddress,
            pb.FreeAddressRequest(address="10.1.0.1"),
            grpc.StatusCode.NOT_FOUND,
            "not allocated",
        ),
        (
            stub.ClaimBlock,
            pb.ClaimBlockRequest(node="n", pool="default", family=pb.FAMILY_IPV6),
            grpc.StatusCode.INVALID_ARGUMENT,
            "no IPv6 subnet",
        ),
    ]
    for call, request, code, text in cases:
        got, details = code_of(call, request)
        assert (got, text in details) == (code, True), (request, got, details)
    for i in range(4):
        stub.ClaimBlock(pb.ClaimBlockRequest(node=f"n{i}", pool="default"))
    got, details = code_of(stub.ClaimBlock, pb.ClaimBlockRequest(node="n9", pool="default"))
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED and "pool exhausted" in details
    got, details = code_of(stub.DeletePool, pb.DeletePoolRequest(name="default"))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "held" in details


def test_unreachable_etcd_is_unavailable(tmp_path: Path) -> None:
    from tests.harness.etcd import free_port

    store = EtcdStore(EtcdConfig((f"127.0.0.1:{free_port()}",), timeout=0.5))
    server, _ = serve(Allocator(store, "/x/"), f"unix:{tmp_path}/a.sock")
    try:
        with grpc.insecure_channel(f"unix:{tmp_path}/a.sock") as channel:
            got, details = code_of(
                pb_grpc.AllocatorServiceStub(channel).ListPools, pb.ListPoolsRequest()
            )
        assert got == grpc.StatusCode.UNAVAILABLE
        assert "etcd at 127.0.0.1:" in details and "unreachable" in details
    finally:
        server.stop(None)
        store.close()


def test_record_and_release_over_grpc(stub: pb_grpc.AllocatorServiceStub) -> None:
    stub.CreatePool(
        pb.CreatePoolRequest(name="default", subnets=["10.1.0.0/24"], block_size_bits=5)
    )
    block = stub.ClaimBlock(pb.ClaimBlockRequest(node="n1", pool="default")).block
    first = str(ipaddress.ip_network(block.cidr).network_address + 3)  # never a reserved one
    owner = pb.Owner(namespace="ns", pod="p", container_id="c1", interface="eth0")
    response = stub.RecordAllocations(
        pb.RecordAllocationsRequest(
            node="n1",
            items=[
                pb.RecordItem(address=first, pool="default", block=block.cidr, owner=owner),
                pb.RecordItem(address="junk", pool="default", block=block.cidr, owner=owner),
            ],
        )
    )
    assert [r.outcome for r in response.results] == [
        pb.RECORD_OUTCOME_RECORDED,
        pb.RECORD_OUTCOME_INVALID,
    ]
    assert "junk" in response.results[1].message
    listed = stub.ListNodeBlocks(pb.ListNodeBlocksRequest(node="n1", with_records=True))
    assert [r.address for r in listed.records] == [first]
    assert listed.blocks[0].used == 1
    released = stub.ReleaseAllocations(
        pb.ReleaseAllocationsRequest(
            node="n1", items=[pb.ReleaseItem(address=first, container_id="c1", interface="eth0")]
        )
    )
    assert released.results[0].outcome == pb.RELEASE_OUTCOME_RELEASED
    info = stub.GetAddress(pb.GetAddressRequest(address=first))
    assert info.node == "n1" and not info.HasField("record")


@pytest.mark.slow
def test_200_nodes_race_through_two_replicas(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> None:
    """200 nodes claim, record and release at once through two allocator replicas: no block and no
    address is held twice, every claim succeeds while the pool has room, and a full pool says so."""
    replicas = []
    for i in range(2):
        store = EtcdStore(EtcdConfig((etcd_server.endpoint,)))
        server, _ = serve(Allocator(store, etcd_prefix), f"unix:{tmp_path}/r{i}.sock", workers=16)
        replicas.append((store, server, f"unix:{tmp_path}/r{i}.sock"))
    try:
        with grpc.insecure_channel(replicas[0][2]) as ch:
            admin = pb_grpc.AllocatorServiceStub(ch)
            admin.CreatePool(
                pb.CreatePoolRequest(
                    name="default", subnets=["10.10.0.0/16", "fd00:10::/112"], block_size_bits=5
                )
            )
            admin.CreatePool(
                pb.CreatePoolRequest(name="small", subnets=["10.20.0.0/23"], block_size_bits=3)
            )
        nodes = 200
        start = threading.Barrier(nodes)
        claimed: list[tuple[str, str, str]] = []  # (pool, cidr, node)
        recorded: list[tuple[str, str]] = []  # (address, node)
        exhausted: list[str] = []
        failures: list[str] = []
        retries = Counter[str]()
        lock = threading.Lock()

        def node(i: int) -> None:
            name = f"node-{i:03d}"
            with grpc.insecure_channel(replicas[i % 2][2]) as ch:
                stub = pb_grpc.AllocatorServiceStub(ch)
                start.wait(timeout=60)
                try:
                    for pool, family in (
                        ("default", pb.FAMILY_IPV4),
                        ("default", pb.FAMILY_IPV6),
                        ("small", pb.FAMILY_IPV4),
                    ):
                        try:
                            r = stub.ClaimBlock(
                                pb.ClaimBlockRequest(node=name, pool=pool, family=family),
                                timeout=60,
                            )
                        except grpc.RpcError as e:
                            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and pool == "small":
                                with lock:
                                    exhausted.append(e.details())
                                continue
                            raise
                        with lock:
                            claimed.append((pool, r.block.cidr, name))
                            retries[pool] += r.retries
                        net = ipaddress.ip_network(r.block.cidr)
                        items = [
                            pb.RecordItem(
                                # +2..+4: clear of the subnet's network address and gateway
                                address=str(net.network_address + 2 + k),
                                pool=pool,
                                block=r.block.cidr,
                                owner=pb.Owner(
                                    namespace="ns",
                                    pod=f"p{k}",
                                    container_id=f"{name}-{pool}-{family}-{k}",
                                    interface="eth0",
                                ),
                            )
                            for k in range(3)
                        ]
                        out = stub.RecordAllocations(
                            pb.RecordAllocationsRequest(node=name, items=items), timeout=60
                        )
                        assert all(x.outcome == pb.RECORD_OUTCOME_RECORDED for x in out.results), (
                            out
                        )
                        released = stub.ReleaseAllocations(
                            pb.ReleaseAllocationsRequest(
                                node=name,
                                items=[
                                    pb.ReleaseItem(
                                        address=items[0].address,
                                        container_id=items[0].owner.container_id,
                                        interface="eth0",
                                    )
                                ],
                            ),
                            timeout=60,
                        )
                        assert released.results[0].outcome == pb.RELEASE_OUTCOME_RELEASED
                        with lock:
                            recorded.extend((it.address, name) for it in items[1:])
                except Exception as e:  # noqa: BLE001 - collected and asserted below
                    with lock:
                        failures.append(f"{name}: {e!r}")

        threads = [threading.Thread(target=node, args=(i,)) for i in range(nodes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not failures, failures[:5]
        # Every node got a v4 and a v6 block of the large pool, all distinct.
        default = [c for c in claimed if c[0] == "default"]
        assert len(default) == 2 * nodes
        assert len({c[1] for c in claimed}) == len(claimed)
        # The small pool (64 blocks) served exactly 64 nodes; the rest were told it is exhausted.
        small = [c for c in claimed if c[0] == "small"]
        assert len(small) == 64 and len(exhausted) == nodes - 64
        assert all("pool exhausted" in m for m in exhausted)
        # No address is recorded twice, and etcd holds exactly what the nodes were told.
        assert len({a for a, _ in recorded}) == len(recorded)
        with grpc.insecure_channel(replicas[1][2]) as ch:
            stub = pb_grpc.AllocatorServiceStub(ch)
            usage = {(u.pool, u.family): u for u in stub.GetUsage(pb.GetUsageRequest()).usage}
            assert usage[("default", pb.FAMILY_IPV4)].blocks_held == nodes
            assert usage[("default", pb.FAMILY_IPV6)].blocks_held == nodes
            assert usage[("small", pb.FAMILY_IPV4)].blocks_held == 64
            total_used = sum(u.addresses_used for u in usage.values())
            assert total_used == len(recorded)
            for address, name in recorded[:: max(1, len(recorded) // 50)]:
                info = stub.GetAddress(pb.GetAddressRequest(address=address))
                assert info.node == name and info.record.node == name
        # Claims rarely collide: random choice keeps retries low.
        assert retries["default"] / (2 * nodes) < 0.5, retries
    finally:
        for store, server, _ in replicas:
            server.stop(None)
            store.close()


def test_huge_ipv6_pool_counts_saturate(stub: pb_grpc.AllocatorServiceStub) -> None:
    """A /48 of single-address blocks has 2^80 of them: usage and pool show still answer."""
    stub.CreatePool(pb.CreatePoolRequest(name="big", subnets=["fd01::/48"], block_size_bits=0))
    stub.CreatePool(pb.CreatePoolRequest(name="small", subnets=["10.1.0.0/24"], block_size_bits=5))
    usage = {u.pool: u for u in stub.GetUsage(pb.GetUsageRequest()).usage}
    assert usage["big"].blocks_total == 2**64 - 1 and usage["big"].addresses_total == 2**64 - 1
    assert usage["small"].blocks_total == 8
    shown = stub.GetPool(pb.GetPoolRequest(name="big"))
    assert shown.subnets[0].total_blocks == 2**64 - 1


@pytest.mark.parametrize(
    "namespace,pod,problem",
    [
        ("default", "p" * 2**20, "pod name"),
        ("default", "p" * 254, "pod name"),
        ("n" * 64, "web-1", "namespace"),
    ],
    ids=["pod-1MB", "pod-254", "namespace-64"],
)
def test_overlong_pod_names_fail_only_their_item(
    stub: pb_grpc.AllocatorServiceStub, allocator: Allocator, namespace: str, pod: str, problem: str
) -> None:
    """Before: a 1 MB pod name made the batch's transaction too large and failed every item."""
    allocator.create_pool("default", ["10.1.0.0/24"], 4)
    block, _ = allocator.claim_block("node-a", "default")
    good, bad = (str(block.cidr.network_address + i) for i in (2, 3))

    def item(address: str, ns: str, name: str, cid: str) -> pb.RecordItem:
        owner = pb.Owner(namespace=ns, pod=name, container_id=cid, interface="eth0")
        return pb.RecordItem(address=address, pool="default", block=str(block.cidr), owner=owner)

    response = stub.RecordAllocations(
        pb.RecordAllocationsRequest(
            node="node-a",
            items=[item(good, "default", "web-0", "c-good"), item(bad, namespace, pod, "c-bad")],
        ),
        timeout=30,
    )
    first, second = response.results
    assert first.outcome == pb.RECORD_OUTCOME_RECORDED
    assert second.outcome == pb.RECORD_OUTCOME_INVALID
    too_long = pod if problem == "pod name" else namespace
    assert problem in second.message and f"{len(too_long)} characters" in second.message
    assert f"more than {63 if problem == 'namespace' else 253}" in second.message
    assert len(second.message) < 300  # the name is quoted cut short
    assert allocator.address_info(bad).record is None


class _Deadline:
    """The one thing `NodeStarts` reads of a call's context: the time its caller still waits."""

    def __init__(self, seconds: float | None) -> None:
        self.until = None if seconds is None else time.monotonic() + seconds

    def time_remaining(self) -> float | None:
        return None if self.until is None else max(0.0, self.until - time.monotonic())


def test_node_starts_take_turns_and_refuse_a_caller_who_would_give_up_first() -> None:
    starts = NodeStarts(limit=2)
    inside = threading.Barrier(3)
    leave = threading.Event()
    done: list[str] = []

    def busy(name: str) -> None:
        with starts.turn(_Deadline(10), "node report"):
            inside.wait(5)
            leave.wait(5)
            done.append(name)

    workers = [threading.Thread(target=busy, args=(f"w{i}",)) for i in range(2)]
    for w in workers:
        w.start()
    inside.wait(5)  # both turns are taken
    # A caller with 0.5 s left is refused before its deadline, and nothing of it is done.
    t0 = time.monotonic()
    with (
        pytest.raises(errors.Unavailable, match="busy with other nodes starting; try again"),
        starts.turn(_Deadline(0.5), "node report"),
    ):
        done.append("late")
    assert time.monotonic() - t0 < 0.5
    # One that can wait gets the next free turn.
    got: list[float] = []

    def patient() -> None:
        with starts.turn(_Deadline(5), "watch node"):
            got.append(time.monotonic())

    waiter = threading.Thread(target=patient)
    waiter.start()
    time.sleep(0.2)
    assert not got  # still waiting its turn
    leave.set()
    for t in (*workers, waiter):
        t.join(5)
    assert sorted(done) == ["w0", "w1"] and len(got) == 1


def test_health_answers_and_its_streams_never_take_the_unary_calls_threads(
    store: EtcdStore, etcd_prefix: str, tmp_path: Path
) -> None:
    """The health service is the blocking one of grpcio: an unknown service is NOT_FOUND (as
    grpcio's own server answers), and Watch streams, each holding a thread while open, leave
    the threads of the allocator's own calls free: with twice as many Watch streams open as
    the server has threads for unary calls, a ListPools still answers at once."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    server, _ = serve(
        Allocator(store, etcd_prefix), f"unix:{tmp_path}/h.sock", workers=4, health=servicer
    )
    watches: list[Any] = []
    try:
        with grpc.insecure_channel(f"unix:{tmp_path}/h.sock") as channel:
            checks = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.RpcError) as e:
                checks.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            ok = checks.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert ok.status == health_pb2.HealthCheckResponse.SERVING
            for _ in range(8):
                watches.append(checks.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60))
            assert next(watches[0]).status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.AllocatorServiceStub(channel)
            assert list(stub.ListPools(pb.ListPoolsRequest(), timeout=5).pools) == []
    finally:
        for w in watches:
            w.cancel()
        server.stop(None).wait(10)
