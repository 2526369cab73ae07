"""Export the node's address blocks as kernel routes, for BIRD to announce.

Every block the node holds becomes a `blackhole` route in an otherwise unused routing table
(default 119) with a protocol number of its own (default 30); BIRD's kernel protocol reads that
table (`kernel table 119; learn;`) and announces the blocks. A blackhole route needs no interface,
so it exists as long as the node holds the block, whatever happens to pod interfaces.

Export is reconciliation: `RouteExporter.sync(desired)` reads what the kernel has and changes only
the difference. It touches nothing but routes of its own table and protocol.

Each call opens its own short-lived netlink socket and closes it before returning: no netlink
object outlives a call (long-lived ones leaked threads in kuryr). The calls are synchronous and
must not run on an asyncio event loop's thread (pyroute2's sync API refuses to start inside a
running loop); an asyncio daemon runs them with `asyncio.to_thread`.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP_INTR,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_DELROUTE, RTM_GETROUTE, RTM_NEWROUTE
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from coild.errors import RouteError

Network = IPv4Network | IPv6Network

DEFAULT_TABLE = 119
DEFAULT_PROTOCOL = 30

# How often a route dump is redone when the kernel flags it as interrupted by concurrent changes.
DUMP_ATTEMPTS = 5
# Route changes sent in one write; a batch's answers must fit the socket's receive buffer.
BATCH_SIZE = 256

_T = TypeVar("_T")

_RTN_BLACKHOLE = 6
_RT_SCOPE_UNIVERSE = 0
_RT_TABLE_COMPAT = 252  # the header's table field when the real one (RTA_TABLE) is above 255
# Tables 253-255 are the kernel's default, main and local tables; 0 means "unspecified".
_RESERVED_TABLES = frozenset({0, 253, 254, 255})
# Protocols 0-4 are the kernel's own (unspec, redirect, kernel, boot, static); daemons use 5-255.
_FIRST_DAEMON_PROTOCOL = 5
# Answers to a delete that mean the route is already gone.
_GONE = frozenset({errno.ESRCH, errno.ENOENT})


@dataclass(frozen=True)
class SyncResult:
    """What one `sync` changed: the routes it added and the routes it removed, each sorted
    (IPv4 before IPv6, then by address and prefix length). Both empty when nothing changed."""

    added: tuple[Network, ...] = ()
    removed: tuple[Network, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


@dataclass(frozen=True)
class _KernelRoute:
    """One route of ours as the kernel reported it, with what a precise delete needs."""

    network: Network
    type: int
    priority: int | None


def _order(network: Network) -> tuple[int, int, int]:
    return (network.version, int(network.network_address), network.prefixlen)


class RouteExporter:
    """Keeps the kernel's routes of one (table, protocol) pair equal to a desired set of blocks.

    `netns` names a network namespace (as in `ip netns`) to work in instead of the caller's own;
    it must exist already, it is never created. An exporter holds no netlink state between calls,
    so one instance may be kept for the daemon's life. Calls on one table and protocol must not
    run concurrently (one reconcile loop per node): two overlapping syncs may each undo the other.
    """

    def __init__(
        self,
        table: int = DEFAULT_TABLE,
        protocol: int = DEFAULT_PROTOCOL,
        netns: str | None = None,
    ) -> None:
        """Raises ValueError for a reserved or out-of-range table (0, 253-255, >= 2**32) or for
        a protocol outside 5-255 (0-4 belong to the kernel and administrators)."""
        if table in _RESERVED_TABLES or not 0 < table < 2**32:
            raise ValueError(f"route exporter table {table}: not a free routing table")
        if not _FIRST_DAEMON_PROTOCOL <= protocol <= 255:
            raise ValueError(f"route exporter protocol {protocol}: must be 5-255")
        self.table = table
        self.protocol = protocol
        self.netns = netns

    def current(self) -> set[Network]:
        """The networks that have a route of our table and protocol now, of any route type.

        An empty set when the table has no routes or does not exist yet.
        Raises RouteError when the namespace cannot be entered or the dump fails, including a
        dump still interrupted by concurrent changes after DUMP_ATTEMPTS tries.
        """
        with self._netlink() as ipr:
            return {route.network for route in self._dump(ipr)}

    def sync(self, desired: Iterable[Network]) -> SyncResult:
        """Make our table and protocol hold exactly one blackhole route per desired network.

        Lists the table once (IPv4 and IPv6), adds the missing routes with `replace` (so a route
        that appears meanwhile is no error), then deletes the extra ones (a route that is already
        gone is no error). A route of ours for a desired network that is not a blackhole is
        replaced by one. Routes of other protocols and other tables are never touched, except
        that the kernel's `replace` overwrites a foreign route with the same prefix (and, for
        IPv6, metric) in our table: the table is meant to be ours. Works on a table that does
        not exist yet (the first route creates it).

        Returns what changed. Raises RouteError naming the route and the cause when the
        namespace cannot be entered, the dump fails, or the kernel refuses a change; changes
        made before the failure stay, and the next sync continues from there. Changes are sent
        in batches of BATCH_SIZE; a batch the kernel refuses any part of is redone route by
        route, to tell the harmless answers from the real failure. Nothing else is retried but an
        interrupted dump (up to DUMP_ATTEMPTS times).
        """
        wanted = set(desired)
        with self._netlink() as ipr:
            present = self._dump(ipr)
            exported = {route.network for route in present if route.type == _RTN_BLACKHOLE}
            missing = sorted(wanted - exported, key=_order)
            extra = [route for route in present if route.network not in wanted]
            # Add before removing, so that no block is unannounced longer than necessary.
            self._apply(ipr, missing, [self._replace_request(n) for n in missing], self._replace)
            self._apply(ipr, extra, [self._delete_request(r) for r in extra], self._delete)
        removed = sorted({route.network for route in extra}, key=_order)
        return SyncResult(added=tuple(missing), removed=tuple(removed))

    def clear(self) -> SyncResult:
        """Remove every route of our table and protocol: `sync(())`, with the same errors."""
        return self.sync(())

    @contextmanager
    def _netlink(self) -> Iterator[Any]:
        """A netlink socket in our namespace, closed on leaving the block."""
        try:
            # flags=0: enter an existing namespace only; pyroute2 would create a missing one.
            ipr = IPRoute(netns=self.netns, flags=0)
        except OSError as e:
            where = "this namespace" if self.netns is None else f'netns "{self.netns}"'
            raise RouteError(f"route export in {where}: cannot open netlink: {e}") from e
        with ipr:
            # pyroute2 0.9.7's IPRoute skips the base-class set-up of this key, and its
            # nlm_request (the one dump call that shows us NLMSG_DONE) fails without it.
            ipr.status.setdefault("nlm_generator", False)
            yield ipr

    def _dump(self, ipr: Any) -> list[_KernelRoute]:
        """Our routes (both families), from one dump that was not interrupted."""
        for _ in range(DUMP_ATTEMPTS):
            interrupted = False

            # Sees every message of the answer, NLMSG_DONE included, which may carry the flag.
            def watch(msg: Any) -> bool:
                nonlocal interrupted
                if msg["header"]["flags"] & NLM_F_DUMP_INTR:
                    interrupted = True
                return False  # keep the message

            request = rtmsg()
            request["family"] = socket.AF_UNSPEC
            try:
                messages = ipr.nlm_request(request, msg_type=RTM_GETROUTE, callback=watch)
            except (NetlinkError, OSError) as e:
                raise RouteError(f"route dump table {self.table}: {_cause(e)}") from e
            if not interrupted:
                return [route for msg in messages if (route := self._ours(msg)) is not None]
        raise RouteError(
            f"route dump table {self.table}: interrupted by concurrent changes "
            f"{DUMP_ATTEMPTS} times in a row"
        )

    def _ours(self, msg: Any) -> _KernelRoute | None:
        """The route in a dump message if it is of our table and protocol, else None."""
        if msg["family"] not in (socket.AF_INET, socket.AF_INET6):
            return None
        # The header's table field is 8 bits; RTA_TABLE carries tables above 255.
        table = msg.get_attr("RTA_TABLE", msg["table"])
        if table != self.table or msg["proto"] != self.protocol:
            return None
        dst = msg.get_attr("RTA_DST")
        if dst is None:
            dst = "0.0.0.0" if msg["family"] == socket.AF_INET else "::"
        return _KernelRoute(
            network=ip_network(f"{dst}/{msg['dst_len']}"),
            type=msg["type"],
            priority=msg.get_attr("RTA_PRIORITY"),
        )

    def _apply(
        self,
        ipr: Any,
        items: Sequence[_T],
        requests: Sequence[Any],
        one_by_one: Callable[[Any, _T], None],
    ) -> None:
        """Send the requests in batches of BATCH_SIZE, one write per batch, reading the answers
        after each write. A batch that meets any refusal is redone one item at a time with
        `one_by_one`, which tolerates what is harmless (idempotent replace, delete of a route
        already gone) and raises RouteError naming the item otherwise."""
        for start in range(0, len(items), BATCH_SIZE):
            batch = slice(start, start + BATCH_SIZE)
            try:
                ipr.nlm_request_batch(requests[batch])
            except (NetlinkError, OSError):
                for item in items[batch]:
                    one_by_one(ipr, item)

    def _route_request(self, network: Network, msg_type: int, flags: int, rtype: int) -> Any:
        """A route message built directly (pyroute2's keyword processing costs more per route
        than the kernel does)."""
        msg = rtmsg()
        msg["header"]["type"] = msg_type
        msg["header"]["flags"] = flags
        msg["family"] = socket.AF_INET if network.version == 4 else socket.AF_INET6
        msg["dst_len"] = network.prefixlen
        msg["table"] = self.table if self.table < 256 else _RT_TABLE_COMPAT
        msg["proto"] = self.protocol
        msg["scope"] = _RT_SCOPE_UNIVERSE
        msg["type"] = rtype
        msg["attrs"] = [
            ["RTA_DST", str(network.network_address)],
            ["RTA_TABLE", self.table],
        ]
        return msg

    def _replace_request(self, network: Network) -> Any:
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE
        return self._route_request(network, RTM_NEWROUTE, flags, _RTN_BLACKHOLE)

    def _delete_request(self, route: _KernelRoute) -> Any:
        msg = self._route_request(
            route.network, RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK, route.type
        )
        if route.priority is not None:
            msg["attrs"].append(["RTA_PRIORITY", route.priority])
        return msg

    def _replace(self, ipr: Any, network: Network) -> None:
        try:
            ipr.route(
                "replace",
                dst=str(network),
                type="blackhole",
                table=self.table,
                proto=self.protocol,
            )
        except (NetlinkError, OSError) as e:
            raise RouteError(
                f"route replace blackhole {network} table {self.table} proto {self.protocol}: "
                f"{_cause(e)}"
            ) from e

    def _delete(self, ipr: Any, route: _KernelRoute) -> None:
        spec: dict[str, Any] = {
            "dst": str(route.network),
            "type": route.type,
            "table": self.table,
            "proto": self.protocol,
        }
        if route.priority is not None:
            spec["priority"] = route.priority
        try:
            ipr.route("del", **spec)
        except NetlinkError as e:
            if e.code in _GONE:
                return
            raise RouteError(
                f"route delete {route.network} table {self.table} proto {self.protocol}: "
                f"{_cause(e)}"
            ) from e
        except OSError as e:
            raise RouteError(
                f"route delete {route.network} table {self.table} proto {self.protocol}: "
                f"{_cause(e)}"
            ) from e


def _cause(error: Exception) -> str:
    """A netlink error as `message (errno N)`; other errors as they print."""
    if isinstance(error, NetlinkError):
        return f"{error.args[1]} (errno {error.code})"
    return str(error)
