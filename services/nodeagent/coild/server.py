"""The gRPC face of the node agent, on a UNIX socket for the CNI plugin.

Domain errors become gRPC statuses in the server interceptor both services share
(`coil_grpc.status.ErrorsToStatus`), which also counts and times every RPC. The socket is created
with mode 0600, so only root (the container runtime) can connect.
"""

from __future__ import annotations

import logging
import os
from concurrent import futures
from typing import Any

import grpc

from coil.v1 import nodeagent_pb2 as pb
from coil.v1 import nodeagent_pb2_grpc as pb_grpc
from coil_core.rules import parse_address, validate_attachment, validate_pod
from coil_grpc.status import ErrorsToStatus, Observer
from coild.agent import AllocateRequest, NodeAgent, PodAddress
from coild.errors import InvalidRequest

log = logging.getLogger("coild")


def _addresses_pb(addresses: list[PodAddress]) -> list[pb.PodAddress]:
    return [pb.PodAddress(address=a.cidr, gateway=a.gateway, pool=a.pool) for a in addresses]


def _attachment(message: pb.Attachment, op: str) -> tuple[str, str]:
    """The attachment's (container ID, interface), checked as the allocator will check them, so
    a bad one is refused before anything is claimed."""
    validate_attachment(message.container_id, message.interface, op)
    return message.container_id, message.interface


class NodeAgentServicer(pb_grpc.NodeAgentServiceServicer):
    """Protobuf in, domain values to `NodeAgent`, protobuf out; errors pass to the interceptor."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    def Allocate(self, request: pb.AllocateRequest, context: Any) -> pb.AllocateResponse:
        cid, ifname = _attachment(request.attachment, "allocate")
        validate_pod(request.namespace, request.pod, "allocate")
        requested = [
            parse_address(text, "allocate: requested address")
            for text in request.requested_addresses
        ]
        addresses = self.agent.allocate(
            AllocateRequest(
                cid, ifname, request.namespace or "default", request.pod, tuple(requested)
            )
        )
        return pb.AllocateResponse(addresses=_addresses_pb(addresses))

    def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        cid, ifname = _attachment(request.attachment, "release")
        return pb.ReleaseResponse(addresses=[str(a) for a in self.agent.release(cid, ifname)])

    def Check(self, request: pb.CheckRequest, context: Any) -> pb.CheckResponse:
        cid, ifname = _attachment(request.attachment, "check")
        return pb.CheckResponse(addresses=_addresses_pb(self.agent.check(cid, ifname)))

    def GarbageCollect(
        self, request: pb.GarbageCollectRequest, context: Any
    ) -> pb.GarbageCollectResponse:
        if not request.valid_list_complete:
            # An empty message, or one whose fields did not decode, reads as "nothing is valid":
            # only an explicit mark may release every attachment not listed.
            raise InvalidRequest(
                f"garbage collect: refused: valid_list_complete is not set (got "
                f"{len(request.valid_attachments)} valid attachment(s)); a garbage collection "
                "must say that its list of valid attachments is complete"
            )
        valid = {(a.container_id, a.interface) for a in request.valid_attachments}
        released = self.agent.garbage_collect(valid)
        return pb.GarbageCollectResponse(
            released=[pb.Attachment(container_id=c, interface=i) for c, i in released]
        )

    def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusResponse:
        return pb.StatusResponse(pools=self.agent.status())


def serve(
    agent: NodeAgent, socket_path: str, *, workers: int = 32, observe: Observer | None = None
) -> grpc.Server:
    """Serve the agent on a UNIX socket (mode 0600; a stale socket file is replaced).

    Workers bound how many requests are in flight (each waits for its group commit). 256
    workers measured no better than 32 at 128 clients: coild is bound by CPU, not by them."""
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    os.makedirs(os.path.dirname(socket_path) or ".", exist_ok=True)
    interceptor = ErrorsToStatus(
        "coil.v1.NodeAgentService", log, "internal error in coild; see its log", observe
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers), interceptors=[interceptor]
    )
    pb_grpc.add_NodeAgentServiceServicer_to_server(NodeAgentServicer(agent), server)
    old = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix:{socket_path}")
        server.start()
    finally:
        os.umask(old)
    os.chmod(socket_path, 0o600)
    return server
