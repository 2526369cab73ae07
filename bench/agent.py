"""Section 2: coild alone. Simulated pods call Allocate then Release on coild's socket from 1, 16
and 128 concurrent gRPC clients (asyncio, in this process); every Allocate returns only after its
record is durable in etcd (coild's group commit through the allocator process).

Costs per allocation come from the servers' own counters, read before and after each run:
allocator RPCs from coil-allocator's /metrics (coil_allocator_rpcs_total), etcd requests from
etcd's own /metrics (grpc_server_started_total for the KV methods Txn and Range) and the keys it
wrote (etcd_mvcc_put_total), coild's batch sizes from its /metrics inside the node namespace."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from bench.common import Lab, metric_sum, pick, scrape, summary_ms
from coil.v1 import nodeagent_pb2 as npb
from coil.v1 import nodeagent_pb2_grpc as npb_grpc
from tests.harness.net import Netns

CONCURRENCY = (1, 16, 128)
CHANNELS = 8


async def _load(sock: Path, clients: int, seconds: float) -> dict[str, Any]:
    channels = [grpc.aio.insecure_channel(f"unix:{sock}") for _ in range(min(clients, CHANNELS))]
    stubs = [npb_grpc.NodeAgentServiceStub(ch) for ch in channels]
    alloc: list[float] = []
    release: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(i: int) -> None:
        nonlocal errors
        stub = stubs[i % len(stubs)]
        while time.perf_counter() < deadline:
            attachment = npb.Attachment(container_id=uuid.uuid4().hex, interface="eth0")
            t0 = time.perf_counter()
            try:
                await stub.Allocate(
                    npb.AllocateRequest(attachment=attachment, namespace="bench", pod=f"p{i}"),
                    timeout=30,
                )
                t1 = time.perf_counter()
                await stub.Release(npb.ReleaseRequest(attachment=attachment), timeout=30)
            except grpc.RpcError as e:
                errors += 1
                if errors <= 3:
                    print(f"  coild load: {e.code()} {e.details()}", file=sys.stderr)
                continue
            t2 = time.perf_counter()
            alloc.append(t1 - t0)
            release.append(t2 - t1)

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    for ch in channels:
        await ch.close()
    return {
        "clients": clients,
        "seconds": round(elapsed, 3),
        "allocations": len(alloc),
        "allocations_per_s": round(len(alloc) / elapsed, 1),
        "allocate_ms": summary_ms(alloc),
        "release_ms": summary_ms(release),
        "errors": errors,
    }


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape_in_netns(ns: Netns, url: str) -> dict[str, float]:
    """Scrape a /metrics page that listens on loopback inside `ns`."""
    code = f"import urllib.request;print(urllib.request.urlopen({url!r},timeout=5).read().decode())"
    text = ns.exec(sys.executable, "-c", code).stdout
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def run(lab: Lab, allocator_port: int, log: Callable[[str], None]) -> dict[str, Any]:
    seconds = pick(8, 1.0)
    coild, sock, ns = lab.start_coild("load-node", lab.allocators[0][1])
    # `ip netns exec` execs coild in place, so the pid is coild's.
    pids = {
        "coild": coild.popen.pid,
        "allocator": lab.allocators[0][0].popen.pid,
        "etcd": lab.etcd.proc.pid,
        "load generator (bench)": os.getpid(),
    }
    asyncio.run(_load(sock, 16, pick(1.5, 0.5)))  # warm up: blocks claimed, channels hot
    alloc_url = f"http://127.0.0.1:{allocator_port}/metrics"
    coild_url = "http://127.0.0.1:9384/metrics"
    runs = []
    for clients in CONCURRENCY:
        a0, e0, c0 = scrape(alloc_url), scrape(lab.etcd_metrics), scrape_in_netns(ns, coild_url)
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        result = asyncio.run(_load(sock, clients, seconds))
        cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        a1, e1, c1 = scrape(alloc_url), scrape(lab.etcd_metrics), scrape_in_netns(ns, coild_url)
        n = max(result["allocations"], 1)

        def delta(
            before: dict[str, float], after: dict[str, float], name: str, f: str = ""
        ) -> float:
            return metric_sum(after, name, f) - metric_sum(before, name, f)

        rpcs = delta(a0, a1, "coil_allocator_rpcs_total")
        batches = delta(c0, c1, "coild_batch_size_count")
        items = delta(c0, c1, "coild_batch_size_sum")
        result.update(
            {
                "allocator_rpcs_per_allocation": round(rpcs / n, 3),
                "record_rpcs_per_allocation": round(
                    delta(a0, a1, "coil_allocator_rpcs_total", "RecordAllocations") / n, 3
                ),
                "etcd_txns_per_allocation": round(
                    delta(e0, e1, "grpc_server_started_total", 'grpc_method="Txn"') / n, 3
                ),
                "etcd_ranges_per_allocation": round(
                    delta(e0, e1, "grpc_server_started_total", 'grpc_method="Range"') / n, 3
                ),
                "etcd_puts_per_allocation": round(delta(e0, e1, "etcd_mvcc_put_total") / n, 3),
                "coild_mean_batch": round(items / batches, 2) if batches else None,
                "cpu_ms_per_allocation": {
                    name: round((cpu1[name] - cpu0[name]) * 1000 / n, 3) for name in pids
                },
            }
        )
        runs.append(result)
        log(
            f"  {clients:>3} clients: {result['allocations_per_s']} alloc/s, "
            f"Allocate p50 {result['allocate_ms']['p50']} ms, "
            f"{result['allocator_rpcs_per_allocation']} allocator RPCs and "
            f"{result['etcd_txns_per_allocation']} etcd txns per allocation (alloc+release), "
            f"coild batch {result['coild_mean_batch']}, "
            f"CPU ms per cycle {result['cpu_ms_per_allocation']}"
        )
    floor = _floor(lab, CONCURRENCY[-1], seconds, log)
    return {"seconds_per_run": seconds, "runs": runs, "floor": floor}


def _floor(lab: Lab, clients: int, seconds: float, log: Callable[[str], None]) -> dict[str, Any]:
    """The same load against a server that does no work (bench/agent_floor.py), in its own
    process as coild is: what grpcio alone allows on this machine."""
    sock = lab.root / "agent-floor.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.agent_floor", str(sock)],
        stdout=subprocess.PIPE,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("bench.agent_floor did not start")
        asyncio.run(_load(sock, 16, pick(1.0, 0.3)))  # warm up
        pids = {"no-work server": proc.pid, "load generator (bench)": os.getpid()}
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        result = asyncio.run(_load(sock, clients, seconds))
        cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    finally:
        proc.kill()
        proc.wait()
    n = max(result["allocations"], 1)
    result["cpu_ms_per_allocation"] = {
        name: round((cpu1[name] - cpu0[name]) * 1000 / n, 3) for name in pids
    }
    log(
        f"  no-work gRPC server, {clients} clients: {result['allocations_per_s']} cycles/s, "
        f"CPU ms per cycle {result['cpu_ms_per_allocation']}"
    )
    return result
