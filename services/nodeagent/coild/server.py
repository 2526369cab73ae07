"""The gRPC face of the node agent, on a UNIX socket for the CNI plugin.

Domain errors become gRPC statuses in the server interceptor both services share
(`coil_grpc.status.ErrorsToStatus`), which also counts and times every RPC. Before it,
`coil_grpc.guard.AccessGuard` knows the caller: the socket is mode 0600 from its creation, so only
root (the container runtime) can connect, and root is an operator (docs/security.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import stat
import weakref
from concurrent import futures
from typing import Any

import grpc

from coil.v1 import nodeagent_pb2 as pb
from coil.v1 import nodeagent_pb2_grpc as pb_grpc
from coil_core.rules import parse_address, validate_attachment, validate_pod
from coil_grpc.auditlog import AuditLog
from coil_grpc.guard import AccessGuard
from coil_grpc.identity import Identifier
from coil_grpc.listen import listen_and_start
from coil_grpc.policy import DEFAULT_POLICY
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


class SocketError(Exception):
    """coild cannot take its socket path: another coild holds it, or the path is not a socket
    (coild refuses to delete a regular file or a directory in its place)."""


class AgentSocket:
    """coild's claim on its socket path, so that two coilds never share one.

    `claim` takes an exclusive lock on ``<path>.lock`` (flock, held for the life of the
    process) and refuses if another coild holds it; it then removes a socket left by a coild that
    died (nobody holds the lock, so nobody serves on it) and refuses a path that is anything but
    a socket. `bound` notes which socket this coild created; `release` unlinks only that one;
    `problem` says why the socket does not answer for this coild (for readiness).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock_path = f"{path}.lock"
        self._lock_fd: int | None = None
        self._identity: tuple[int, int] | None = None

    def claim(self) -> None:
        """Raises SocketError (held by another coild; not a socket; cannot be created)."""
        directory = os.path.dirname(self.path) or "."
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise SocketError(f"socket {self.path!r}: cannot create its lock: {e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SocketError(
                f"socket {self.path!r}: another coild serves on it (it holds {self.lock_path!r})"
            ) from None
        self._lock_fd = fd
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        except OSError as e:
            self.release()
            raise SocketError(f"socket {self.path!r}: {e.strerror or e}") from None
        if not stat.S_ISSOCK(mode):
            self.release()
            kind = "a directory" if stat.S_ISDIR(mode) else "not a socket"
            raise SocketError(
                f"socket {self.path!r}: the path is {kind}; coild will not replace it "
                "(remove it, or choose another --socket)"
            )
        os.unlink(self.path)  # left by a coild that died: nobody holds the lock

    def bound(self) -> None:
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)

    def problem(self) -> str | None:
        """None if this coild's socket is in place and accepts connections; else why not."""
        try:
            st = os.stat(self.path)
        except OSError as e:
            return f"socket {self.path!r}: {e.strerror or e}"
        if (st.st_dev, st.st_ino) != self._identity:
            return f"socket {self.path!r} is not the one this coild created"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(self.path)
            except OSError as e:
                return f"socket {self.path!r} does not answer: {e.strerror or e}"
        return None

    def release(self) -> None:
        """Unlink the socket if it is the one this coild created; drop the lock."""
        if self._identity is not None:
            with contextlib.suppress(OSError):
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._identity:
                    os.unlink(self.path)
            self._identity = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def serve(
    agent: NodeAgent,
    socket_path: str,
    *,
    workers: int = 32,
    observe: Observer | None = None,
    claim: AgentSocket | None = None,
    audit: AuditLog | None = None,
) -> grpc.Server:
    """Serve the agent on a UNIX socket: mode 0600 from its creation, in a directory others cannot
    write (`coil_grpc.listen`). ``claim`` is the socket's `AgentSocket`, already claimed; without
    one, it is claimed here and released when the server is collected. Every call goes first
    through `coil_grpc.guard.AccessGuard`: only an operator, that is root on this node, may call.
    Raises SocketError, or ValueError when the socket cannot be served safely.

    Workers bound how many requests are in flight (each waits for its group commit). 256
    workers measured no better than 32 at 128 clients: coild is bound by CPU, not by them."""
    if claim is None:
        claim = AgentSocket(socket_path)
        claim.claim()
    guard = AccessGuard(
        Identifier(DEFAULT_POLICY),
        audit=audit,
        refused=(lambda method, code: observe(method, code, 0.0)) if observe else None,
    )
    interceptor = ErrorsToStatus(
        "coil.v1.NodeAgentService", log, "internal error in coild; see its log", observe
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers), interceptors=[guard, interceptor]
    )
    pb_grpc.add_NodeAgentServiceServicer_to_server(NodeAgentServicer(agent), server)
    try:
        listen_and_start(server, [f"unix:{socket_path}"], what="coild")
    except BaseException:
        server.stop(None)
        raise
    claim.bound()
    weakref.finalize(server, claim.release)
    return server
