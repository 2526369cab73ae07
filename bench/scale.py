"""Section 4: a Kubernetes-limit-sized cluster in etcd: 5,000 nodes holding a block each and
150,000 allocation records (30 per node), plus one node with 110 pods. The state is written through
the allocator's domain API in this process (claim_specific_block, record: one transaction each per
node), then read back through the running coil-allocator process with the real coilctl."""

from __future__ import annotations

import ipaddress
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from bench.common import Lab, metric_sum, pick, rss_kb, scrape
from coil.v1 import allocator_pb2 as apb
from coil.v1 import allocator_pb2_grpc as apb_grpc
from coil_allocator.allocator import Allocator
from coil_allocator.etcd_store import EtcdConfig, EtcdStore
from coil_core.errors import AlreadyExists
from coil_core.model import Owner, RecordRequest

POOL = "default"  # created by the CNI section: 10.0.0.0/12 in /26 blocks
SUBNET = ipaddress.ip_network("10.0.0.0/12")
BLOCK_PREFIX = 26
PER_NODE = 30
BIG_NODE = "bench-big"
BIG_PODS = 110
WRITERS = 8
REPEATS = 3


def _records(
    node: str, block: ipaddress.IPv4Network, count: int, first: int = 0
) -> list[RecordRequest]:
    hosts = list(block)[2:]  # skip the network address and, in the first block, the gateway
    return [
        RecordRequest(
            address=hosts[i],
            pool=POOL,
            block=block,
            owner=Owner("bench", f"{node}-pod-{first + i}", f"{node}-c{first + i:04d}", "eth0"),
        )
        for i in range(count)
    ]


def _free_blocks(allocator: Allocator, needed: int) -> list[ipaddress.IPv4Network]:
    """Blocks of the pool nobody holds, from the top of the subnet down (coild picks at random)."""
    prefix = allocator.keys.blocks(POOL)
    held_kvs, _ = allocator.store.range(prefix, keys_only=True)
    held = {allocator.keys.strip(kv.key, prefix) for kv in held_kvs}
    out: list[ipaddress.IPv4Network] = []
    size = 2 ** (32 - BLOCK_PREFIX)
    top = int(SUBNET.broadcast_address) + 1 - size
    addr = top
    while len(out) < needed and addr >= int(SUBNET.network_address):
        block = ipaddress.IPv4Network(f"{ipaddress.ip_address(addr)}/{BLOCK_PREFIX}")
        if f"{block.network_address}_{BLOCK_PREFIX}" not in held:
            out.append(block)
        addr -= size
    return out


def populate(lab: Lab, nodes: int, log: Callable[[str], None]) -> dict[str, Any]:
    store = EtcdStore(EtcdConfig((lab.etcd.endpoint,)))
    allocator = Allocator(store, "/coil/")
    try:
        blocks = _free_blocks(allocator, nodes + 2)
        names = [f"scale-{i:05d}" for i in range(nodes)]

        def claim(i: int) -> None:
            for j in range(i, len(blocks), len(names) + 2):  # pragma: no branch - first fits
                try:
                    allocator.claim_specific_block(names[i], POOL, str(blocks[j]))
                    return
                except AlreadyExists:
                    continue

        t0 = time.perf_counter()
        with futures.ThreadPoolExecutor(WRITERS) as pool:
            list(pool.map(claim, range(nodes)))
        allocator.claim_specific_block(BIG_NODE, POOL, str(blocks[nodes]))
        allocator.claim_specific_block(BIG_NODE, POOL, str(blocks[nodes + 1]))
        claim_s = time.perf_counter() - t0
        log(f"  {nodes} nodes claimed a block in {claim_s:.1f} s")

        before = scrape(lab.etcd_metrics)
        t0 = time.perf_counter()

        def record(i: int) -> int:
            results = allocator.record(names[i], _records(names[i], blocks[i], PER_NODE))
            return sum(r.outcome.name == "RECORDED" for r in results)

        with futures.ThreadPoolExecutor(WRITERS) as pool:
            recorded = sum(pool.map(record, range(nodes)))
        record_s = time.perf_counter() - t0
        after = scrape(lab.etcd_metrics)
        big = _records(BIG_NODE, blocks[nodes], 62) + _records(
            BIG_NODE, blocks[nodes + 1], BIG_PODS - 62, first=62
        )
        big_recorded = sum(r.outcome.name == "RECORDED" for r in allocator.record(BIG_NODE, big))
        log(f"  {recorded} records written in {record_s:.1f} s ({recorded / record_s:.0f}/s)")
        size_key = "etcd_mvcc_db_total_size_in_use_in_bytes"
        grown = metric_sum(after, size_key) - metric_sum(before, size_key)
        return {
            "nodes": nodes,
            "records": recorded,
            "big_node_records": big_recorded,
            "claim_s": round(claim_s, 2),
            "record_s": round(record_s, 2),
            "records_per_s_written": round(recorded / record_s),
            "etcd_db_in_use_bytes_after": int(metric_sum(after, size_key)),
            "etcd_db_total_bytes_after": int(metric_sum(after, "etcd_mvcc_db_total_size_in_bytes")),
            "etcd_bytes_per_record": round(grown / max(recorded, 1), 1),
            "some_address": str(_records(names[0], blocks[0], 1)[0].address),
        }
    finally:
        store.close()


def _time_cli(args: list[str]) -> dict[str, Any]:
    coilctl = str(Path(sys.executable).parent / "coilctl")
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        proc = subprocess.run([coilctl, *args], capture_output=True, text=True, timeout=120)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip()[:300], "code": proc.returncode}
    return {"median_s": round(statistics.median(times), 3), "runs_s": [round(t, 3) for t in times]}


def _time_rpc(allocator: str, call: Callable[[Any], Any]) -> dict[str, Any]:
    times = []
    with grpc.insecure_channel(allocator) as ch:
        stub = apb_grpc.AllocatorServiceStub(ch)
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            call(stub)
            times.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(times), 3), "runs_s": [round(t, 3) for t in times]}


def _coild_ready(lab: Lab, allocator: str) -> dict[str, Any]:
    """Start coild for the node with 110 pods, time until its socket answers Check (NOT_FOUND for
    a probe attachment), polling every 5 ms; then stop it. Repeated in the same namespace."""
    ns = lab.netns()
    sock = lab.root / "coild-big.sock"
    times = []
    from tests.harness.cluster import coild_answers, start_coild

    for run in range(REPEATS):
        sock.unlink(missing_ok=True)
        t0 = time.perf_counter()
        proc = start_coild(
            ns,
            BIG_NODE,
            allocator,
            sock,
            lab.root / "coild-big.log",
            extra=["--log-level", "warning"],
            wait=False,
        )
        try:
            ready = None
            while time.perf_counter() - t0 < 30 and proc.alive():
                if coild_answers(sock):
                    ready = time.perf_counter() - t0
                    break
                time.sleep(0.005)
            if ready is None:
                return {"error": f"coild not ready on run {run}: {proc.tail()}"}
            times.append(ready)
        finally:
            proc.stop()
    routes = len(ns.routes(table="119"))
    return {
        "median_s": round(statistics.median(times), 3),
        "runs_s": [round(t, 3) for t in times],
        "routes_in_table_119": routes,
    }


def run(lab: Lab, log: Callable[[str], None]) -> dict[str, Any]:
    nodes = pick(5000, 500)
    proc, allocator, _ = lab.allocators[0]
    out = populate(lab, nodes, log)
    rss_before = rss_kb(proc.popen.pid)
    address = out.pop("some_address")
    ctl = ["--allocator", allocator]
    out["coilctl_usage"] = _time_cli([*ctl, "usage"])
    out["coilctl_pool_show"] = _time_cli([*ctl, "pool", "show", POOL])
    out["coilctl_address_info"] = _time_cli([*ctl, "address", "info", address])
    out["coilctl_version"] = _time_cli(["version"])
    out["rpc_get_usage"] = _time_rpc(
        allocator, lambda s: s.GetUsage(apb.GetUsageRequest(), timeout=60)
    )
    out["rpc_get_pool"] = _time_rpc(
        allocator, lambda s: s.GetPool(apb.GetPoolRequest(name=POOL), timeout=60)
    )
    out["rpc_get_address"] = _time_rpc(
        allocator, lambda s: s.GetAddress(apb.GetAddressRequest(address=address), timeout=60)
    )
    rss_after = rss_kb(proc.popen.pid)
    out["allocator_rss_mb"] = round(rss_after["VmRSS"] / 1024, 1)
    out["allocator_peak_rss_mb"] = round(rss_after["VmHWM"] / 1024, 1)
    out["allocator_rss_mb_before_reads"] = round(rss_before["VmRSS"] / 1024, 1)
    log(
        f"  coilctl usage {out['coilctl_usage'].get('median_s')} s, pool show "
        f"{out['coilctl_pool_show'].get('median_s')} s, address info "
        f"{out['coilctl_address_info'].get('median_s')} s; "
        f"allocator RSS {out['allocator_rss_mb']} MB"
    )
    out["coild_ready_110_pods"] = _coild_ready(lab, allocator)
    log(f"  coild ready with {BIG_PODS} pods: {out['coild_ready_110_pods']}")
    return out
