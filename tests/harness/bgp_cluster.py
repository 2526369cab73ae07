"""A coil cluster on one machine, routed by BIRD: etcd, coil-allocator, and nodes that are network
namespaces joined by one L2 segment, each running coild and BIRD; pods are namespaces attached to
a node through ptp with coil as IPAM. Used by the demo (tests/harness/demo.py) and the end-to-end
suite (tests/test_e2e_bird.py).

Topology (N nodes, default 3)::

        PREFIXswitch: bridge br0 (no address)
          |            |            |
        eth0         eth0         eth0          100.64.250.N/24, fd99::N/64
    PREFIXnode1  PREFIXnode2  PREFIXnode3     coild + BIRD, iBGP full mesh
       |  |         |  |         |  |
      pods         pods         pods           ptp veths, addresses from coil's pools

Everything the cluster creates is recorded in a state file in its work directory as it is
created (process ids, namespace names, directories), and every namespace name starts with the
cluster's prefix, so `down()` can remove the leftovers of a run that was killed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from coil.v1 import allocator_pb2 as apb
from coil.v1 import allocator_pb2_grpc as apb_grpc
from tests.harness.bird import Bird, BirdSettings, Peer, render_config, start_bird
from tests.harness.cluster import (
    CniResult,
    Pod,
    Proc,
    Runtime,
    cni_args,
    install_plugin,
    start_allocator,
    start_coild,
    wait_coild_ready,
    wait_until,
)
from tests.harness.etcd import EtcdServer, start_etcd
from tests.harness.net import Netns, cleanup_prefix, run

UNDERLAY4 = ipaddress.IPv4Network("100.64.250.0/24")
"""The nodes' IPv4 segment: shared address space (RFC 6598), only ever inside our namespaces."""
UNDERLAY6 = ipaddress.IPv6Network("fd99::/64")
"""The nodes' IPv6 segment (a ULA prefix), only ever inside our namespaces."""

STATE_FILE = "state"
# What a recorded process's command line must contain for `down` to kill it: a recorded pid that
# now belongs to some other program is left alone.
_PROCESS_MARKERS = ("etcd", "coil-allocator", "coild", "bird")


@dataclass
class Node:
    """A node: a namespace on the shared segment with coild and BIRD in it."""

    name: str
    ns: Netns
    peer: Peer
    socket: Path
    runtime: Runtime
    coild: Proc | None = None
    bird: Bird | None = None
    lost: bool = False

    @property
    def ipv4(self) -> str:
        return str(self.peer.ipv4)

    @property
    def ipv6(self) -> str:
        return str(self.peer.ipv6)

    def table(self, table: str, family: str) -> list[dict[str, Any]]:
        """Routes of one kernel table of the node, as `ip -j route` reports them."""
        return self.ns.routes(table, family)


@dataclass(eq=False)
class ClusterPod:
    """A pod attached to a node (compared and hashed by identity)."""

    node: Node
    pod: Pod

    @property
    def name(self) -> str:
        return self.pod.name

    @property
    def namespace(self) -> str:
        return self.pod.namespace

    @property
    def cidrs(self) -> list[str]:
        """The pod's addresses with prefix length, as the CNI result gave them."""
        return self.pod.result.ips()

    def address(self, version: int) -> str | None:
        """The pod's address of that IP version, without prefix length; None if it has none."""
        for cidr in self.cidrs:
            iface = ipaddress.ip_interface(cidr)
            if iface.version == version:
                return str(iface.ip)
        return None


class PodAddFailed(RuntimeError):
    """ADD failed; `result` holds the CNI error (its `out["code"]`)."""

    def __init__(self, message: str, result: CniResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class Cluster:
    """A whole cluster; `start()` builds it, `stop()` removes everything it built."""

    prefix: str
    workdir: Path
    node_names: tuple[str, ...] = ("node1", "node2", "node3")
    release_grace: float = 60.0
    bird_settings: BirdSettings = field(default_factory=BirdSettings)
    keep_logs: bool = False
    """Leave the work directory (logs, BIRD configurations) in place when stopping."""
    etcd: EtcdServer | None = None
    allocator: Proc | None = None
    switch: Netns | None = None
    nodes: list[Node] = field(default_factory=list)
    pods: list[ClusterPod] = field(default_factory=list)
    _channel: grpc.Channel | None = None

    # -- building ---------------------------------------------------------------------------

    @property
    def allocator_addr(self) -> str:
        return f"unix:{self.workdir / 'allocator.sock'}"

    @property
    def state_path(self) -> Path:
        return self.workdir / STATE_FILE

    def _record(self, kind: str, value: object) -> None:
        with self.state_path.open("a") as f:
            f.write(f"{kind} {value}\n")

    def _netns(self, suffix: str) -> Netns:
        """A namespace named prefix+suffix, recorded before it exists, with loopback up."""
        name = f"{self.prefix}{suffix}"
        self._record("netns", name)
        run("ip", "netns", "add", name)
        ns = Netns(name)
        ns.ip("link", "set", "lo", "up")
        return ns

    def start(self) -> None:
        """Build the cluster: etcd, the allocator, the segment, the nodes with coild and BIRD.
        On failure everything built so far is removed and the error propagates."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._record("dir", self.workdir)
        self.etcd = start_etcd("coil-cluster")
        self._record("pid", self.etcd.proc.pid)
        self._record("dir", self.etcd.data_dir)
        self.allocator = start_allocator(
            self.etcd.endpoint, "/coil/", self.allocator_addr, self.workdir / "allocator.log"
        )
        self._record("pid", self.allocator.popen.pid)
        plugin_dir = install_plugin(self.workdir / "cni").parent

        self.switch = self._netns("switch")
        self.switch.sysctl("net.ipv6.conf.all.disable_ipv6", "1")
        self.switch.sysctl("net.ipv6.conf.default.disable_ipv6", "1")
        self.switch.ip("link", "add", "br0", "type", "bridge", "stp_state", "0")
        self.switch.ip("link", "set", "br0", "up")
        for i, name in enumerate(self.node_names, start=1):
            self.nodes.append(self._make_node(i, name, plugin_dir))

        peers = [n.peer for n in self.nodes]
        for node in self.nodes:
            (self.workdir / node.name).mkdir(exist_ok=True)
            node.coild = start_coild(
                node.ns,
                node.name,
                self.allocator_addr,
                node.socket,
                self.workdir / node.name / "coild.log",
                extra=["--release-grace", str(self.release_grace)],
                wait=False,
            )
            self._record("pid", node.coild.popen.pid)
        for node in self.nodes:
            assert node.coild is not None
            wait_coild_ready(node.socket, node.coild)
            conf = self.workdir / f"{node.name}.bird.conf"
            conf.write_text(render_config(node.peer, peers, self.bird_settings))
            node.bird = start_bird(
                node.ns, conf, self.workdir, self.workdir / f"{node.name}.bird.log"
            )
            self._record("pid", node.bird.proc.popen.pid)

    def _make_node(self, index: int, name: str, plugin_dir: Path) -> Node:
        ns = self._netns(name)
        # Before any interface exists, so that every later one inherits them.
        for key, value in (
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
        ):
            ns.sysctl(key, value)
        assert self.switch is not None
        port = f"p-{name}"[:15]
        run(
            "ip", "link", "add", "eth0", "netns", ns.name, "type", "veth",
            "peer", "name", port, "netns", self.switch.name,
        )  # fmt: skip
        self.switch.ip("link", "set", port, "master", "br0")
        self.switch.ip("link", "set", port, "up")
        ipv4, ipv6 = UNDERLAY4[index], UNDERLAY6[index]
        ns.ip("addr", "add", f"{ipv4}/{UNDERLAY4.prefixlen}", "dev", "eth0")
        ns.ip("addr", "add", f"{ipv6}/{UNDERLAY6.prefixlen}", "dev", "eth0", "nodad")
        ns.ip("link", "set", "eth0", "up")
        socket = self.workdir / name / "coild.sock"
        return Node(
            name,
            ns,
            Peer(name, ipv4, ipv6),
            socket,
            Runtime(ns, plugin_dir, socket),
        )

    # -- the allocator ----------------------------------------------------------------------

    @property
    def stub(self) -> apb_grpc.AllocatorServiceStub:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.allocator_addr)
        return apb_grpc.AllocatorServiceStub(self._channel)

    def create_pool(self, name: str, subnets: Iterable[str], block_size_bits: int) -> apb.Pool:
        answer = self.stub.CreatePool(
            apb.CreatePoolRequest(
                name=name, subnets=list(subnets), block_size_bits=block_size_bits
            ),
            timeout=10,
        )
        return answer.pool

    def node_blocks(self, node: Node | str) -> list[apb.Block]:
        name = node if isinstance(node, str) else node.name
        try:
            return list(
                self.stub.ListNodeBlocks(apb.ListNodeBlocksRequest(node=name), timeout=10).blocks
            )
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return []
            raise

    # -- pods -------------------------------------------------------------------------------

    def try_add_pod(
        self, node: Node, namespace: str = "default", name: str = ""
    ) -> tuple[ClusterPod | None, CniResult]:
        """ADD a new pod on `node`; the pod, or None (its namespace removed) and the result."""
        name = name or f"pod-{uuid.uuid4().hex[:6]}"
        ns = self._netns(f"{node.name}-{name}")
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")
        container_id = uuid.uuid4().hex
        args = cni_args(namespace, name)
        result = node.runtime.call("ADD", container_id, ns.path, args=args)
        if not result.ok:
            ns.delete()
            return None, result
        pod = ClusterPod(node, Pod(ns, container_id, namespace, name, result))
        self.pods.append(pod)
        return pod, result

    def add_pod(self, node: Node, namespace: str = "default", name: str = "") -> ClusterPod:
        """ADD a new pod on `node`; raises PodAddFailed with the CNI result if ADD fails."""
        pod, result = self.try_add_pod(node, namespace, name)
        if pod is None:
            raise PodAddFailed(
                f"ADD {namespace}/{name} on {node.name} failed: {result.out} {result.stderr}",
                result,
            )
        return pod

    def del_pod(self, pod: ClusterPod) -> CniResult:
        """DEL the pod and remove its namespace."""
        result = pod.node.runtime.call(
            "DEL", pod.pod.container_id, pod.pod.ns.path, args=pod.pod.cni_args
        )
        pod.pod.ns.delete()
        with contextlib.suppress(ValueError):
            self.pods.remove(pod)
        return result

    # -- failures ---------------------------------------------------------------------------

    def lose_node(self, node: Node) -> None:
        """The node dies: cut off the segment first (so that its peers hear nothing, as when a
        machine loses power, and drop it only when their BGP hold time runs out), then BIRD and
        coild killed, its pods' and its own namespace removed. Its blocks stay held in the
        allocator, as after a real node failure."""
        if self.switch is not None:
            self.switch.ip("link", "del", f"p-{node.name}"[:15], check=False)
        if node.bird is not None:
            node.bird.proc.kill()
        if node.coild is not None:
            node.coild.kill()
        for pod in [p for p in self.pods if p.node is node]:
            pod.pod.ns.delete()
            self.pods.remove(pod)
        node.ns.delete()
        node.lost = True

    @property
    def live_nodes(self) -> list[Node]:
        return [n for n in self.nodes if not n.lost]

    # -- waiting ----------------------------------------------------------------------------

    def wait_bgp(self, timeout: float = 30) -> None:
        """Wait until every live node's BGP sessions to every other live node are established."""

        def established() -> bool:
            live = {n.peer.label for n in self.live_nodes}
            for node in self.live_nodes:
                assert node.bird is not None
                sessions = node.bird.established()
                wanted = [
                    f"{peer}_{fam}" for peer in live if peer != node.peer.label for fam in "46"
                ]
                if not all(sessions.get(w) for w in wanted):
                    return False
            return True

        wait_until("BGP sessions established", established, timeout=timeout)

    # -- tearing down -----------------------------------------------------------------------

    def stop(self) -> None:
        """Remove everything: pods, BIRD, coild, namespaces, allocator, etcd, the work directory.
        Never raises; safe to call twice."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        for node in self.nodes:
            for proc in (node.bird.proc if node.bird else None, node.coild):
                if proc is not None:
                    with contextlib.suppress(Exception):
                        proc.stop(timeout=5)
        for pod in self.pods:
            with contextlib.suppress(Exception):
                pod.pod.ns.delete()
        self.pods.clear()
        for proc in (self.allocator,):
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.stop(timeout=5)
        if self.etcd is not None:
            with contextlib.suppress(Exception):
                self.etcd.stop()
        down(self.prefix, self.workdir, keep_workdir=self.keep_logs)


def down(prefix: str, workdir: Path, keep_workdir: bool = False) -> list[str]:
    """Remove what a cluster with this prefix and work directory left behind: kill its recorded
    processes (only if they still are ours), delete its namespaces and directories (except the
    work directory itself with `keep_workdir`). Returns a line per thing removed; never raises."""
    removed: list[str] = []
    state = workdir / STATE_FILE
    dirs: list[str] = []
    pids: list[int] = []
    if state.exists():
        for line in state.read_text().splitlines():
            kind, _, value = line.partition(" ")
            if kind == "pid" and value.isdigit():
                pids.append(int(value))
            elif kind == "dir":
                dirs.append(value)
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        marker = next((m for m in _PROCESS_MARKERS if m in cmdline), None)
        if marker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                removed.append(f"process {pid} ({marker})")
    for name in cleanup_prefix(prefix):
        removed.append(f"namespace {name}")
    # Give killed processes a moment to let go of their files.
    time.sleep(0.1 if pids else 0)
    for d in dirs[::-1]:
        if keep_workdir and Path(d) == workdir:
            continue
        if os.path.isdir(d):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(f"directory {d}")
    return removed
