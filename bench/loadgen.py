"""A load generator that plays many coilds at once (`python -m bench.loadgen`), for the quiet
cluster and churn sections: one process, asyncio, nodes spread over the allocator replicas and
over many connections (as many coilds would be). Unary calls go through grpc.aio; the WatchNode
streams are read with a minimal HTTP/2 reader (bench.h2watch), a few microseconds a message
where grpc.aio's client takes 60-125, so that the simulator takes less of the machine it shares
with the allocators it measures.

Patterns (per simulated node, with random phases so that calls spread evenly):
- `poll`: the polling coild: ListPools every 10 s, ReportNode every 30 s, ListNodeBlocks with
  records every 60 s (the call pattern of coild before WatchNode).
- `watch`: the watching coild: at start ReportNode (retried with a jittered backoff until it
  works), then one WatchNode stream whose first snapshot is the node's state (resumed from
  its revision on the other replica when it breaks), ended and opened afresh from a snapshot
  every `--resync` seconds (coild's safety net). `--safety` and `--report` add ListPools and
  ListNodeBlocks, and ReportNode, on timers (the safety net of earlier coilds).
With `--churn RATE`, pods come and go on the first nodes: RATE RecordAllocations per second, each
record released again `--lifetime` seconds later; every WatchNode stream checks that it saw each
record of its node appear and disappear.

It writes one JSON object to stdout when done: calls and errors by method, latency percentiles,
nodes that were not ready at the end (a stream down, or the last pool list failed), and for
churn what each watcher missed. The periods are arguments so that the quiet section can feed in
what it measured of a real coild.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from bench import h2watch
from coil.v1 import allocator_pb2 as apb
from coil.v1 import allocator_pb2_grpc as apb_grpc
from coil_cni.rpc import RpcError

NODES_PER_CHANNEL = 100  # nodes (or WatchNode streams) per connection
WATCH_NODE = "/coil.v1.AllocatorService/WatchNode"
DEADLINE = 5.0


@dataclass
class Stats:
    calls: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    snapshots: int = 0
    resumes: int = 0
    resyncs: int = 0
    messages: int = 0
    # churn bookkeeping: (node, container) -> what was done / what the node's stream saw
    done_put: set[tuple[str, str]] = field(default_factory=set)
    done_del: set[tuple[str, str]] = field(default_factory=set)
    seen_put: set[tuple[str, str]] = field(default_factory=set)
    seen_del: set[tuple[str, str]] = field(default_factory=set)
    # the probe (quiet section): when each node's stream brought the probe pool, and each
    # removed record ("node/container"), in wall-clock seconds
    pool_seen: dict[str, float] = field(default_factory=dict)
    freed_seen: dict[str, float] = field(default_factory=dict)


@dataclass
class Node:
    name: str
    stubs: list[apb_grpc.AllocatorServiceStub]
    home: int
    watchers: list[h2watch.Pool] = field(default_factory=list)  # WatchNode, one per replica
    lease: int = 0
    revision: int = 0
    stream_up: bool = False
    pools_ok: bool = False
    block: str = ""


async def call(stats: Stats, method: str, coro: Any) -> Any:
    t0 = time.perf_counter()
    try:
        result = await coro
    except grpc.RpcError as e:
        stats.errors[f"{method}:{e.code().name}"] += 1
        return None
    except asyncio.CancelledError:
        raise
    stats.calls[method] += 1
    stats.latency[method].append(time.perf_counter() - t0)
    return result


async def periodic(
    period: float, stop: asyncio.Event, fn: Any, *, first: float | None = None
) -> None:
    if period <= 0:
        return
    delay = random.uniform(0, period) if first is None else first
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), delay)
            return
        except TimeoutError:
            pass
        await fn()
        delay = period


async def lease_report(node: Node, stats: Stats) -> bool:
    await report(node, stats)
    return bool(node.lease)


async def report(node: Node, stats: Stats) -> None:
    stub = node.stubs[node.home]
    r = await call(
        stats,
        "ReportNode",
        stub.ReportNode(
            apb.ReportNodeRequest(node=node.name, lease_id=node.lease, routes=[], table=119),
            timeout=DEADLINE,
        ),
    )
    if r is not None:
        node.lease = r.lease_id


async def list_pools(node: Node, stats: Stats) -> None:
    r = await call(
        stats,
        "ListPools",
        node.stubs[node.home].ListPools(apb.ListPoolsRequest(), timeout=DEADLINE),
    )
    node.pools_ok = r is not None


async def list_blocks(node: Node, stats: Stats) -> bool:
    r = await call(
        stats,
        "ListNodeBlocks",
        node.stubs[node.home].ListNodeBlocks(
            apb.ListNodeBlocksRequest(node=node.name, with_records=True), timeout=DEADLINE
        ),
    )
    if r is not None and r.blocks and not node.block:
        node.block = r.blocks[0].cidr
    return r is not None


async def watch(
    node: Node, stats: Stats, stop: asyncio.Event, resync: float = 0.0, probe: str = ""
) -> None:
    """One WatchNode stream, resumed on the other replica whenever it breaks; with `resync`,
    ended and opened afresh from a snapshot that often (coild's safety net), first at a random
    phase. Notes when the stream first brings the pool named `probe`, and every record removal."""
    delay = 0.2
    loop = asyncio.get_running_loop()
    next_resync = loop.time() + random.uniform(0, resync) if resync > 0 else 0.0
    while not stop.is_set():
        request = apb.WatchNodeRequest(node=node.name, revision=node.revision, lease_id=node.lease)
        if node.revision:
            stats.resumes += 1
        stats.calls["WatchNode"] += 1
        resyncing = False
        stream: h2watch.Stream | None = None
        timer = None
        try:
            stream = await node.watchers[node.home].open(WATCH_NODE, request.SerializeToString())
            if resync > 0:

                def resync_now(s: h2watch.Stream = stream) -> None:
                    nonlocal resyncing
                    resyncing = True
                    s.cancel()  # the iteration ends

                timer = loop.call_at(next_resync, resync_now)
            async for raw in stream:
                message = apb.WatchNodeResponse.FromString(raw)
                node.stream_up = True
                delay = 0.2
                stats.messages += 1
                if message.snapshot:
                    stats.snapshots += 1
                    if message.blocks and not node.block:
                        node.block = message.blocks[0].cidr
                for r in message.records:
                    stats.seen_put.add((node.name, r.owner.container_id))
                for r in message.released_records:
                    stats.seen_del.add((node.name, r.owner.container_id))
                    stats.freed_seen.setdefault(f"{node.name}/{r.owner.container_id}", time.time())
                seen = node.name in stats.pool_seen
                if probe and not seen and any(p.name == probe for p in message.pools):
                    stats.pool_seen[node.name] = time.time()
                node.revision = message.revision
                if message.lease_lost:
                    node.lease = 0
                    await report(node, stats)
                    break
        except RpcError as e:
            if stop.is_set():
                return
            if not resyncing:
                stats.errors[f"WatchNode:{e.status}"] += 1
        finally:
            if timer is not None:
                timer.cancel()
            if stream is not None:
                stream.cancel()  # when it has not ended: this task cancelled, or lease_lost
        if resyncing:
            # The safety net: at once, from a snapshot, on the same replica.
            stats.resyncs += 1
            node.revision = 0
            next_resync = loop.time() + resync
            continue
        node.stream_up = False
        if stop.is_set():
            return
        node.home = (node.home + 1) % len(node.stubs)  # another replica
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


async def churn(
    nodes: list[Node], rate: float, lifetime: float, stats: Stats, stop: asyncio.Event
) -> None:
    """`rate` pod ADDs per second on `nodes`, each released `lifetime` s later."""
    live: list[tuple[float, Node, str, str]] = []
    serial = 0
    used: dict[str, set[int]] = defaultdict(set)
    interval = 1.0 / rate
    next_at = time.monotonic()
    pending: set[asyncio.Task[Any]] = set()

    async def add(node: Node) -> None:
        nonlocal serial
        block = ipaddress.ip_network(node.block)
        free = [i for i in range(2, block.num_addresses - 1) if i not in used[node.name]]
        if not free:
            return
        i = random.choice(free)
        used[node.name].add(i)
        serial += 1
        container = f"churn-{serial}"
        address = str(block.network_address + i)
        item = apb.RecordItem(
            address=address,
            pool="default",
            block=node.block,
            owner=apb.Owner(
                namespace="bench", pod=container, container_id=container, interface="eth0"
            ),
        )
        r = await call(
            stats,
            "RecordAllocations",
            node.stubs[node.home].RecordAllocations(
                apb.RecordAllocationsRequest(node=node.name, items=[item]), timeout=DEADLINE
            ),
        )
        if r is not None and r.results[0].outcome == apb.RECORD_OUTCOME_RECORDED:
            stats.done_put.add((node.name, container))
            live.append((time.monotonic() + lifetime, node, address, container))
        else:
            used[node.name].discard(i)

    async def release(node: Node, address: str, container: str) -> None:
        item = apb.ReleaseItem(address=address, container_id=container, interface="eth0")
        r = await call(
            stats,
            "ReleaseAllocations",
            node.stubs[node.home].ReleaseAllocations(
                apb.ReleaseAllocationsRequest(node=node.name, items=[item]), timeout=DEADLINE
            ),
        )
        if r is not None and r.results[0].outcome == apb.RELEASE_OUTCOME_RELEASED:
            stats.done_del.add((node.name, container))
            block = ipaddress.ip_network(node.block)
            used[node.name].discard(int(ipaddress.ip_address(address)) - int(block.network_address))

    ready = [n for n in nodes if n.block]
    while not stop.is_set():
        now = time.monotonic()
        while live and live[0][0] <= now:
            _, node, address, container = live.pop(0)
            t = asyncio.create_task(release(node, address, container))
            pending.add(t)
            t.add_done_callback(pending.discard)
        if now >= next_at and ready:
            t = asyncio.create_task(add(random.choice(ready)))
            pending.add(t)
            t.add_done_callback(pending.discard)
            next_at += interval
        await asyncio.sleep(max(0.0, min(next_at, live[0][0] if live else next_at) - now))
    # Release what is still alive, so that every put has its delete.
    await asyncio.gather(*pending, return_exceptions=True)
    await asyncio.gather(*(release(n, a, c) for _, n, a, c in live), return_exceptions=True)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    data = sorted(values)
    pick = lambda p: data[min(len(data) - 1, int(len(data) * p))]  # noqa: E731
    return {"p50_ms": round(pick(0.5) * 1000, 2), "p99_ms": round(pick(0.99) * 1000, 2)}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    targets = args.allocators.split(",")
    channels: list[list[aio.Channel]] = []
    per_replica = (args.nodes + len(targets) - 1) // len(targets)
    for target in targets:
        count = max(1, (per_replica + NODES_PER_CHANNEL - 1) // NODES_PER_CHANNEL)
        channels.append(
            [
                aio.insecure_channel(
                    target,
                    options=[
                        ("grpc.use_local_subchannel_pool", 1),
                        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                    ],
                )
                for _ in range(count)
            ]
        )
    stubs = [[apb_grpc.AllocatorServiceStub(c) for c in chs] for chs in channels]
    # The streams' connections: NODES_PER_CHANNEL streams on each, as the channels have nodes.
    watchers = [h2watch.Pool(target, NODES_PER_CHANNEL) for target in targets]
    nodes = []
    for i in range(args.nodes):
        home = i % len(targets)
        per = [stubs[r][(i // len(targets)) % len(stubs[r])] for r in range(len(targets))]
        nodes.append(Node(f"{args.node_prefix}{i:05d}", per, home, watchers))
    stats = Stats()
    stop = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    started = time.monotonic()
    for node in nodes:
        if args.mode == "poll":

            async def first_report(n: Node = node) -> None:
                # The first report (a new lease) falls in the ramp, as a starting coild's does.
                await asyncio.sleep(random.uniform(0, args.ramp))
                await report(n, stats)
                n.pools_ok = True

            tasks.append(asyncio.create_task(first_report()))
            tasks.append(
                asyncio.create_task(periodic(args.pools, stop, lambda n=node: list_pools(n, stats)))
            )
            tasks.append(
                asyncio.create_task(periodic(args.report, stop, lambda n=node: report(n, stats)))
            )
            tasks.append(
                asyncio.create_task(
                    periodic(args.blocks, stop, lambda n=node: list_blocks(n, stats))
                )
            )
        else:

            async def start_watch(n: Node = node) -> None:
                await asyncio.sleep(random.uniform(0, args.ramp))
                delay = 0.2
                while not stop.is_set():
                    # As coild starts: its first report (the node's lease), retried with a
                    # jittered backoff until it works; its state then comes with the stream's
                    # first snapshot.
                    if args.no_lease or await lease_report(n, stats):
                        break
                    await asyncio.sleep(random.uniform(delay / 2, delay))
                    delay = min(delay * 2, 5.0)
                n.pools_ok = True
                await watch(n, stats, stop, args.resync, args.probe_pool)

            tasks.append(asyncio.create_task(start_watch()))
            if args.safety > 0:
                tasks.append(
                    asyncio.create_task(
                        periodic(args.safety, stop, lambda n=node: list_pools(n, stats))
                    )
                )
                tasks.append(
                    asyncio.create_task(
                        periodic(args.safety, stop, lambda n=node: list_blocks(n, stats))
                    )
                )
            if args.report > 0:
                tasks.append(
                    asyncio.create_task(
                        periodic(args.report, stop, lambda n=node: report(n, stats))
                    )
                )

    # Tell the parent when every node is up (or `--start-timeout` after the ramp), so that it
    # measures the quiet state, not the start; and when half, 90% and 99% of them were.
    def up() -> int:
        return sum(1 for n in nodes if (n.stream_up if args.mode == "watch" else n.pools_ok))

    shares = (0.5, 0.9, 0.99, 1.0)
    up_at: dict[str, float] = {}
    give_up = started + args.ramp + args.start_timeout
    while time.monotonic() < give_up:
        count = up()
        for share in shares:
            if f"{share:.0%}" not in up_at and count >= share * len(nodes):
                up_at[f"{share:.0%}"] = round(time.monotonic() - started, 1)
        if count == len(nodes):
            break
        await asyncio.sleep(1.0)
    print(
        json.dumps(
            {
                "ramped": True,
                "up": up(),
                "start_s": round(time.monotonic() - started, 1),
                "up_at": up_at,
            }
        ),
        flush=True,
    )
    churner = None
    if args.churn > 0:
        churner = asyncio.create_task(
            churn(nodes[: args.churn_nodes], args.churn, args.lifetime, stats, stop)
        )
    # Run until the parent closes our stdin (or the duration passes).
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reader.read(), args.duration)
    stop.set()
    if churner is not None:
        await churner
        await asyncio.sleep(args.settle)  # let the last removals reach the watchers
    not_ready = sum(1 for n in nodes if not (n.stream_up if args.mode == "watch" else n.pools_ok))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for chs in channels:
        for c in chs:
            await c.close()
    for pool in watchers:
        pool.close()
    out: dict[str, Any] = {
        "mode": args.mode,
        "nodes": args.nodes,
        "seconds": round(time.monotonic() - started, 1),
        "calls": dict(stats.calls),
        "errors": dict(stats.errors),
        "latency": {m: percentiles(v) for m, v in stats.latency.items()},
        "not_ready_at_end": not_ready,
        "snapshots": stats.snapshots,
        "resumes": stats.resumes,
        "resyncs": stats.resyncs,
        "stream_messages": stats.messages,
    }
    if args.probe_pool:
        out["probe"] = {
            "pool_seen": sorted(stats.pool_seen.values()),
            "freed_seen": stats.freed_seen,
        }
    if args.churn > 0:
        watched = {n.name for n in nodes[: args.churn_nodes]}
        out["churn"] = {
            "adds": len(stats.done_put),
            "dels": len(stats.done_del),
            "missed_puts": len({p for p in stats.done_put if p[0] in watched} - stats.seen_put),
            "missed_dels": len({p for p in stats.done_del if p[0] in watched} - stats.seen_del),
        }
    return out


def main() -> int:
    p = argparse.ArgumentParser(prog="bench.loadgen")
    p.add_argument("--allocators", required=True, help="comma-separated targets")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--node-prefix", default="sim-")
    p.add_argument("--mode", choices=("poll", "watch"), required=True)
    p.add_argument("--pools", type=float, default=10.0, help="poll: ListPools period")
    p.add_argument("--report", type=float, default=30.0, help="ReportNode period (0: never)")
    p.add_argument("--blocks", type=float, default=60.0, help="poll: ListNodeBlocks period")
    p.add_argument(
        "--safety", type=float, default=0.0, help="watch: ListPools/ListNodeBlocks period"
    )
    p.add_argument("--resync", type=float, default=600.0, help="watch: period of a fresh snapshot")
    p.add_argument("--ramp", type=float, default=10.0, help="seconds to spread the start over")
    p.add_argument("--duration", type=float, default=3600.0, help="longest run (stdin EOF ends)")
    p.add_argument("--churn", type=float, default=0.0, help="pod ADDs per second")
    p.add_argument("--churn-nodes", type=int, default=1000)
    p.add_argument("--lifetime", type=float, default=10.0, help="seconds a churned pod lives")
    p.add_argument("--settle", type=float, default=5.0)
    p.add_argument(
        "--probe-pool",
        default="",
        help="watch: note when each stream brings this pool (and every record removal)",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=0.0,
        help="longest wait for every node after the ramp",
    )
    p.add_argument("--no-lease", action="store_true", help="watch without a lease (experiments)")
    args = p.parse_args()
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    out = asyncio.run(main_async(args))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
