"""Domain errors of the node agent (coild).

Library errors (netlink, gRPC, etcd) are turned into these at the edge where they happen, so callers
and the gRPC layer only ever see coild's own exceptions.
"""

from __future__ import annotations


class NodeAgentError(Exception):
    """Base class of every error coild raises on purpose."""


class RouteError(NodeAgentError):
    """Exporting block routes into the kernel failed: a netlink request was refused or the
    network namespace could not be entered. The message names the route (or table) and the cause."""


class InvalidRequest(NodeAgentError):
    """The request is malformed, or a requested address cannot be used by the pod (gRPC
    INVALID_ARGUMENT)."""


class NoPool(NodeAgentError):
    """No pool serves the pod's namespace: neither one named like it nor "default" exists (gRPC
    FAILED_PRECONDITION)."""


class Exhausted(NodeAgentError):
    """The pool has no free address of a needed family on this node and no free block (gRPC
    RESOURCE_EXHAUSTED)."""


class AddressTaken(NodeAgentError):
    """A requested static address is held by another pod or its block by another node (gRPC
    ALREADY_EXISTS)."""


class NotHeld(NodeAgentError):
    """The attachment holds no address (gRPC NOT_FOUND; CNI CHECK reports it)."""


class AllocatorUnavailable(NodeAgentError):
    """The allocator (or etcd behind it) cannot be reached or did not answer in time (gRPC
    UNAVAILABLE; the CNI plugin reports error 11, try again later)."""


class AllocatorRejected(NodeAgentError):
    """The allocator refused a request for a reason coild did not expect; the message carries
    the allocator's."""
