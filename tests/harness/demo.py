"""coil on one machine: a three-node cluster routed by BIRD, built, shown and checked.

    python -m tests.harness.demo            # build, show, check, remove (make demo)
    DEMO_KEEP=1 python -m tests.harness.demo  # ... and leave it running to explore
    python -m tests.harness.demo --down     # remove a kept or killed demo (make demo-down)

Builds etcd, coil-allocator and three nodes (network namespaces on one bridge) running coild and
BIRD, creates a dual-stack "default" pool and a "team-a" pool, starts pods through ptp with coil as
IPAM, then prints the pods' addresses, each node's blocks, table 119 and BIRD's routes, a ping
matrix over all pods, and coilctl's view; ends with PASS/FAIL lines and exits 1 if any check
failed. Needs root; touches nothing outside the namespaces it creates (names start with
"coildemo-") and its work directory /run/coildemo. See docs/demo.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from tests.harness.bgp_cluster import Cluster, ClusterPod, Node, down
from tests.harness.cluster import BIN

PREFIX = "coildemo-"
WORKDIR = Path("/run/coildemo")

POOLS = (
    ("default", ("10.100.0.0/16", "fd00:100::/112"), 5),
    ("team-a", ("10.200.0.0/24",), 4),
)
# Pods started on every node: (Kubernetes namespace, pod name). The namespace "team-a" has a pool
# of its own; "shop" has none, so its pods get addresses from "default".
PODS_PER_NODE = (("default", "web"), ("shop", "cart"), ("team-a", "api"))


@dataclass
class Report:
    """The demo's checks, printed as PASS/FAIL lines at the end."""

    started: float = field(default_factory=time.monotonic)
    checks: list[tuple[bool, str]] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> bool:
        self.checks.append((ok, what))
        return ok

    def step(self, what: str) -> None:
        print(f"[{time.monotonic() - self.started:5.1f}s] {what}", flush=True)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for ok, _ in self.checks)


def heading(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(3, 76 - len(title)), flush=True)


def indent(text: str, by: str = "    ") -> str:
    return "\n".join((by + line).rstrip() for line in text.rstrip().splitlines())


def poll(check: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Call `check` until it returns True or `timeout` seconds have passed; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def coilctl(cluster: Cluster, *args: str) -> tuple[int, str]:
    """Run coilctl against the demo's allocator; (exit code, output). (127, "") if not installed."""
    exe = BIN / "coilctl"
    if not exe.exists():
        return 127, ""
    proc = subprocess.run(
        [str(exe), "--allocator", cluster.allocator_addr, *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.returncode, proc.stdout + proc.stderr


# -- the steps -------------------------------------------------------------------------------


def build(cluster: Cluster, report: Report) -> None:
    report.step(
        f"starting etcd, coil-allocator and {len(cluster.node_names)} nodes "
        f"({', '.join(PREFIX + n for n in cluster.node_names)}) on one bridge "
        f"({PREFIX}switch), each with coild and BIRD"
    )
    cluster.start()
    for name, subnets, bits in POOLS:
        cluster.create_pool(name, subnets, bits)
        report.step(
            f"pool {name}: {', '.join(subnets)}, blocks of 2^{bits} "
            f"(coilctl pool create {name} {subnets[0]} {bits}"
            + "".join(f" --subnet {s}" for s in subnets[1:])
            + ")"
        )
    try:
        cluster.wait_bgp(timeout=30)
        n = len(cluster.nodes)
        report.check(True, f"BGP: all {n * (n - 1) * 2} sessions established (IPv4 and IPv6)")
    except TimeoutError:
        report.check(False, "BGP: sessions not established within 30 s")
    report.step("BGP sessions up")


def start_pods(cluster: Cluster, report: Report) -> list[ClusterPod]:
    pods: list[ClusterPod] = []
    for node in cluster.nodes:
        for namespace, base in PODS_PER_NODE:
            name = f"{base}-{node.name[-1]}"
            pod, result = cluster.try_add_pod(node, namespace, name)
            if pod is None:
                report.check(False, f"ADD {namespace}/{name} on {node.name}: {result.out}")
            else:
                pods.append(pod)
    report.step(f"{len(pods)} pods started through ptp with coil as IPAM")
    heading("pods")
    print(f"    {'NODE':<7} {'NAMESPACE':<10} {'POD':<8} {'IPV4':<20} IPV6")
    for p in pods:
        print(f"    {p.node.name:<7} {p.namespace:<10} {p.name:<8} {_cidr(p, 4):<20} {_cidr(p, 6)}")
    wrong = [p for p in pods if not _in_right_pool(p)]
    report.check(
        len(pods) == len(cluster.nodes) * len(PODS_PER_NODE) and not wrong,
        f"addresses: {len(pods)} pods, each from its namespace's pool "
        "(team-a: 10.200.0.0/24 only; others: default, IPv4 and IPv6)"
        + (f"; wrong: {', '.join(p.name for p in wrong)}" if wrong else ""),
    )
    return pods


def _cidr(pod: ClusterPod, version: int) -> str:
    return next((c for c in pod.cidrs if ipaddress.ip_interface(c).version == version), "-")


def _in_right_pool(pod: ClusterPod) -> bool:
    pools = {name: [ipaddress.ip_network(s) for s in subnets] for name, subnets, _ in POOLS}
    subnets = pools["team-a"] if pod.namespace == "team-a" else pools["default"]
    addresses = [ipaddress.ip_interface(c).ip for c in pod.cidrs]
    if len(addresses) != len(subnets):
        return False
    return all(any(a in s for s in subnets) for a in addresses)


def show_nodes(cluster: Cluster, report: Report) -> None:
    """Each node's blocks, table 119, BIRD's routes and the main table's BGP routes; checks that
    table 119 mirrors the allocator and every other node's blocks are routed through BIRD."""
    blocks = {n.name: {b.cidr for b in cluster.node_blocks(n)} for n in cluster.nodes}

    def table119(node: Node) -> set[str]:
        return {_dst(r) for fam in ("-4", "-6") for r in node.table("119", fam)}

    def bird_routes(node: Node) -> dict[str, str]:
        return {
            _dst(r): r.get("gateway", "")
            for fam in ("-4", "-6")
            for r in node.table("main", fam)
            if r.get("protocol") == "bird"
        }

    def routed_everywhere() -> bool:
        for node in cluster.nodes:
            routes = bird_routes(node)
            for other in cluster.nodes:
                if other is node:
                    continue
                for cidr in blocks[other.name]:
                    want = other.ipv4 if ":" not in cidr else other.ipv6
                    if routes.get(cidr) != want:
                        return False
        return True

    mirrored = poll(lambda: all(table119(n) == blocks[n.name] for n in cluster.nodes), 15)
    routed = poll(routed_everywhere, 20)
    for node in cluster.nodes:
        heading(f"{node.name}: namespace {node.ns.name}, underlay {node.ipv4} {node.ipv6}")
        print("  blocks held (allocator):")
        for b in cluster.node_blocks(node):
            print(f"    {b.pool:<8} {b.cidr:<20} {b.used}/{b.capacity} used")
        print(f"  table 119 (coild's export, ip -n {node.ns.name} route show table 119):")
        for fam in ("-4", "-6"):
            out = node.ns.ip(fam, "route", "show", "table", "119").stdout
            if out.strip():
                print(indent(out))
        assert node.bird is not None
        print(f"  BIRD's routes (birdc -s {node.bird.socket} show route):")
        routes = node.bird.show_route().splitlines()
        # The first line is birdc's greeting ("BIRD 2.0.12 ready.").
        print(indent("\n".join(routes[1:] if routes and "ready" in routes[0] else routes)))
        print("  main table, routes from BIRD (ip route show proto bird):")
        for fam in ("-4", "-6"):
            out = node.ns.ip(fam, "route", "show", "proto", "bird").stdout
            if out.strip():
                print(indent(out))
    report.check(mirrored, "table 119 of every node holds exactly the blocks the allocator lists")
    report.check(
        routed,
        "every node's main table routes every other node's blocks via that node (proto bird)",
    )


def _dst(route: dict[str, object]) -> str:
    dst = str(route.get("dst", ""))
    if "/" not in dst and dst:
        dst += "/32" if ":" not in dst else "/128"
    return dst


def ping_matrix(pods: list[ClusterPod], report: Report) -> None:
    pairs = [
        (src, dst, version)
        for src in pods
        for dst in pods
        if src is not dst
        for version in (4, 6)
        if src.address(version) and dst.address(version)
    ]

    def ping(pair: tuple[ClusterPod, ClusterPod, int]) -> bool:
        src, dst, version = pair
        address = dst.address(version)
        assert address is not None
        return src.pod.ns.ping(address, count=1, timeout=1)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = dict(zip(pairs, pool.map(ping, pairs), strict=True))
    heading("ping matrix (row pings column: 4 = IPv4 answered, 6 = IPv6 answered, x = failed)")
    labels = [f"{p.node.name}/{p.name}" for p in pods]
    width = max(len(label) for label in labels) + 1
    print(" " * (width + 4) + "".join(f"{i:>4}" for i in range(1, len(pods) + 1)))
    for i, src in enumerate(pods):
        cells = []
        for dst in pods:
            if src is dst:
                cells.append("  · ")
                continue
            cell = ""
            for version in (4, 6):
                if (src, dst, version) in results:
                    cell += str(version) if results[(src, dst, version)] else "x"
            cells.append(f"{cell:>4}")
        print(f"  {i + 1:>2} {labels[i]:<{width}}" + "".join(cells))
    failed = [(s, d, v) for (s, d, v), ok in results.items() if not ok]
    by_version = {v: sum(1 for (_, _, w) in results if w == v) for v in (4, 6)}
    report.check(
        not failed,
        f"ping: {len(results) - len(failed)}/{len(results)} answered "
        f"({by_version[4]} IPv4, {by_version[6]} IPv6 pairs)"
        + "".join(f"\n        failed: {s.name} -> {d.name} IPv{v}" for s, d, v in failed[:10]),
    )


def show_coilctl(cluster: Cluster, report: Report) -> None:
    for args in (("usage",), ("pool", "show", "default"), ("pool", "show", "team-a")):
        code, out = coilctl(cluster, *args)
        if code == 127:
            heading("coilctl is not installed; skipping its output")
            return
        heading(f"coilctl {' '.join(args)}")
        print(indent(out))
        report.check(code == 0, f"coilctl {' '.join(args)} (exit {code})")


def explain_keep(cluster: Cluster) -> None:
    ctl = f"{BIN / 'coilctl'} --allocator {cluster.allocator_addr}"
    node = cluster.nodes[0]
    assert node.bird is not None
    pod = next((p for p in cluster.pods if p.node is node), None)
    other = next((p for p in cluster.pods if p.node is not node and p.address(4)), None)
    heading("the cluster keeps running (DEMO_KEEP=1)")
    lines = [
        "Explore it:",
        f"  {ctl} usage",
        f"  {ctl} pool show default",
        f"  {ctl} node blocks {node.name}",
        f"  birdc -s {node.bird.socket} show route",
        f"  birdc -s {node.bird.socket} show protocols",
        f"  ip netns exec {node.ns.name} ip route show table 119",
        f"  ip netns exec {node.ns.name} ip route",
        f"  logs: {cluster.workdir}/*.log, {cluster.workdir}/NODE/coild.log",
    ]
    if pod is not None and other is not None:
        lines.append(f"  ip netns exec {pod.pod.ns.name} ping -c1 {other.address(4)}")
    lines += ["Stop it:", "  make demo-down   (or: python -m tests.harness.demo --down)"]
    print("\n".join(lines))


# -- main ------------------------------------------------------------------------------------


def run_demo(keep: bool) -> int:
    report = Report()
    cluster = Cluster(PREFIX, WORKDIR)
    interrupted = False

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        build(cluster, report)
        pods = start_pods(cluster, report)
        show_nodes(cluster, report)
        ping_matrix(pods, report)
        show_coilctl(cluster, report)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted", flush=True)
    except Exception as e:  # the demo reports any failure as a FAIL line, then cleans up
        report.check(False, f"demo aborted: {type(e).__name__}: {e}")
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        kept = keep and not interrupted and bool(cluster.nodes)
        if not kept:
            cluster.stop()
            report.step("cluster removed (processes, namespaces, links, files)")
    if interrupted:
        return 130
    heading("summary")
    for ok, what in report.checks:
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
    took = time.monotonic() - report.started
    print(f"\n{'PASS' if report.passed else 'FAIL'}: coil demo, {took:.1f} s", flush=True)
    if kept:
        explain_keep(cluster)
    return 0 if report.passed else 1


def leftovers() -> list[str]:
    names = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10
    ).stdout.split()
    found = [n for n in names if n.startswith(PREFIX)]
    if WORKDIR.exists():
        found.append(str(WORKDIR))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.harness.demo",
        description="coil on one machine: three nodes routed by BIRD (see docs/demo.md).",
    )
    parser.add_argument("--down", action="store_true", help="remove a kept or killed demo and exit")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the demo needs root (network namespaces, routes)", file=sys.stderr)
        return 2
    if args.down:
        removed = down(PREFIX, WORKDIR)
        print("\n".join(f"removed {r}" for r in removed) or "nothing to remove")
        return 0
    found = leftovers()
    if found:
        print(
            f"a demo is running or was left behind ({', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}); remove it with: make demo-down",
            file=sys.stderr,
        )
        return 1
    return run_demo(keep=os.environ.get("DEMO_KEEP") == "1")


if __name__ == "__main__":
    sys.exit(main())
