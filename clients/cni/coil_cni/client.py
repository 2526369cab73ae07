"""The plugin's calls to coild: one unary RPC per command over coild's UNIX socket.

Only commands that call coild import this module, because grpc and the generated stubs are most of
the plugin's start-up. Each call raises ``CNIError`` (via ``errors.error_from_status``) when coild
answers with an error status or cannot be reached; nothing here retries: the runtime does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from coil.v1 import nodeagent_pb2, nodeagent_pb2_grpc
from coil_cni.config import Address, Attachment, IpamConfig, PodRef
from coil_cni.errors import error_from_status


def _attachment(attachment: Attachment) -> nodeagent_pb2.Attachment:
    return nodeagent_pb2.Attachment(
        container_id=attachment.container_id, interface=attachment.ifname
    )


def _addresses(response: Any) -> list[Address]:
    return [Address(address=a.address, gateway=a.gateway) for a in response.addresses]


class NodeAgent:
    """A connection to coild for one command.

    Calls wait for coild to accept (``wait_for_ready``) until the configured timeout, so a coild
    that is restarting does not fail the pod; after the timeout the call fails with
    DEADLINE_EXCEEDED, which becomes CNI code 11.
    """

    def __init__(self, ipam: IpamConfig, command: str) -> None:
        self._ipam = ipam
        self._command = command
        self._channel = grpc.insecure_channel(f"unix:{ipam.socket}")
        self._stub = nodeagent_pb2_grpc.NodeAgentServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., Any], request: Any, subject: str) -> Any:
        try:
            return method(request, timeout=self._ipam.timeout, wait_for_ready=True)
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            details = (e.details() if isinstance(e, grpc.Call) else None) or str(e)
            raise error_from_status(
                code.name if code is not None else "UNKNOWN",
                details,
                command=self._command,
                subject=subject,
                socket=self._ipam.socket,
            ) from None

    def allocate(self, attachment: Attachment, pod: PodRef, requested: list[str]) -> list[Address]:
        """Addresses coild gives the attachment (the same ones on a repeated ADD)."""
        request = nodeagent_pb2.AllocateRequest(
            attachment=_attachment(attachment),
            namespace=pod.namespace,
            pod=pod.pod,
            requested_addresses=requested,
        )
        subject = f"{attachment} (pod {pod.namespace}/{pod.pod or '?'})"
        return _addresses(self._call(self._stub.Allocate, request, subject))

    def release(self, attachment: Attachment) -> None:
        """Release the attachment's addresses; success if it holds none."""
        request = nodeagent_pb2.ReleaseRequest(attachment=_attachment(attachment))
        self._call(self._stub.Release, request, str(attachment))

    def check(self, attachment: Attachment) -> list[Address]:
        """The attachment's addresses; NOT_FOUND (CNI code 3) if it holds none."""
        request = nodeagent_pb2.CheckRequest(attachment=_attachment(attachment))
        return _addresses(self._call(self._stub.Check, request, str(attachment)))

    def garbage_collect(self, valid: list[Attachment]) -> None:
        """Release every attachment of this node that is not in ``valid``."""
        request = nodeagent_pb2.GarbageCollectRequest(
            valid_attachments=[_attachment(a) for a in valid]
        )
        self._call(self._stub.GarbageCollect, request, f"garbage collection ({len(valid)} valid)")

    def status(self) -> None:
        """Return if coild can serve allocations."""
        self._call(self._stub.Status, nodeagent_pb2.StatusRequest(), "status")
