"""The plugin's calls to coild: one unary RPC per command over coild's UNIX socket.

The call itself is `coil_cni.rpc` (gRPC over HTTP/2 without grpcio, whose import would be most of
the plugin's start-up). Each call raises ``CNIError`` (via ``errors.error_from_status``) when
coild answers with an error status or cannot be reached; nothing here retries: the runtime does.
"""

from __future__ import annotations

from coil_cni import rpc, wire
from coil_cni.config import Address, Attachment, CniArgs, IpamConfig
from coil_cni.errors import INVALID_CONFIG, OTHER, CNIError, cut, error_from_status

SERVICE = "/coil.v1.NodeAgentService/"


def _addresses(response: bytes, subject: str) -> list[Address]:
    try:
        return [Address(address=a, gateway=g) for a, g in wire.pod_addresses(response)]
    except (ValueError, UnicodeDecodeError) as e:
        raise CNIError(OTHER, f"coil {subject}: coild's answer is not readable: {e}") from None


class NodeAgent:
    """A connection to coild for one command.

    Calls wait for coild to accept until the configured timeout, so a coild that is restarting
    does not fail the pod; after the timeout the call fails with DEADLINE_EXCEEDED, which becomes
    CNI code 11. Messages are encoded by `coil_cni.wire` (no generated stubs: they and protobuf's
    runtime would cost every pod their import).
    """

    def __init__(self, ipam: IpamConfig, command: str) -> None:
        self._ipam = ipam
        self._command = command

    def _call(self, method: str, request: bytes, subject: str) -> bytes:
        if len(request) > rpc.SEND_LIMIT:
            # coild's gRPC server would refuse it with RESOURCE_EXHAUSTED, which reads as "pool
            # exhausted"; what made it this large is the configuration (a GC list, static IPs).
            raise CNIError(
                INVALID_CONFIG,
                f"coil {self._command} {subject}: the request to coild is {len(request)} bytes, "
                f"over the {rpc.SEND_LIMIT}-byte message limit of coild's gRPC server",
            )
        try:
            return rpc.call(self._ipam.socket, SERVICE + method, request, self._ipam.timeout)
        except rpc.RpcError as e:
            raise error_from_status(
                e.status,
                e.message,
                command=self._command,
                subject=subject,
                socket=self._ipam.socket,
                transport=e.transport,
            ) from None

    def allocate(self, attachment: Attachment, pod: CniArgs, requested: list[str]) -> list[Address]:
        """Addresses coild gives the attachment (the same ones on a repeated ADD)."""
        request = wire.allocate_request(
            attachment.container_id, attachment.ifname, pod.namespace, pod.pod, requested
        )
        pod_name = cut(f"{pod.namespace}/{pod.pod or '?'}")
        subject = f"{attachment} (pod {pod_name})"
        return _addresses(self._call("Allocate", request, subject), subject)

    def release(self, attachment: Attachment) -> None:
        """Release the attachment's addresses; success if it holds none."""
        request = wire.attachment_request(attachment.container_id, attachment.ifname)
        self._call("Release", request, str(attachment))

    def check(self, attachment: Attachment) -> list[Address]:
        """The attachment's addresses; NOT_FOUND (CNI code 3) if it holds none."""
        request = wire.attachment_request(attachment.container_id, attachment.ifname)
        return _addresses(self._call("Check", request, str(attachment)), str(attachment))

    def garbage_collect(self, valid: list[Attachment]) -> None:
        """Release every attachment of this node that is not in ``valid``."""
        request = wire.gc_request([(a.container_id, a.ifname) for a in valid])
        self._call("GarbageCollect", request, f"garbage collection ({len(valid)} valid)")

    def status(self) -> None:
        """Return if coild can serve allocations."""
        self._call("Status", b"", "status")
