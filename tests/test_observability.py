"""What operators watch: the allocator's Prometheus metrics and gRPC health service, and coild's
/healthz, /readyz and /metrics, on real processes; and coild's clean shutdown on SIGTERM."""

from __future__ import annotations

import ipaddress
import re
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coil.v1 import allocator_pb2 as apb
from coil.v1 import allocator_pb2_grpc as apb_grpc
from tests.harness.cluster import (
    Runtime,
    add_pod,
    del_pod,
    install_plugin,
    start_allocator,
    start_coild,
    wait_until,
)
from tests.harness.etcd import EtcdServer, free_port, start_etcd
from tests.harness.net import Netns


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, or None."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"([a-z_:]+)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def own_etcd() -> Iterator[EtcdServer]:
    """An etcd of this test's own, which it may stop."""
    server = start_etcd("coil-observe")
    try:
        yield server
    finally:
        server.stop()


def test_allocator_metrics_and_health(own_etcd: EtcdServer, tmp_path: Path) -> None:
    port = free_port()
    addr = f"unix:{tmp_path}/allocator.sock"
    proc = start_allocator(
        own_etcd.endpoint,
        "/coil/",
        addr,
        tmp_path / "allocator.log",
        ["--metrics-addr", f"127.0.0.1:{port}"],
    )
    try:
        with grpc.insecure_channel(addr) as ch:
            stub = apb_grpc.AllocatorServiceStub(ch)
            stub.CreatePool(
                apb.CreatePoolRequest(name="default", subnets=["10.1.0.0/24"], block_size_bits=4)
            )
            block = stub.ClaimBlock(apb.ClaimBlockRequest(node="n1", pool="default")).block
            address = str(ipaddress.ip_network(block.cidr).network_address + 5)
            stub.RecordAllocations(
                apb.RecordAllocationsRequest(
                    node="n1",
                    items=[
                        apb.RecordItem(
                            address=address,
                            pool="default",
                            block=block.cidr,
                            owner=apb.Owner(
                                namespace="ns", pod="p", container_id="c", interface="eth0"
                            ),
                        )
                    ],
                )
            )
            with pytest.raises(grpc.RpcError):
                stub.GetPool(apb.GetPoolRequest(name="missing"))
            health = health_pb2_grpc.HealthStub(ch)
            wait_until(
                "the health service to say SERVING",
                lambda: (
                    health.Check(health_pb2.HealthCheckRequest(service="")).status
                    == health_pb2.HealthCheckResponse.SERVING
                ),
                timeout=15,
            )
            status, text = http_get(f"http://127.0.0.1:{port}/metrics")
            assert status == 200
            assert metric(text, "coil_allocator_rpcs_total", method="CreatePool", code="OK") == 1
            assert (
                metric(text, "coil_allocator_rpcs_total", method="GetPool", code="NOT_FOUND") == 1
            )
            assert (
                metric(text, "coil_allocator_rpc_duration_seconds_count", method="ClaimBlock") == 1
            )
            assert metric(text, "coil_allocator_block_claims_total", pool="default") == 1
            assert metric(text, "coil_pool_blocks_held", pool="default", family="ipv4") == 1
            assert metric(text, "coil_pool_addresses_used", pool="default", family="ipv4") == 1
            assert (
                metric(text, "coil_pool_addresses_total", pool="default", family="ipv4") == 256 - 3
            )
            # etcd gone: the health service says so (it checks every 5 s).
            own_etcd.proc.kill()
            own_etcd.proc.wait(timeout=10)
            wait_until(
                "the health service to say NOT_SERVING",
                lambda: (
                    health.Check(health_pb2.HealthCheckRequest(service="")).status
                    == health_pb2.HealthCheckResponse.NOT_SERVING
                ),
                timeout=20,
            )
    finally:
        proc.stop()


@pytest.mark.root
@pytest.mark.slow
def test_coild_health_ready_metrics_and_sigterm(etcd_server: EtcdServer, tmp_path: Path) -> None:
    addr = f"unix:{tmp_path}/allocator.sock"
    allocator = start_allocator(
        etcd_server.endpoint, f"/coil-obs-{uuid.uuid4().hex[:6]}/", addr, tmp_path / "a.log"
    )
    node = Netns.create("coilt-")
    plugin_dir = tmp_path / "bin"
    install_plugin(plugin_dir)

    def get(path: str) -> tuple[int, str]:
        code = (
            "import sys, urllib.request, urllib.error\n"
            "try:\n"
            f"    r = urllib.request.urlopen('http://127.0.0.1:9384{path}', timeout=5)\n"
            "    print(r.status); print(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code); print(e.read().decode())\n"
        )
        out = node.exec(sys.executable, "-c", code, check=False).stdout
        first, _, rest = out.partition("\n")
        return int(first or 0), rest

    coild = None
    try:
        node.sysctl("net.ipv4.ip_forward", "1")
        with grpc.insecure_channel(addr) as ch:
            apb_grpc.AllocatorServiceStub(ch).CreatePool(
                apb.CreatePoolRequest(name="default", subnets=["10.2.0.0/24"], block_size_bits=4)
            )
        coild = start_coild(node, "obs-1", addr, tmp_path / "coild.sock", tmp_path / "coild.log")
        assert get("/healthz")[0] == 200
        wait_until("coild /readyz to answer 200", lambda: get("/readyz")[0] == 200, timeout=20)
        runtime = Runtime(node, plugin_dir, tmp_path / "coild.sock")
        pod = add_pod(runtime, "coilt-", name="watched")
        try:
            _, text = get("/metrics")
            assert metric(text, "coild_allocations_total", pool="default") == 1
            assert metric(text, "coild_batch_size_count", kind="record") == 1
            assert metric(text, "coild_blocks", pool="default", family="ipv4") == 1
            assert metric(text, "coild_addresses_used", pool="default", family="ipv4") == 1
            assert (metric(text, "coild_rpc_duration_seconds_count", method="Allocate") or 0) >= 1
            # The allocator gone: /readyz says so within a maintenance pass.
            allocator.stop()
            wait_until(
                "coild /readyz to answer 503",
                lambda: (r := get("/readyz"))[0] == 503 and "allocator" in r[1],
                timeout=40,
            )
            allocator = start_allocator(
                etcd_server.endpoint,
                allocator.popen.args[allocator.popen.args.index("--etcd-prefix") + 1],  # type: ignore[union-attr]
                addr,
                tmp_path / "a.log",
            )
            wait_until("coild /readyz to recover", lambda: get("/readyz")[0] == 200, timeout=40)
        finally:
            del_pod(runtime, pod)
        # SIGTERM: coild stops cleanly, and the node's routes stay for the pods that remain.
        routes_before = node.routes("119")
        assert routes_before
        coild.popen.terminate()
        assert coild.popen.wait(timeout=15) == 0
        assert node.routes("119") == routes_before
        assert "stopping" in coild.log.read_text()
    finally:
        if coild is not None:
            coild.stop()
        allocator.stop()
        node.delete()
