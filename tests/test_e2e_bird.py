"""End to end with routing: three nodes (network namespaces on one bridge) running coild and BIRD
over iBGP, etcd and coil-allocator behind them, pods attached through ptp with coil as IPAM.

Pods on different nodes reach each other only through routes BIRD learned over BGP; blocks claimed
and returned by coild appear and disappear in every node's kernel; a lost node's blocks come back
through ReleaseNode; namespace pools and exhaustion behave as the CNI runtime sees them.

One cluster serves the module (built once, always removed). Each test uses pools of its own, with
small blocks so that they fill quickly. The lost-node test removes a node for good and therefore
runs last.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coil.v1 import allocator_pb2 as apb
from tests.harness.bgp_cluster import Cluster, ClusterPod, Node
from tests.harness.bird import BIRD
from tests.harness.cluster import BIN, SYSTEM_CNI, wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]

POOL_EXHAUSTED = 101
RELEASE_GRACE = 2.0
# Bounds of the polls below: BIRD rescans table 119 every 2 s (netlink usually tells it at once),
# coild maintains its blocks every 2 s, and a dead BGP peer is dropped after a 6 s hold time.
ROUTE_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for tool in (BIRD, f"{SYSTEM_CNI}/ptp"):
        if not Path(tool).exists():
            pytest.skip(f"{tool} is not installed (scripts/deps.sh installs it)")
    c = Cluster(
        prefix=f"coilbgp{uuid.uuid4().hex[:4]}-",
        workdir=tmp_path_factory.mktemp("bgp"),
        release_grace=RELEASE_GRACE,
        keep_logs=True,  # pytest's temporary directory, kept for the last few runs
    )
    c.start()
    try:
        c.create_pool("default", ["10.100.0.0/16", "fd00:100::/112"], 5)
        c.wait_bgp()
        yield c
    finally:
        c.stop()


# -- helpers ---------------------------------------------------------------------------------


def main_route(node: Node, cidr: str) -> dict[str, Any] | None:
    """The node's main-table route to exactly `cidr`, or None."""
    family = "-6" if ":" in cidr else "-4"
    return next((r for r in node.table("main", family) if r.get("dst") == cidr), None)


def table119(node: Node) -> set[str]:
    return {str(r.get("dst")) for fam in ("-4", "-6") for r in node.table("119", fam)}


def wait_bgp_route(node: Node, cidr: str, via: Node) -> dict[str, Any]:
    """Wait until `node` routes `cidr` through `via`'s underlay address with a route from BIRD."""
    gateway = via.ipv6 if ":" in cidr else via.ipv4

    def routed() -> dict[str, Any] | None:
        route = main_route(node, cidr)
        if route and route.get("protocol") == "bird" and route.get("gateway") == gateway:
            return route
        return None

    route: dict[str, Any] = wait_until(
        f"{node.name}: route to {cidr} via {via.name} ({gateway}) from BIRD",
        routed,
        timeout=ROUTE_TIMEOUT,
    )
    return route


def wait_no_route(node: Node, cidr: str) -> None:
    wait_until(
        f"{node.name}: route to {cidr} gone",
        lambda: main_route(node, cidr) is None,
        timeout=ROUTE_TIMEOUT,
    )


def block_of(cluster: Cluster, pod: ClusterPod, version: int) -> str:
    """The block (CIDR) of the pod's address of that version, as the allocator reports it."""
    address = pod.address(version)
    assert address is not None, f"{pod.name} has no IPv{version} address: {pod.cidrs}"
    return str(cluster.stub.GetAddress(apb.GetAddressRequest(address=address), timeout=10).block)


def pool_blocks(cluster: Cluster, node: Node, pool: str) -> list[apb.Block]:
    return [b for b in cluster.node_blocks(node) if b.pool == pool]


def release_node(cluster: Cluster, name: str) -> str:
    """Give back a lost node's blocks with `coilctl node release NAME --yes --force`; returns what
    coilctl said. Without --force it must refuse: the lost node's lease (90 s) has not run out."""
    command = [str(BIN / "coilctl"), "--allocator", cluster.allocator_addr, "node", "release", name]
    refused = subprocess.run([*command, "--yes"], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1 and "agent is alive" in refused.stderr, refused
    proc = subprocess.run(
        [*command, "--yes", "--force"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, f"coilctl node release {name}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def delete_all(cluster: Cluster, pods: list[ClusterPod]) -> None:
    for pod in pods:
        result = cluster.del_pod(pod)
        assert result.ok, f"DEL {pod.name}: {result.out} {result.stderr}"


# -- tests -----------------------------------------------------------------------------------


def test_pods_on_different_nodes_reach_each_other_through_bgp_routes(cluster: Cluster) -> None:
    pods = [cluster.add_pod(node, "default") for node in cluster.live_nodes]
    try:
        for src in pods:
            for dst in pods:
                if src is dst:
                    continue
                for version in (4, 6):
                    block = block_of(cluster, dst, version)
                    assert block in table119(dst.node), f"{dst.node.name} does not export {block}"
                    route = wait_bgp_route(src.node, block, via=dst.node)
                    assert route["protocol"] == "bird"
                    address = dst.address(version)
                    assert address is not None
                    assert src.pod.ns.ping(address, timeout=2), (
                        f"{src.name}@{src.node.name} cannot reach {address} "
                        f"({dst.name}@{dst.node.name}) over {route}"
                    )
    finally:
        delete_all(cluster, pods)


def test_a_new_block_is_routed_everywhere_and_an_empty_one_returns_after_grace(
    cluster: Cluster,
) -> None:
    # Blocks of 8 addresses: a handful of pods fill one and make the node claim another.
    cluster.create_pool("grow", ["10.210.0.0/24"], 3)
    node, *others = cluster.live_nodes
    pods: list[ClusterPod] = []
    try:
        for _ in range(12):
            pods.append(cluster.add_pod(node, "grow"))
            if len(pool_blocks(cluster, node, "grow")) >= 2:
                break
        blocks = pool_blocks(cluster, node, "grow")
        assert len(blocks) >= 2, f"{len(pods)} pods on {node.name} claimed only {blocks}"
        newest = max(blocks, key=lambda b: b.claim_revision)
        wait_until(
            f"{node.name} exports {newest.cidr} in table 119",
            lambda: newest.cidr in table119(node),
            timeout=ROUTE_TIMEOUT,
        )
        for other in others:
            wait_bgp_route(other, newest.cidr, via=node)

        delete_all(cluster, pods)
        pods = []
        # Empty blocks go back after the grace period; coild keeps the last one.
        kept = wait_until(
            f"{node.name} returns empty blocks of pool grow",
            lambda: (held := pool_blocks(cluster, node, "grow")) and len(held) == 1 and held,
            timeout=RELEASE_GRACE + ROUTE_TIMEOUT,
        )
        returned = {b.cidr for b in blocks} - {b.cidr for b in kept}
        assert returned, f"no block of {[b.cidr for b in blocks]} was returned"
        pool = cluster.stub.GetPool(apb.GetPoolRequest(name="grow"), timeout=10)
        still_held = {b.cidr for s in pool.subnets for b in s.held}
        assert not returned & still_held
        for cidr in returned:
            wait_until(
                f"{node.name}: {cidr} gone from table 119",
                lambda cidr=cidr: cidr not in table119(node),
                timeout=ROUTE_TIMEOUT,
            )
            for other in others:
                wait_no_route(other, cidr)
    finally:
        delete_all(cluster, pods)


def test_a_namespace_pool_serves_only_its_namespace(cluster: Cluster) -> None:
    cluster.create_pool("team-t", ["10.220.0.0/24"], 4)
    team_net = ipaddress.ip_network("10.220.0.0/24")
    default_nets = [ipaddress.ip_network("10.100.0.0/16"), ipaddress.ip_network("fd00:100::/112")]
    first, second = cluster.live_nodes[:2]
    pods = [
        cluster.add_pod(first, "team-t"),
        cluster.add_pod(second, "team-t"),
        cluster.add_pod(first, "team-u"),
    ]
    try:
        for pod in pods[:2]:
            addresses = [ipaddress.ip_interface(c).ip for c in pod.cidrs]
            assert len(addresses) == 1 and addresses[0] in team_net, pod.cidrs
        other = [ipaddress.ip_interface(c).ip for c in pods[2].cidrs]
        assert len(other) == 2, pods[2].cidrs
        assert all(any(a in n for n in default_nets) for a in other), pods[2].cidrs
        for pod in pods:
            address = pod.address(4)
            assert address is not None
            record = cluster.stub.GetAddress(apb.GetAddressRequest(address=address), timeout=10)
            want = "team-t" if pod.namespace == "team-t" else "default"
            assert record.pool == want and record.record.owner.namespace == pod.namespace
        # The team's pods on two nodes reach each other through the team block's BGP route.
        wait_bgp_route(first, block_of(cluster, pods[1], 4), via=second)
        address = pods[1].address(4)
        assert address is not None and pods[0].pod.ns.ping(address, timeout=2)
    finally:
        delete_all(cluster, pods)


def test_an_exhausted_pool_fails_with_101_until_a_delete_frees_room(cluster: Cluster) -> None:
    # 10.230.0.0/29 in blocks of 4: 8 addresses, less the network address, the gateway and the
    # broadcast address, leave 5 for pods.
    cluster.create_pool("tiny", ["10.230.0.0/29"], 2)
    node = cluster.live_nodes[1]
    pods: list[ClusterPod] = []
    try:
        failed = None
        for _ in range(8):
            pod, result = cluster.try_add_pod(node, "tiny")
            if pod is None:
                failed = result
                break
            pods.append(pod)
        assert failed is not None, f"{len(pods)} pods fit in a pool of 8 addresses"
        assert len(pods) == 5, [p.cidrs for p in pods]
        assert failed.out is not None and failed.out.get("code") == POOL_EXHAUSTED, failed.out
        assert "tiny" in str(failed.out.get("msg", "")) + str(failed.out.get("details", ""))

        freed = pods.pop(0)
        assert cluster.del_pod(freed).ok
        pod = cluster.add_pod(node, "tiny")
        pods.append(pod)
        assert ipaddress.ip_interface(pod.cidrs[0]).ip in ipaddress.ip_network("10.230.0.0/29")
    finally:
        delete_all(cluster, pods)


def test_a_lost_nodes_blocks_come_back_through_release_node(cluster: Cluster) -> None:
    """Runs last: the node it loses stays lost."""
    # One block of 8 addresses in the whole pool: whoever holds it is the only node that can
    # serve the namespace.
    cluster.create_pool("solo", ["10.240.0.0/29"], 3)
    survivor, watcher, victim = cluster.live_nodes[:3]
    cluster.add_pod(victim, "solo")
    (block,) = [b.cidr for b in pool_blocks(cluster, victim, "solo")]
    wait_bgp_route(watcher, block, via=victim)

    pod, result = cluster.try_add_pod(survivor, "solo")
    assert pod is None and result.out is not None, "a second node got an address of a full pool"
    assert result.out.get("code") == POOL_EXHAUSTED, result.out

    victim_routes = [b.cidr for b in cluster.node_blocks(victim)]
    cluster.lose_node(victim)
    said = release_node(cluster, victim.name)
    assert block in said, said
    assert cluster.node_blocks(victim) == []

    pod = cluster.add_pod(survivor, "solo")
    try:
        assert block_of(cluster, pod, 4) == block
        assert block in table119(survivor)
        # The watcher now reaches the block through the survivor; the dead node's other routes
        # went with its BGP session.
        wait_bgp_route(watcher, block, via=survivor)
        for cidr in victim_routes:
            if cidr != block:
                wait_no_route(watcher, cidr)
        address = pod.address(4)
        assert address is not None
        helper = cluster.add_pod(watcher, "default")
        try:
            assert helper.pod.ns.ping(address, timeout=2)
        finally:
            delete_all(cluster, [helper])
    finally:
        delete_all(cluster, [pod])
