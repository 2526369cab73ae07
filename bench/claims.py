"""Section 3: a claim storm. N simulated nodes ask coil-allocator for their first block at the same
moment (asyncio gRPC clients in this process, spread over a few channels per allocator), against
one allocator process and against two replicas sharing etcd. Measured: time until every node holds
a block, per-claim latency, and ClaimBlockResponse.retries (compares lost to a concurrent claim)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc

from bench.common import Lab, create_pool, pick, summary_ms
from coil.v1 import allocator_pb2 as apb
from coil.v1 import allocator_pb2_grpc as apb_grpc

CHANNELS_PER_ALLOCATOR = 8
# A /14 carved into /26 blocks (Calico's default block size): 4,096 blocks for 1,000 nodes.
POOL_BITS = 6


async def _storm(allocators: list[str], pool: str, nodes: int) -> dict[str, Any]:
    channels = [
        grpc.aio.insecure_channel(a) for a in allocators for _ in range(CHANNELS_PER_ALLOCATOR)
    ]
    stubs = [apb_grpc.AllocatorServiceStub(ch) for ch in channels]
    for ch in channels:
        await ch.channel_ready()
    latencies: list[float] = []
    retries: list[int] = []
    errors: list[str] = []
    start = time.perf_counter()

    async def node(i: int) -> None:
        # Consecutive nodes go to different allocators, as a load balancer would spread them.
        stub = stubs[
            (i % len(allocators)) * CHANNELS_PER_ALLOCATOR
            + (i // len(allocators)) % CHANNELS_PER_ALLOCATOR
        ]
        t0 = time.perf_counter()
        try:
            reply = await stub.ClaimBlock(
                apb.ClaimBlockRequest(node=f"storm-{pool}-{i:05d}", pool=pool), timeout=60
            )
        except grpc.aio.AioRpcError as e:
            errors.append(f"{e.code().name}: {e.details()}")
            return
        latencies.append(time.perf_counter() - t0)
        retries.append(reply.retries)

    await asyncio.gather(*(node(i) for i in range(nodes)))
    elapsed = time.perf_counter() - start
    for ch in channels:
        await ch.close()
    return {
        "replicas": len(allocators),
        "nodes": nodes,
        "all_held_s": round(elapsed, 3),
        "claimed": len(retries),
        "claim_ms": summary_ms(latencies),
        "retries_per_claim": round(sum(retries) / max(len(retries), 1), 3),
        "max_retries": max(retries, default=0),
        "errors": len(errors),
        "first_errors": errors[:3],
    }


def run(lab: Lab, log: Callable[[str], None]) -> dict[str, Any]:
    nodes = pick(1000, 200)
    first = lab.allocators[0][1]
    second = lab.allocators[1][1] if len(lab.allocators) > 1 else lab.start_allocator("alloc-b")[1]
    out = []
    for replicas, pool, subnet in (
        (1, "storm-one", "10.64.0.0/14"),
        (2, "storm-two", "10.68.0.0/14"),
    ):
        create_pool(first, pool, subnet, POOL_BITS)
        allocators = [first, second][:replicas]
        result = asyncio.run(_storm(allocators, pool, nodes))
        result["pool"] = f"{subnet} in /{32 - POOL_BITS} blocks"
        out.append(result)
        log(
            f"  {replicas} allocator(s): {nodes} nodes hold a block after "
            f"{result['all_held_s']} s, "
            f"{result['retries_per_claim']} retries per claim, {result['errors']} errors"
        )
    return {"runs": out}
