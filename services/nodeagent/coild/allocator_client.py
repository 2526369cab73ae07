"""coild's client of the allocator: each method is one RPC with a deadline. Requests and answers
are coil's core values (`coil_core.model`), converted by `coil_grpc.convert`: nothing generated
leaves this module. gRPC statuses become coild's domain errors here, once (`_ERRORS`).

UNAVAILABLE, DEADLINE_EXCEEDED and CANCELLED become `AllocatorUnavailable`; ABORTED and
FAILED_PRECONDITION `AllocatorConflict` (both mean "try again", CNI 11 at the plugin);
RESOURCE_EXHAUSTED `Exhausted`; ALREADY_EXISTS `AddressTaken`; NOT_FOUND `NoPool` for pool
look-ups; INVALID_ARGUMENT `InvalidRequest`; everything else `AllocatorRejected` with the
allocator's message. Nothing is retried here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from coil.v1 import allocator_pb2 as pb
from coil.v1 import allocator_pb2_grpc as pb_grpc
from coil_core.model import (
    HeldBlock,
    NodeBlocks,
    NodeChange,
    Pool,
    RecordRequest,
    RecordResult,
    ReleaseRequest,
    ReleaseResult,
)
from coil_grpc.convert import (
    block_from,
    node_change_from,
    pool_from,
    record_from,
    record_item_pb,
    record_result_from,
    release_item_pb,
    release_result_from,
)
from coild.errors import (
    AddressTaken,
    AllocatorConflict,
    AllocatorRejected,
    AllocatorUnavailable,
    Exhausted,
    InvalidRequest,
    NodeAgentError,
    NoPool,
    WatchUnsupported,
)

T = TypeVar("T")

_ERRORS: dict[grpc.StatusCode, type[NodeAgentError]] = {
    # Outcome unknown or the allocator (or etcd) out of reach: try again.
    grpc.StatusCode.UNAVAILABLE: AllocatorUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: AllocatorUnavailable,
    grpc.StatusCode.CANCELLED: AllocatorUnavailable,
    # Lost races, or state that changed under the request: try again.
    grpc.StatusCode.ABORTED: AllocatorConflict,
    grpc.StatusCode.FAILED_PRECONDITION: AllocatorConflict,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Exhausted,
    grpc.StatusCode.ALREADY_EXISTS: AddressTaken,
    grpc.StatusCode.NOT_FOUND: NoPool,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    # Not the caller's to fix by retrying: coild's configuration, or a bug.
    grpc.StatusCode.UNAUTHENTICATED: AllocatorRejected,
    grpc.StatusCode.PERMISSION_DENIED: AllocatorRejected,
    grpc.StatusCode.OUT_OF_RANGE: AllocatorRejected,
    grpc.StatusCode.UNIMPLEMENTED: AllocatorRejected,
    grpc.StatusCode.INTERNAL: AllocatorRejected,
    grpc.StatusCode.UNKNOWN: AllocatorRejected,
    grpc.StatusCode.DATA_LOSS: AllocatorRejected,
}
"""Every status the allocator can answer, to the coild error that carries its meaning on (and
so, through `coil_grpc.status`, to the status coild answers the CNI plugin with)."""


class AllocatorClient:
    """Thread-safe; one channel for the life of coild (gRPC reconnects by itself)."""

    def __init__(
        self,
        address: str,
        timeout: float = 5.0,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str = "",
    ) -> None:
        self.address = address
        self.timeout = timeout
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 30_000),
            # Reconnect quickly after the allocator restarts.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ]
        # Over a UNIX socket gRPC would check the certificate against the socket's path.
        if credentials and (server_name or address.startswith("unix:")):
            options.append(("grpc.ssl_target_name_override", server_name or "localhost"))
        self._channel = (
            grpc.secure_channel(address, credentials, options=options)
            if credentials
            else grpc.insecure_channel(address, options=options)
        )
        self._stub = pb_grpc.AllocatorServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def watch_node(self, node: str, revision: int, lease_id: int) -> NodeWatch:
        """Open a WatchNode stream: the node's changes after `revision` (0: a snapshot first).
        Iterating the answer gives `NodeChange`s and raises the errors `_call` would; its
        `cancel()` ends it from any thread. The stream waits for a connection (no deadline)."""
        request = pb.WatchNodeRequest(node=node, revision=revision, lease_id=lease_id)
        return NodeWatch(self, self._stub.WatchNode(request, wait_for_ready=True))

    def _error(self, what: str, e: grpc.RpcError) -> NodeAgentError:
        code = e.code()
        cls = _ERRORS.get(code, AllocatorRejected)
        if cls is AllocatorUnavailable:
            return AllocatorUnavailable(
                f"{what}: allocator at {self.address} unreachable ({code.name}): {e.details()}"
            )
        return cls(e.details() or f"{what}: {code.name}")

    def _call(self, what: str, fn: Callable[..., T], request: Any) -> T:
        try:
            # Wait for a connection (up to the deadline) rather than fail at once while the
            # channel reconnects: an allocator that restarts must not fail pods in between.
            return fn(request, timeout=self.timeout, wait_for_ready=True)
        except grpc.RpcError as e:
            raise self._error(what, e) from None

    def list_pools(self) -> list[Pool]:
        pools = self._call("list pools", self._stub.ListPools, pb.ListPoolsRequest()).pools
        return [pool_from(p) for p in pools]

    def claim_block(self, node: str, pool: str, family: int, block: str = "") -> HeldBlock:
        """family: 4 or 6. With `block`, claim exactly that block."""
        request = pb.ClaimBlockRequest(
            node=node,
            pool=pool,
            family=pb.FAMILY_IPV4 if family == 4 else pb.FAMILY_IPV6,
            block=block,
        )
        return block_from(self._call("claim block", self._stub.ClaimBlock, request).block)

    def release_block(self, node: str, pool: str, block: str) -> None:
        self._call(
            "release block",
            self._stub.ReleaseBlock,
            pb.ReleaseBlockRequest(node=node, pool=pool, block=block),
        )

    def node_blocks(self, node: str) -> NodeBlocks:
        """The blocks the node holds and their records (oldest first), read at one revision."""
        answer = self._call(
            "list node blocks",
            self._stub.ListNodeBlocks,
            pb.ListNodeBlocksRequest(node=node, with_records=True),
        )
        return NodeBlocks(
            tuple(block_from(b) for b in answer.blocks),
            tuple(record_from(r) for r in answer.records),
        )

    def record(self, node: str, items: Sequence[RecordRequest]) -> list[RecordResult]:
        response = self._call(
            "record allocations",
            self._stub.RecordAllocations,
            pb.RecordAllocationsRequest(node=node, items=[record_item_pb(i) for i in items]),
        )
        return [record_result_from(r) for r in response.results]

    def release(self, node: str, items: Sequence[ReleaseRequest]) -> list[ReleaseResult]:
        response = self._call(
            "release allocations",
            self._stub.ReleaseAllocations,
            pb.ReleaseAllocationsRequest(node=node, items=[release_item_pb(i) for i in items]),
        )
        return [release_result_from(r) for r in response.results]

    def report_node(
        self, node: str, lease_id: int, routes: list[str], table: int
    ) -> tuple[int, int]:
        """Heartbeat: returns the lease to send next time and its TTL."""
        request = pb.ReportNodeRequest(node=node, lease_id=lease_id, routes=routes, table=table)
        response = self._call("report node", self._stub.ReportNode, request)
        return int(response.lease_id), int(response.ttl)


class NodeWatch:
    """One WatchNode stream (see `AllocatorClient.watch_node`)."""

    def __init__(self, client: AllocatorClient, call: Any) -> None:
        self._client = client
        self._call = call
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self._call.cancel()

    def __iter__(self) -> Iterator[NodeChange]:
        try:
            for message in self._call:
                yield node_change_from(message)
        except grpc.RpcError as e:
            if self.cancelled:
                return
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise WatchUnsupported(
                    f"watch node: the allocator at {self._client.address} has no WatchNode"
                ) from None
            raise self._client._error("watch node", e) from None
