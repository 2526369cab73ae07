"""The gRPC face of the node agent, on a UNIX socket for the CNI plugin.

Domain errors become gRPC statuses here and nowhere else (`STATUS_OF`). The socket is created
with mode 0600, so only root (the container runtime) can connect.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from coil.v1 import nodeagent_pb2 as pb
from coil.v1 import nodeagent_pb2_grpc as pb_grpc
from coil_allocator.errors import InvalidArgument
from coil_allocator.model import Owner, parse_address
from coild import errors
from coild.agent import AllocateRequest, NodeAgent, PodAddress

log = logging.getLogger("coild")

STATUS_OF: dict[type[errors.NodeAgentError], grpc.StatusCode] = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NoPool: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Exhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.AddressTaken: grpc.StatusCode.ALREADY_EXISTS,
    errors.NotHeld: grpc.StatusCode.NOT_FOUND,
    errors.AllocatorUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.AllocatorRejected: grpc.StatusCode.INTERNAL,
    errors.RouteError: grpc.StatusCode.INTERNAL,
}

Observer = Callable[[str, str, float], None]


def _status_of(error: errors.NodeAgentError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


def _addresses_pb(addresses: list[PodAddress]) -> list[pb.PodAddress]:
    return [pb.PodAddress(address=a.cidr, gateway=a.gateway, pool=a.pool) for a in addresses]


def _attachment(message: pb.Attachment, op: str) -> tuple[str, str]:
    """The attachment's (container ID, interface), checked as the allocator will check them, so
    a bad one is refused before anything is claimed."""
    try:
        Owner("", "", message.container_id, message.interface).validate(op)
    except InvalidArgument as e:
        raise errors.InvalidRequest(str(e)) from None
    return message.container_id, message.interface


class NodeAgentServicer(pb_grpc.NodeAgentServiceServicer):
    def __init__(self, agent: NodeAgent, observe: Observer | None = None) -> None:
        self.agent = agent
        self._observe = observe or (lambda method, code, seconds: None)

    def _serve(self, method: str, context: grpc.ServicerContext, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return fn()
        except errors.NodeAgentError as e:
            code = _status_of(e)
            if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE):
                log.warning("%s failed: %s", method, e)
            context.abort(code, str(e))
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed unexpectedly", method)
            context.abort(code, f"{method}: internal error in coild; see its log")
        finally:
            self._observe(method, code.name, time.perf_counter() - started)

    def Allocate(self, request: pb.AllocateRequest, context: Any) -> pb.AllocateResponse:
        def run() -> pb.AllocateResponse:
            cid, ifname = _attachment(request.attachment, "allocate")
            requested = []
            for text in request.requested_addresses:
                try:
                    requested.append(parse_address(text, "allocate: requested address"))
                except InvalidArgument as e:
                    raise errors.InvalidRequest(str(e)) from None
            addresses = self.agent.allocate(
                AllocateRequest(
                    cid, ifname, request.namespace or "default", request.pod, tuple(requested)
                )
            )
            return pb.AllocateResponse(addresses=_addresses_pb(addresses))

        return self._serve("Allocate", context, run)

    def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        def run() -> pb.ReleaseResponse:
            cid, ifname = _attachment(request.attachment, "release")
            return pb.ReleaseResponse(addresses=[str(a) for a in self.agent.release(cid, ifname)])

        return self._serve("Release", context, run)

    def Check(self, request: pb.CheckRequest, context: Any) -> pb.CheckResponse:
        def run() -> pb.CheckResponse:
            cid, ifname = _attachment(request.attachment, "check")
            return pb.CheckResponse(addresses=_addresses_pb(self.agent.check(cid, ifname)))

        return self._serve("Check", context, run)

    def GarbageCollect(
        self, request: pb.GarbageCollectRequest, context: Any
    ) -> pb.GarbageCollectResponse:
        def run() -> pb.GarbageCollectResponse:
            valid = {(a.container_id, a.interface) for a in request.valid_attachments}
            released = self.agent.garbage_collect(valid)
            return pb.GarbageCollectResponse(
                released=[pb.Attachment(container_id=c, interface=i) for c, i in released]
            )

        return self._serve("GarbageCollect", context, run)

    def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusResponse:
        return self._serve("Status", context, lambda: pb.StatusResponse(pools=self.agent.status()))


def serve(
    agent: NodeAgent, socket_path: str, *, workers: int = 32, observe: Observer | None = None
) -> grpc.Server:
    """Serve the agent on a UNIX socket (mode 0600; a stale socket file is replaced).

    Workers bound how many requests are in flight (each waits for its group commit). 256
    workers measured no better than 32 at 128 clients: coild is bound by CPU, not by them."""
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    os.makedirs(os.path.dirname(socket_path) or ".", exist_ok=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    pb_grpc.add_NodeAgentServiceServicer_to_server(NodeAgentServicer(agent, observe), server)
    old = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix:{socket_path}")
        server.start()
    finally:
        os.umask(old)
    os.chmod(socket_path, 0o600)
    return server
