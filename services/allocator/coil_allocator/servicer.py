"""The gRPC face of the allocator: protobuf in, domain values to `Allocator`, protobuf out.

Domain errors become gRPC statuses in the server interceptor both services share
(`coil_grpc.status.ErrorsToStatus`), which also counts and times every RPC by method and outcome.
Before it, `coil_grpc.guard.AccessGuard` decides who may make each call (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent import futures
from typing import Any, TypeVar

import grpc

from coil.v1 import allocator_pb2 as pb
from coil.v1 import allocator_pb2_grpc as pb_grpc
from coil_allocator.allocator import Allocator
from coil_allocator.feed import NodeFeed
from coil_allocator.view import ClusterView
from coil_core import errors
from coil_core.model import (
    NodeChange,
    Owner,
    RecordRequest,
    ReleaseRequest,
    parse_address,
)
from coil_grpc.aio import AioServer
from coil_grpc.auditlog import AuditLog
from coil_grpc.convert import (
    FAMILY_FROM_PB,
    FAMILY_TO_PB,
    block_pb,
    node_change_pb,
    pool_pb,
    record_pb,
    record_result_pb,
    release_result_pb,
)
from coil_grpc.guard import AccessGuard
from coil_grpc.identity import Identifier
from coil_grpc.limits import ExpensiveReads
from coil_grpc.listen import listen_and_start, split_addresses
from coil_grpc.policy import DEFAULT_POLICY, Policy
from coil_grpc.status import ErrorsToStatus, Observer

log = logging.getLogger("coil.allocator")

T = TypeVar("T")

RpcObserver = Observer

DEFAULT_MAX_WATCHERS = 1000
"""WatchNode streams one replica serves at once unless told otherwise (`--max-watchers`)."""

UINT64_MAX = 2**64 - 1


def saturate(n: int) -> int:
    """Counts of IPv6 addresses and blocks can exceed uint64: report them as 2^64 - 1."""
    return min(n, UINT64_MAX)


STREAM_STARTS = 64
"""Threads for the blocking steps of WatchNode streams (their first answers, later snapshots)."""

NODE_STARTS = 8
"""Node start-up calls (a report, a node's listing, the first answer of a WatchNode stream) one
replica works on at once; the others wait their turn, in order."""

MAX_TURN_WAIT = 5.0
"""Longest wait for a turn of a call without a deadline (a WatchNode stream)."""


class NodeStarts:
    """Bounds how many node start-up calls do their work at once.

    When a whole cluster starts (or a replica's nodes all move to the other one), thousands of
    node listings, reports and stream snapshots arrive within a minute. Worked on all at once
    they share one interpreter: each takes seconds, callers time out and retry, and the replica
    spends its time on answers nobody waits for. In turns, each is done in milliseconds; a call
    whose caller would have given up before its turn comes is refused at once (UNAVAILABLE: try
    again), and nothing of it is done."""

    def __init__(self, limit: int = NODE_STARTS) -> None:
        self.limit = limit
        self._turns = threading.BoundedSemaphore(limit)

    @contextlib.contextmanager
    def turn(self, context: Any, op: str, since: float | None = None) -> Iterator[None]:
        """A turn for `op`, waited for no longer than the call's deadline allows, and at most
        `MAX_TURN_WAIT` from `since` (a `time.monotonic()`; default now)."""
        left = context.time_remaining()
        wait = MAX_TURN_WAIT if left is None else min(MAX_TURN_WAIT, left - 0.25)
        if since is not None:
            wait = min(wait, since + MAX_TURN_WAIT - time.monotonic())
        if wait <= 0 or not self._turns.acquire(timeout=wait):
            raise errors.Unavailable(
                f"{op}: this allocator is busy with other nodes starting; try again"
            )
        try:
            yield
        finally:
            self._turns.release()


class AllocatorServicer(pb_grpc.AllocatorServiceServicer):
    """Serves `coil.v1.AllocatorService` from an `Allocator`.

    Every method but WatchNode is a blocking call (run on the server's thread pool). WatchNode is
    a coroutine on the server's event loop: a stream waiting for changes holds no thread, and a
    pool change reaches ten thousand streams without waking as many threads. Its blocking steps
    (taking the node's lease over, a snapshot) run on a pool of their own, `STREAM_STARTS`
    threads, so that streams starting in a crowd never take the threads of the unary calls.

    The streams come from the allocator's view; an allocator built without one (tests, tools)
    gets a view of its own at the first WatchNode. At most `max_watchers` streams are served at
    once; one more is refused with UNAVAILABLE, so that the node agent tries again, possibly on
    another replica.
    """

    def __init__(
        self,
        allocator: Allocator,
        max_watchers: int = DEFAULT_MAX_WATCHERS,
        node_starts: NodeStarts | None = None,
    ) -> None:
        self.allocator = allocator
        self.max_watchers = max_watchers
        self.node_starts = node_starts or NodeStarts()
        self._watchers = 0
        self._lock = threading.Lock()
        self._feed: NodeFeed | None = None
        self._starts = futures.ThreadPoolExecutor(STREAM_STARTS, thread_name_prefix="watch-start")
        # The last change sent and its message: a pool change is one value for every stream.
        self._last: tuple[NodeChange, pb.WatchNodeResponse] | None = None

    def feed(self) -> NodeFeed:
        with self._lock:
            if self._feed is None:
                view = self.allocator.view
                if view is None:
                    view = ClusterView(self.allocator.store, self.allocator.keys)
                    view.start(wait=5)
                self._feed = NodeFeed(
                    view,
                    self.allocator.store,
                    self.allocator.nodes.node_snapshot,
                    self.allocator.node_ttl,
                    self.allocator.nodes.alive_lease,
                )
            return self._feed

    def close(self) -> None:
        """Let go of the stream-start threads (the server has stopped)."""
        self._starts.shutdown(wait=False, cancel_futures=True)

    def _message(self, change: NodeChange) -> pb.WatchNodeResponse:
        if change.snapshot:
            return node_change_pb(change)  # one node's: keep the shared one cached
        last = self._last
        if last is not None and last[0] is change:
            return last[1]
        message = node_change_pb(change)
        self._last = (change, message)
        return message

    async def WatchNode(
        self, request: pb.WatchNodeRequest, context: Any
    ) -> AsyncIterator[pb.WatchNodeResponse]:
        loop = asyncio.get_running_loop()
        opened = time.monotonic()

        def run(call: Callable[[], T]) -> Awaitable[T]:
            return loop.run_in_executor(self._starts, call)

        feed = await run(self.feed)
        follow = feed.follow(request.node, request.revision, request.lease_id)
        with self._lock:
            if self._watchers >= self.max_watchers:
                raise errors.Unavailable(
                    f"watch node: this allocator serves {self.max_watchers} watchers already; "
                    "try again (another replica)"
                )
            self._watchers += 1
        try:

            def first() -> NodeChange | None:
                if follow.closed:
                    return None  # the client went away while this waited for a thread
                # The first answer (taking the lease over, a snapshot) is the costly part.
                with self.node_starts.turn(context, "watch node", since=opened):
                    return follow.start(loop)

            change = await run(first)
            if change is None:
                return
            yield self._message(change)
            if change.lease_lost:
                return
            async with contextlib.aclosing(follow.rest(run)) as changes:
                async for change in changes:
                    yield self._message(change)
        finally:
            # Also when the client went away or the server stops (the coroutine is cancelled):
            # a start still running lets go of what it takes when it ends.
            follow.close()
            with self._lock:
                self._watchers -= 1

    def watchers(self) -> int:
        with self._lock:
            return self._watchers

    def CreatePool(self, request: pb.CreatePoolRequest, context: Any) -> pb.CreatePoolResponse:
        pool = self.allocator.create_pool(
            request.name, list(request.subnets), request.block_size_bits
        )
        return pb.CreatePoolResponse(pool=pool_pb(pool))

    def AddSubnet(self, request: pb.AddSubnetRequest, context: Any) -> pb.AddSubnetResponse:
        return pb.AddSubnetResponse(
            pool=pool_pb(self.allocator.add_subnet(request.pool, request.subnet))
        )

    def ListPools(self, request: pb.ListPoolsRequest, context: Any) -> pb.ListPoolsResponse:
        return pb.ListPoolsResponse(pools=[pool_pb(p) for p in self.allocator.list_pools()])

    def GetPool(self, request: pb.GetPoolRequest, context: Any) -> pb.GetPoolResponse:
        pool, subnets = self.allocator.get_pool(request.name, request.subnet)
        return pb.GetPoolResponse(
            pool=pool_pb(pool),
            subnets=[
                pb.SubnetBlocks(
                    subnet=str(s.subnet),
                    total_blocks=saturate(s.total_blocks),
                    held=[block_pb(b) for b in s.held],
                )
                for s in subnets
            ],
        )

    def DeletePool(self, request: pb.DeletePoolRequest, context: Any) -> pb.DeletePoolResponse:
        self.allocator.delete_pool(request.name)
        return pb.DeletePoolResponse()

    def ClaimBlock(self, request: pb.ClaimBlockRequest, context: Any) -> pb.ClaimBlockResponse:
        if request.block:
            held = self.allocator.claim_specific_block(request.node, request.pool, request.block)
            return pb.ClaimBlockResponse(block=block_pb(held))
        family = FAMILY_FROM_PB.get(request.family)
        if family is None and request.family != pb.FAMILY_UNSPECIFIED:
            raise errors.InvalidArgument(f"block claim: unknown family {request.family}")
        block, retries = self.allocator.claim_block(request.node, request.pool, family)
        return pb.ClaimBlockResponse(block=block_pb(block), retries=retries)

    def ReleaseBlock(
        self, request: pb.ReleaseBlockRequest, context: Any
    ) -> pb.ReleaseBlockResponse:
        self.allocator.release_block(request.node, request.pool, request.block)
        return pb.ReleaseBlockResponse()

    def ListNodeBlocks(
        self, request: pb.ListNodeBlocksRequest, context: Any
    ) -> pb.ListNodeBlocksResponse:
        with self.node_starts.turn(context, "node blocks"):
            blocks, records, revision, next_token = self.allocator.node_blocks_page(
                request.node, request.with_records, request.page_size, request.page_token
            )
        return pb.ListNodeBlocksResponse(
            blocks=[block_pb(b) for b in blocks],
            records=[record_pb(r) for r in records],
            revision=revision,
            next_page_token=next_token,
        )

    def ReleaseNode(self, request: pb.ReleaseNodeRequest, context: Any) -> pb.ReleaseNodeResponse:
        blocks, removed = self.allocator.release_node(request.node, request.force)
        return pb.ReleaseNodeResponse(blocks=[block_pb(b) for b in blocks], records_removed=removed)

    def RecordAllocations(
        self, request: pb.RecordAllocationsRequest, context: Any
    ) -> pb.RecordAllocationsResponse:
        # Items that fail validation get an INVALID result of their own; the rest are recorded.
        valid: list[RecordRequest] = []
        where: list[int] = []
        results: list[pb.RecordResult | None] = [None] * len(request.items)
        for i, item in enumerate(request.items):
            owner = Owner(
                item.owner.namespace, item.owner.pod, item.owner.container_id, item.owner.interface
            )
            try:
                valid.append(RecordRequest.from_strings(item.address, item.pool, item.block, owner))
                where.append(i)
            except errors.InvalidArgument as e:
                results[i] = pb.RecordResult(outcome=pb.RECORD_OUTCOME_INVALID, message=str(e))
        for i, result in zip(where, self.allocator.record(request.node, valid), strict=True):
            results[i] = record_result_pb(result)
        return pb.RecordAllocationsResponse(results=[r for r in results if r is not None])

    def ReleaseAllocations(
        self, request: pb.ReleaseAllocationsRequest, context: Any
    ) -> pb.ReleaseAllocationsResponse:
        valid: list[ReleaseRequest] = []
        where: list[int] = []
        results: list[pb.ReleaseResult | None] = [None] * len(request.items)
        for i, item in enumerate(request.items):
            try:
                address = parse_address(item.address, "release")
            except errors.InvalidArgument as e:
                results[i] = pb.ReleaseResult(outcome=pb.RELEASE_OUTCOME_INVALID, message=str(e))
                continue
            valid.append(ReleaseRequest(address, item.container_id, item.interface))
            where.append(i)
        for i, result in zip(where, self.allocator.release(request.node, valid), strict=True):
            results[i] = release_result_pb(result)
        return pb.ReleaseAllocationsResponse(results=[r for r in results if r is not None])

    def GetAddress(self, request: pb.GetAddressRequest, context: Any) -> pb.GetAddressResponse:
        info = self.allocator.address_info(request.address)
        out = pb.GetAddressResponse(pool=info.pool, block=str(info.block), node=info.node)
        if info.record is not None:
            out.record.CopyFrom(record_pb(info.record))
        return out

    def FreeAddress(self, request: pb.FreeAddressRequest, context: Any) -> pb.FreeAddressResponse:
        return pb.FreeAddressResponse(
            record=record_pb(self.allocator.free_address(request.address))
        )

    def GetUsage(self, request: pb.GetUsageRequest, context: Any) -> pb.GetUsageResponse:
        return pb.GetUsageResponse(
            usage=[
                pb.PoolUsage(
                    pool=u.pool,
                    family=FAMILY_TO_PB[u.family],
                    blocks_held=u.blocks_held,
                    blocks_total=saturate(u.blocks_total),
                    addresses_used=u.addresses_used,
                    addresses_total=saturate(u.addresses_total),
                )
                for u in self.allocator.usage()
            ]
        )

    def ReportNode(self, request: pb.ReportNodeRequest, context: Any) -> pb.ReportNodeResponse:
        with self.node_starts.turn(context, "node report"):
            lease_id, ttl = self.allocator.report_node(
                request.node, request.lease_id, list(request.routes), request.table
            )
        return pb.ReportNodeResponse(lease_id=lease_id, ttl=ttl)

    def CheckStore(self, request: pb.CheckStoreRequest, context: Any) -> pb.CheckStoreResponse:
        grace = request.empty_grace_seconds if request.HasField("empty_grace_seconds") else 600
        if grace < 0:
            raise errors.InvalidArgument(f"check: empty grace {grace} s is negative")
        findings, revision = self.allocator.check_store(request.repair, grace)
        return pb.CheckStoreResponse(
            findings=[
                pb.Finding(
                    severity=int(f.severity),  # type: ignore[arg-type]
                    kind=f.kind,
                    subject=f.subject,
                    message=f.message,
                    repaired=f.repaired,
                )
                for f in findings
            ],
            revision=revision,
        )


def serve(
    allocator: Allocator,
    listen: str | Sequence[str],
    *,
    workers: int = 32,
    max_watchers: int = DEFAULT_MAX_WATCHERS,
    observe: Observer | None = None,
    credentials: grpc.ServerCredentials | None = None,
    health: Any = None,
    policy: Policy = DEFAULT_POLICY,
    insecure: bool = False,
    expensive_reads: int = 4,
    audit: AuditLog | None = None,
) -> tuple[AioServer, int]:
    """Start a gRPC server for `allocator` on `listen`: "host:port" or "unix:PATH" addresses, a
    list or comma-separated.

    Every call goes first through `coil_grpc.guard.AccessGuard` (who calls, what it may do,
    expensive reads bounded to `expensive_reads`, audit), then through the error mapping. UNIX
    sockets are plaintext, mode 0600; TCP needs `credentials` unless `insecure` (then callers
    without a certificate are operators). Returns the started server and the first TCP port
    bound (0 when there is none). Raises ValueError when an address is refused or cannot be bound.
    """
    guard = AccessGuard(
        Identifier(policy, insecure=insecure),
        audit=audit,
        reads=ExpensiveReads(expensive_reads),
        refused=(lambda method, code: observe(method, code, 0.0)) if observe else None,
    )
    errors_to_status = ErrorsToStatus(
        "coil.v1.AllocatorService", log, "internal error; see the allocator's log", observe
    )
    # WatchNode streams wait on the server's event loop, not in threads: `workers` threads
    # serve the blocking calls.
    server = AioServer(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
        interceptors=[guard, errors_to_status],
    )
    servicer = AllocatorServicer(allocator, max_watchers)
    server.on_stop(servicer.close)
    pb_grpc.add_AllocatorServiceServicer_to_server(servicer, server.server)
    if health is not None:
        from grpc_health.v1 import health_pb2_grpc

        health_pb2_grpc.add_HealthServicer_to_server(health, server.server)
    try:
        port = listen_and_start(
            server, split_addresses(listen), credentials, insecure=insecure, what="allocator"
        )
    except BaseException:
        server.stop(None)
        raise
    return server, port


__all__ = ["AllocatorServicer", "serve", "ipaddress"]
