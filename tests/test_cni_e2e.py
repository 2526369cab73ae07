"""coil on a node, end to end: Debian's ptp plugin delegating to the installed coil plugin, the
real coild in a node namespace, the real coil-allocator process and a real etcd.

Every test runs in network namespaces it creates ("coilt-..."), and removes them."""

from __future__ import annotations

import ipaddress
import json
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from coil.v1 import allocator_pb2 as apb
from coil.v1 import allocator_pb2_grpc as apb_grpc
from tests.harness.cluster import (
    Pod,
    Proc,
    Runtime,
    add_pod,
    cni_args,
    del_pod,
    install_plugin,
    start_allocator,
    start_coild,
    wait_coild_ready,
    wait_until,
)
from tests.harness.etcd import EtcdServer
from tests.harness.net import Netns

pytestmark = [pytest.mark.root, pytest.mark.slow]

PREFIX = "coilt-"
NODE = "node-1"


@dataclass
class Node:
    ns: Netns
    tmp: Path
    allocator_addr: str
    socket: Path
    runtime: Runtime
    coild: Proc
    allocator: Proc
    extra: list[str]

    def stub(self) -> apb_grpc.AllocatorServiceStub:
        return apb_grpc.AllocatorServiceStub(grpc.insecure_channel(self.allocator_addr))

    def restart_coild(self, kill: bool = False) -> None:
        if kill:
            self.coild.popen.send_signal(signal.SIGKILL)
            self.coild.popen.wait(timeout=10)
        else:
            self.coild.stop()
        self.coild = start_coild(
            self.ns, NODE, self.allocator_addr, self.socket, self.tmp / "coild.log", self.extra
        )

    def table(self, table: str = "119") -> set[tuple[str, str]]:
        """(destination, protocol) of every route in the node's table, both families."""
        routes = self.ns.routes(table, "-4") + self.ns.routes(table, "-6")
        return {(r["dst"], str(r.get("protocol", ""))) for r in routes}

    def held_blocks(self) -> set[str]:
        listed = self.stub().ListNodeBlocks(apb.ListNodeBlocksRequest(node=NODE), timeout=5)
        return {b.cidr for b in listed.blocks}


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cni-bin")
    install_plugin(d)
    return d


@pytest.fixture
def node(
    etcd_server: EtcdServer, plugin_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Node]:
    """One node: the allocator (its own etcd prefix), a node namespace with coild, and pools
    `default` (dual-stack, blocks of 2^3) and `team-a` (IPv4)."""
    prefix = f"/coil-e2e-{uuid.uuid4().hex[:8]}/"
    addr = f"unix:{tmp_path}/allocator.sock"
    allocator = start_allocator(etcd_server.endpoint, prefix, addr, tmp_path / "allocator.log")
    ns = Netns.create(PREFIX)
    coild: Proc | None = None
    try:
        ns.sysctl("net.ipv4.ip_forward", "1")
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")
        with grpc.insecure_channel(addr) as ch:
            stub = apb_grpc.AllocatorServiceStub(ch)
            stub.CreatePool(
                apb.CreatePoolRequest(
                    name="default", subnets=["10.100.0.0/24", "fd00:100::/120"], block_size_bits=3
                )
            )
            stub.CreatePool(
                apb.CreatePoolRequest(name="team-a", subnets=["10.200.0.0/26"], block_size_bits=3)
            )
        marker = request.node.get_closest_marker("coild_args")
        extra = list(marker.args) if marker else ["--release-grace", "1"]
        socket = tmp_path / "coild.sock"
        coild = start_coild(ns, NODE, addr, socket, tmp_path / "coild.log", extra)
        runtime = Runtime(ns, plugin_dir, socket)
        n = Node(ns, tmp_path, addr, socket, runtime, coild, allocator, extra)
        yield n
        # Tests restart these; stop the ones running now.
        coild, allocator = n.coild, n.allocator
    finally:
        if coild is not None:
            coild.stop()
        allocator.stop()
        ns.delete()


@pytest.fixture
def pods(node: Node) -> Iterator[list[Pod]]:
    """Pods a test made; each is deleted (DEL, then its namespace) afterwards."""
    made: list[Pod] = []
    yield made
    for pod in made:
        node.runtime.call("DEL", pod.container_id, pod.ns.path, args=pod.cni_args)
        pod.ns.delete()


def addr_of(pod: Pod, family: int = 4) -> str:
    for cidr in pod.result.ips():
        if ipaddress.ip_interface(cidr).version == family:
            return cidr.split("/")[0]
    raise AssertionError(f"pod {pod.name} has no IPv{family} address: {pod.result.out}")


def record_of(node: Node, address: str) -> apb.GetAddressResponse:
    return node.stub().GetAddress(apb.GetAddressRequest(address=address), timeout=5)


# -- ADD, CHECK, DEL through ptp ---------------------------------------------------------------


def test_ptp_add_check_del_dual_stack(node: Node, pods: list[Pod]) -> None:
    pod = add_pod(node.runtime, PREFIX, namespace="web", name="web-0")
    pods.append(pod)
    ips = pod.result.out["ips"]  # type: ignore[index]
    v4 = ipaddress.ip_interface(ips[0]["address"])
    v6 = ipaddress.ip_interface(ips[1]["address"])
    assert v4.network == ipaddress.ip_network("10.100.0.0/24") and ips[0]["gateway"] == "10.100.0.1"
    assert (
        v6.network == ipaddress.ip_network("fd00:100::/120") and ips[1]["gateway"] == "fd00:100::1"
    )
    # The pod's interface really has both addresses, and the record names the pod.
    assert {str(v4), str(v6)} <= set(pod.ns.addresses("eth0"))
    record = record_of(node, str(v4.ip)).record
    assert (record.owner.namespace, record.owner.pod) == ("web", "web-0")
    assert record.owner.container_id == pod.container_id and record.node == NODE
    # CHECK with the result as prevResult (spec 1.0.0 runs the IPAM plugin's CHECK too).
    check = node.runtime.call(
        "CHECK",
        pod.container_id,
        pod.ns.path,
        args=pod.cni_args,
        config=node.runtime.config(prevResult=pod.result.out),
    )
    assert check.ok, check
    # DEL frees both records; a second DEL of the same attachment still succeeds.
    pods.remove(pod)
    assert del_pod(node.runtime, pod).ok
    assert not record_of(node, str(v4.ip)).HasField("record")
    assert not record_of(node, str(v6.ip)).HasField("record")
    again = node.runtime.call("DEL", pod.container_id, "", args=pod.cni_args)
    assert again.ok, again


def test_pods_reach_each_other_and_the_node(node: Node, pods: list[Pod]) -> None:
    a = add_pod(node.runtime, PREFIX, name="a")
    pods.append(a)
    b = add_pod(node.runtime, PREFIX, name="b")
    pods.append(b)
    for family in (4, 6):
        assert a.ns.ping(addr_of(b, family)), f"a cannot reach b over IPv{family}"
        assert b.ns.ping(addr_of(a, family)), f"b cannot reach a over IPv{family}"
        assert node.ns.ping(addr_of(a, family)), f"the node cannot reach a over IPv{family}"
    assert a.ns.ping("10.100.0.1"), "a cannot reach the node (its gateway)"


def test_repeated_add_returns_the_same_addresses(node: Node, pods: list[Pod]) -> None:
    pod = add_pod(node.runtime, PREFIX, name="same")
    pods.append(pod)
    # The runtime retries ADD for the same attachment (e.g. after a timeout): same answer.
    again = node.runtime.call(
        "ADD",
        pod.container_id,
        pod.ns.path,
        args=pod.cni_args,
        plugin=str(node.runtime.plugin_dir / "coil"),
    )
    assert again.ok and again.ips() == pod.result.ips()


def test_namespace_pool_and_default(node: Node, pods: list[Pod]) -> None:
    team = add_pod(node.runtime, PREFIX, namespace="team-a", name="t0")
    pods.append(team)
    other = add_pod(node.runtime, PREFIX, namespace="team-b", name="o0")
    pods.append(other)
    assert [ipaddress.ip_interface(c).network for c in team.result.ips()] == [
        ipaddress.ip_network("10.200.0.0/26")
    ]
    assert ipaddress.ip_interface(other.result.ips()[0]).network == ipaddress.ip_network(
        "10.100.0.0/24"
    )


def test_static_address(node: Node, pods: list[Pod]) -> None:
    conf = {"capabilities": {"ips": True}, "runtimeConfig": {"ips": ["10.100.0.77/24"]}}
    pod = add_pod(node.runtime, PREFIX, name="static", **conf)
    pods.append(pod)
    assert pod.result.ips() == ["10.100.0.77/24"]
    assert record_of(node, "10.100.0.77").record.owner.pod == "static"
    # The same address for another pod is refused with coil's "address in use" code.
    ns = Netns.create(PREFIX)
    try:
        taken = node.runtime.call(
            "ADD",
            uuid.uuid4().hex,
            ns.path,
            args=cni_args("default", "thief"),
            config=node.runtime.config(**conf),
        )
        assert taken.code != 0 and taken.out and taken.out["code"] == 102, taken
        assert "10.100.0.77" in taken.out["msg"] + taken.out.get("details", "")
        outside = node.runtime.call(
            "ADD",
            uuid.uuid4().hex,
            ns.path,
            args=cni_args("default", "lost"),
            config=node.runtime.config(runtimeConfig={"ips": ["192.0.2.9/24"]}),
        )
        assert outside.out and outside.out["code"] == 7, outside
        assert "192.0.2.9" in json.dumps(outside.out)
    finally:
        ns.delete()


def test_static_address_from_cni_args_ip(node: Node, pods: list[Pod]) -> None:
    """podman's --ip: CNI_ARGS IP= through ptp to coil, honoured like runtimeConfig.ips."""
    ns = Netns.create(PREFIX)
    container_id = uuid.uuid4().hex
    args = cni_args("default", "podman-ip") + ";IP=10.100.0.78"
    try:
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")
        result = node.runtime.call("ADD", container_id, ns.path, args=args)
        assert result.ok, result
        pods.append(Pod(ns, container_id, "default", "podman-ip", result))
    except BaseException:
        ns.delete()
        raise
    assert result.ips() == ["10.100.0.78/24"]
    assert "10.100.0.78/24" in ns.addresses("eth0")
    assert record_of(node, "10.100.0.78").record.owner.pod == "podman-ip"
    # A second IPv4 address from another source: coild refuses two of a family, nothing is held.
    other = Netns.create(PREFIX)
    try:
        refused = node.runtime.call(
            "ADD",
            uuid.uuid4().hex,
            other.path,
            args=cni_args("default", "two") + ";IP=10.100.0.79",
            config=node.runtime.config(runtimeConfig={"ips": ["10.100.0.80/24"]}),
        )
        assert refused.out and refused.out["code"] == 7, refused
        assert "at most one per family" in refused.out["details"]
        bad = node.runtime.call(
            "ADD",
            uuid.uuid4().hex,
            other.path,
            args=cni_args("default", "bad") + ";IP=10.100.0.300",
        )
        assert bad.out and bad.out["code"] == 7, bad
        assert "CNI_ARGS IP: '10.100.0.300'" in bad.out["msg"]
    finally:
        other.delete()
    for address in ("10.100.0.79", "10.100.0.80"):
        assert not record_of(node, address).HasField("record")


def test_del_of_unknown_attachment_succeeds(node: Node) -> None:
    result = node.runtime.call("DEL", uuid.uuid4().hex, "", args=cni_args("default", "ghost"))
    assert result.ok and result.out is None


# -- routes --------------------------------------------------------------------------------------


def test_table_119_follows_blocks(node: Node, pods: list[Pod]) -> None:
    # A foreign route in table 119 with another protocol must survive everything below.
    node.ns.ip("route", "add", "blackhole", "192.0.2.0/24", "table", "119", "proto", "static")
    first = add_pod(node.runtime, PREFIX, namespace="team-a", name="fill-0")
    pods.append(first)
    # Fill the team-a block (2^3 = 8 addresses; the subnet's network address and gateway are
    # reserved in the first block) until a second block is claimed.
    while len([b for b in node.held_blocks() if b.startswith("10.200.")]) < 2:
        assert len(pods) < 20, "no second block was claimed"
        pods.append(add_pod(node.runtime, PREFIX, namespace="team-a", name=f"fill-{len(pods)}"))

    def table_matches() -> bool:
        ours = {dst for dst, proto in node.table() if proto == "30"}
        return ours == node.held_blocks()

    wait_until("table 119 to hold exactly the node's blocks", table_matches, timeout=10)
    assert ("192.0.2.0/24", "static") in node.table()
    # Delete every team-a pod but the first: the younger block empties and, after the grace
    # period, goes back to the pool; the block of the first pod is kept (the last block).
    held = {b for b in node.held_blocks() if b.startswith("10.200.")}
    kept = {b for b in held if ipaddress.ip_address(addr_of(first)) in ipaddress.ip_network(b)}
    for pod in list(pods):
        if pod is not first:
            pods.remove(pod)
            assert del_pod(node.runtime, pod).ok
    gone = held - kept
    assert len(gone) == 1
    wait_until(
        "emptied block to return to the pool",
        lambda: not (gone & node.held_blocks()),
        timeout=15,
    )
    wait_until("its route to leave table 119", table_matches, timeout=10)
    assert not any(dst in gone for dst, _ in node.table())
    assert kept <= node.held_blocks()
    assert ("192.0.2.0/24", "static") in node.table()


# -- restarts ------------------------------------------------------------------------------------


def test_coild_killed_between_add_and_del(node: Node, pods: list[Pod]) -> None:
    before = add_pod(node.runtime, PREFIX, name="before")
    pods.append(before)
    node.restart_coild(kill=True)
    # After the restart coild rebuilt its state: CHECK knows the pod, a new pod gets a new
    # address, and DEL of the old pod frees its record.
    check = node.runtime.call(
        "CHECK",
        before.container_id,
        before.ns.path,
        args=before.cni_args,
        config=node.runtime.config(prevResult=before.result.out),
    )
    assert check.ok, check
    after = add_pod(node.runtime, PREFIX, name="after")
    pods.append(after)
    assert not set(after.result.ips()) & set(before.result.ips())
    pods.remove(before)
    assert del_pod(node.runtime, before).ok
    assert not record_of(node, addr_of(before)).HasField("record")
    assert record_of(node, addr_of(after)).record.owner.pod == "after"
    # Routes were re-synced from the rebuilt state.
    assert {d for d, p in node.table() if p == "30"} == node.held_blocks()


# -- CNI 1.1: GC and STATUS, driven directly as libcni does ---------------------------------------


def direct(node: Node, command: str, conf: dict, **env: str):  # type: ignore[no-untyped-def]
    runtime = Runtime(node.ns, node.runtime.plugin_dir, node.socket, cni_version="1.1.0")
    config = runtime.config(**conf)
    config["type"] = "coil"
    del config["ipam"]
    config["ipam"] = {"type": "coil", "socket": str(node.socket)}
    return runtime.call(
        command,
        env.get("cid", ""),
        "",
        ifname=env.get("ifname", ""),
        config=config,
        plugin=str(node.runtime.plugin_dir / "coil"),
    )


def test_gc_releases_what_the_runtime_no_longer_knows(node: Node, pods: list[Pod]) -> None:
    keep = add_pod(node.runtime, PREFIX, name="keep")
    pods.append(keep)
    leak = add_pod(node.runtime, PREFIX, name="leak")
    pods.append(leak)
    result = direct(
        node,
        "GC",
        {"cni.dev/valid-attachments": [{"containerID": keep.container_id, "ifname": "eth0"}]},
    )
    assert result.ok, result
    assert not record_of(node, addr_of(leak)).HasField("record")
    assert record_of(node, addr_of(keep)).record.owner.pod == "keep"


def test_status(node: Node) -> None:
    assert direct(node, "STATUS", {}).ok
    node.coild.stop()
    try:
        down = direct(node, "STATUS", {})
        assert down.out and down.out["code"] == 50, down
        add = node.runtime.call(
            "ADD",
            uuid.uuid4().hex,
            "/var/run/netns/none",
            args=cni_args("default", "x"),
            plugin=str(node.runtime.plugin_dir / "coil"),
        )
        assert add.out and add.out["code"] == 11, add
    finally:
        node.restart_coild()


def test_allocator_down_gives_try_again_then_recovers(node: Node, pods: list[Pod]) -> None:
    node.allocator.stop()
    ns = Netns.create(PREFIX)
    try:
        started = time.monotonic()
        result = node.runtime.call(
            "ADD",
            uuid.uuid4().hex,
            ns.path,
            args=cni_args("default", "waiting"),
            plugin=str(node.runtime.plugin_dir / "coil"),
        )
        assert result.out and result.out["code"] == 11, result
        assert time.monotonic() - started < 15
        assert direct(node, "STATUS", {}).out["code"] == 50  # type: ignore[index]
    finally:
        ns.delete()
    # The allocator comes back on the same address: coild recovers with no restart.
    node.allocator = start_allocator(
        node.allocator.popen.args[node.allocator.popen.args.index("--etcd-endpoints") + 1],  # type: ignore[union-attr]
        node.allocator.popen.args[node.allocator.popen.args.index("--etcd-prefix") + 1],  # type: ignore[union-attr]
        node.allocator_addr,
        node.tmp / "allocator.log",
    )
    wait_coild_ready(node.socket)
    pods.append(add_pod(node.runtime, PREFIX, name="back"))


def test_pool_exhausted_is_code_101_until_a_del(node: Node, pods: list[Pod]) -> None:
    stub = node.stub()
    stub.CreatePool(
        apb.CreatePoolRequest(name="tiny", subnets=["10.250.0.0/29"], block_size_bits=3)
    )
    # One block of 8: network address and gateway reserved, broadcast too: 5 pods fit.
    made = []
    while True:
        ns = Netns.create(PREFIX)
        cid = uuid.uuid4().hex
        r = node.runtime.call("ADD", cid, ns.path, args=cni_args("tiny", f"t{len(made)}"))
        if not r.ok:
            ns.delete()
            break
        made.append(Pod(ns, cid, "tiny", f"t{len(made)}", r))
        pods.append(made[-1])
        assert len(made) <= 8
    assert len(made) == 5, [p.result.ips() for p in made]
    assert r.out and r.out["code"] == 101 and "exhausted" in r.out["msg"], r
    pods.remove(made[0])
    assert del_pod(node.runtime, made[0]).ok
    pods.append(add_pod(node.runtime, PREFIX, namespace="tiny", name="fits-again"))


def test_coild_keeps_a_lease_and_reports_its_routes(node: Node, pods: list[Pod]) -> None:
    pods.append(add_pod(node.runtime, PREFIX, name="lease"))
    stub = node.stub()

    def audit_clean() -> bool:
        findings = stub.CheckStore(apb.CheckStoreRequest(), timeout=10).findings
        return not [f for f in findings if f.severity >= apb.SEVERITY_WARNING]

    # coild's heartbeat (every 30 s, first one right after start) carries its table's routes.
    wait_until("coild to report its lease and routes", audit_clean, timeout=40)
    with pytest.raises(grpc.RpcError) as refused:
        stub.ReleaseNode(apb.ReleaseNodeRequest(node=NODE), timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "agent is alive" in (refused.value.details() or "")
