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
