"""Domain errors of the node agent (coild).

Library errors (netlink, gRPC, etcd) are turned into these at the edge where they happen, so callers
and the gRPC layer only ever see coild's own exceptions. Each subclasses the `coil_core.errors`
class of the same meaning, so the one status mapping of both servers (`coil_grpc.status`) gives it
its gRPC status; the status named in each docstring follows from that.
"""

from __future__ import annotations

from coil_core import errors


class NodeAgentError(errors.CoilError):
    """Base class of every error coild raises on purpose."""


class RouteError(NodeAgentError, errors.Internal):
    """Exporting block routes into the kernel failed: a netlink request was refused or the
    network namespace could not be entered. The message names the route (or table) and the cause
    (gRPC INTERNAL)."""


class RoutesNotReady(NodeAgentError, errors.Unavailable):
    """The node's block routes could not be written (no CAP_NET_ADMIN, netlink refused): no
    address is handed out of a block whose route is missing (gRPC UNAVAILABLE; the CNI plugin
    reports error 11, try again later)."""


class InvalidRequest(NodeAgentError, errors.InvalidArgument):
    """The request is malformed, or a requested address cannot be used by the pod (gRPC
    INVALID_ARGUMENT)."""


class NoPool(NodeAgentError, errors.FailedPrecondition):
    """No pool serves the pod's namespace: neither one named like it nor "default" exists (gRPC
    FAILED_PRECONDITION)."""


class Exhausted(NodeAgentError, errors.PoolExhausted):
    """The pool has no free address of a needed family on this node and no free block (gRPC
    RESOURCE_EXHAUSTED)."""


class AddressTaken(NodeAgentError, errors.AlreadyExists):
    """A requested static address is held by another pod or its block by another node (gRPC
    ALREADY_EXISTS)."""


class NotHeld(NodeAgentError, errors.NotFound):
    """The attachment holds no address (gRPC NOT_FOUND; CNI CHECK reports it)."""


class AllocatorUnavailable(NodeAgentError, errors.Unavailable):
    """The allocator (or etcd behind it) cannot be reached or did not answer in time (gRPC
    UNAVAILABLE; the CNI plugin reports error 11, try again later)."""


class AllocatorConflict(NodeAgentError, errors.Conflict):
    """The allocator lost compare-and-swap races, or found that its state changed under the
    request (a pool deleted, a block no longer held): the same request may succeed when tried
    again (gRPC ABORTED; the CNI plugin reports error 11, try again later)."""


class AllocatorRejected(NodeAgentError, errors.Internal):
    """The allocator refused a request for a reason coild did not expect; the message carries
    the allocator's (gRPC INTERNAL)."""


class WatchUnsupported(AllocatorRejected):
    """The allocator does not serve WatchNode (an older version): coild polls instead."""
