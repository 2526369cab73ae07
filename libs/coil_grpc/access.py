"""Who may call which RPC: the rule table of both services, and the decision for one call.

Pure logic (requests are read by attribute name, so the table needs no generated code). The model
is Kubernetes' Node authorizer: a node may call only node-scoped RPCs, and only for itself, naming
itself in the request's `node` field; a viewer may only read; an operator may do everything.
A method with no rule is for operators only.

| RPC | node (for itself) | viewer | audited | expensive |
| --- | --- | --- | --- | --- |
| CreatePool, AddSubnet, DeletePool, ReleaseNode, FreeAddress | - | - | yes | - |
| ListPools | yes (names no node) | yes | - | - |
| GetPool | - | yes | - | yes |
| ClaimBlock, ReleaseBlock, RecordAllocations, ReleaseAllocations | yes | - | yes | - |
| ReportNode | yes | - | refusals only | - |
| WatchNode | yes | - | refusals only | - |
| ListNodeBlocks | yes | yes | - | - (takes a node-start turn in the allocator) |
| GetAddress, GetUsage | - | yes | - | - |
| CheckStore | - | without repair | with repair | yes |
| NodeAgentService (coild: Allocate, Release, Check, GarbageCollect, Status) | - | - | changes | - |
| grpc.health.v1.Health | anyone | anyone | - | - |

Refusals are always audited.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coil_grpc.policy import Grant, Role

Predicate = Callable[[Any], bool]


def _always(request: Any) -> bool:
    return True


def _never(request: Any) -> bool:
    return False


def _field(request: Any, name: str) -> Any:
    """A request's field, or None when the request is not a message of that kind (one the error
    mapping could not decode reaches the guard as a placeholder, and is refused after it)."""
    return getattr(request, name, None)


class Via(enum.Enum):
    """How the caller was identified."""

    CERTIFICATE = "certificate"  # a client certificate the TLS handshake verified
    UNIX = "unix"  # a UNIX-socket peer (its uid: see coil_grpc.identity)
    NONE = "none"  # nothing: plaintext TCP


@dataclass(frozen=True, slots=True)
class Identity:
    """A caller: `name` is what the audit log shows; `grant` None means no role."""

    name: str
    via: Via
    grant: Grant | None = None

    @property
    def role(self) -> Role | None:
        return self.grant.role if self.grant else None


@dataclass(frozen=True, slots=True)
class RpcRule:
    """What one RPC allows beyond operators.

    node_field: a node may call it naming itself in this request field ("" when the request
    names no node, as ListPools). None: nodes may not call it at all.
    """

    node_field: str | None = None
    viewer: Predicate = _never  # a viewer may make this call
    change: Predicate = _never  # the call changes state: audited when allowed
    expensive: Predicate = _never  # runs under the expensive-reads bound
    public: bool = False  # anyone, even without an identity (health checks)


@dataclass(frozen=True, slots=True)
class Decision:
    """`code` is a gRPC status code's name: "OK", "UNAUTHENTICATED" or "PERMISSION_DENIED"."""

    code: str
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.code == "OK"


ALLOWED = Decision("OK")
OPERATORS_ONLY = RpcRule()

_ALLOCATOR = "/coil.v1.AllocatorService/"
_NODE_AGENT = "/coil.v1.NodeAgentService/"

RULES: dict[str, RpcRule] = {
    _ALLOCATOR + "CreatePool": RpcRule(change=_always),
    _ALLOCATOR + "AddSubnet": RpcRule(change=_always),
    _ALLOCATOR + "DeletePool": RpcRule(change=_always),
    _ALLOCATOR + "ListPools": RpcRule(node_field="", viewer=_always),
    _ALLOCATOR + "GetPool": RpcRule(viewer=_always, expensive=_always),
    _ALLOCATOR + "ClaimBlock": RpcRule(node_field="node", change=_always),
    _ALLOCATOR + "ReleaseBlock": RpcRule(node_field="node", change=_always),
    # One node's listing (coild's start, its safety net without a stream): bounded per node by
    # paging, and queued in the allocator's node-start turns rather than refused.
    _ALLOCATOR + "ListNodeBlocks": RpcRule(node_field="node", viewer=_always),
    _ALLOCATOR + "ReleaseNode": RpcRule(change=_always),
    _ALLOCATOR + "RecordAllocations": RpcRule(node_field="node", change=_always),
    _ALLOCATOR + "ReleaseAllocations": RpcRule(node_field="node", change=_always),
    _ALLOCATOR + "GetAddress": RpcRule(viewer=_always),
    _ALLOCATOR + "FreeAddress": RpcRule(change=_always),
    _ALLOCATOR + "GetUsage": RpcRule(viewer=_always),
    # A heartbeat every few seconds from every node: audited only when refused.
    _ALLOCATOR + "ReportNode": RpcRule(node_field="node"),
    _ALLOCATOR + "WatchNode": RpcRule(node_field="node"),
    _ALLOCATOR + "CheckStore": RpcRule(
        viewer=lambda r: not _field(r, "repair"),
        change=lambda r: bool(_field(r, "repair")),
        expensive=_always,
    ),
    # coild's CNI socket: the container runtime (root) only.
    _NODE_AGENT + "Allocate": RpcRule(change=_always),
    _NODE_AGENT + "Release": RpcRule(change=_always),
    _NODE_AGENT + "Check": RpcRule(),
    _NODE_AGENT + "GarbageCollect": RpcRule(change=_always),
    _NODE_AGENT + "Status": RpcRule(),
    "/grpc.health.v1.Health/Check": RpcRule(public=True),
    "/grpc.health.v1.Health/Watch": RpcRule(public=True),
}


def rule_of(method: str) -> RpcRule:
    """The rule of a full method name ("/pkg.Service/Method"); operators only if none."""
    return RULES.get(method, OPERATORS_ONLY)


def short(method: str) -> str:
    """ "/coil.v1.AllocatorService/ClaimBlock" -> "ClaimBlock"."""
    return method.rpartition("/")[2] or method


def decide(method: str, rule: RpcRule, identity: Identity, request: Any) -> Decision:
    """May `identity` make this call? Refusals say why, naming the method and the identity."""
    if rule.public:
        return ALLOWED
    name = short(method)
    grant = identity.grant
    if grant is None:
        if identity.via is Via.NONE:
            return Decision(
                "UNAUTHENTICATED",
                f"{name}: the caller has no identity (no client certificate); see docs/security.md",
            )
        return Decision(
            "PERMISSION_DENIED",
            f'{name}: "{identity.name}" has no role in the allocator\'s policy',
        )
    if grant.role is Role.OPERATOR:
        return ALLOWED
    if grant.role is Role.VIEWER:
        if rule.viewer(request):
            return ALLOWED
        return Decision("PERMISSION_DENIED", f'{name}: viewer "{identity.name}" may only read')
    # Role.NODE
    if rule.node_field is None:
        return Decision(
            "PERMISSION_DENIED", f'{name}: node "{grant.node}" may not call it (operators only)'
        )
    if rule.node_field == "":
        return ALLOWED
    named = str(getattr(request, rule.node_field, ""))
    if not named:
        return Decision(
            "PERMISSION_DENIED",
            f'{name}: the request names no node; node "{grant.node}" may act only for itself',
        )
    if named != grant.node:
        return Decision(
            "PERMISSION_DENIED",
            f'{name}: node "{grant.node}" may act only for itself, not for "{named[:256]}"',
        )
    return ALLOWED


_SCALAR_TARGETS = (
    ("name", "pool"),  # CreatePool, GetPool, DeletePool name pools
    ("pool", "pool"),
    ("subnet", "subnet"),
    ("block", "block"),
    ("node", "node"),
    ("address", "address"),
    ("force", "force"),
    ("repair", "repair"),
    ("namespace", "namespace"),
    ("pod", "pod"),
)
MAX_LISTED = 8


_FIELDS: dict[type, frozenset[str]] = {}


def _fields(request: Any) -> frozenset[str]:
    """The field names of a request's message type (cached: a missing attribute costs an
    exception per look-up)."""
    kind = type(request)
    names = _FIELDS.get(kind)
    if names is None:
        descriptor = getattr(request, "DESCRIPTOR", None)
        fields = getattr(descriptor, "fields_by_name", None)
        # Not a message (a request the error mapping could not decode): it touches nothing.
        names = frozenset(fields) if fields is not None else frozenset()
        _FIELDS[kind] = names
    return names


def targets(request: Any) -> list[tuple[str, str]]:
    """What a request touches, for the audit line: (label, value) pairs of the fields it set."""
    fields = _fields(request)
    out: list[tuple[str, str]] = []
    for field_name, label in _SCALAR_TARGETS:
        if field_name in fields:
            value = getattr(request, field_name)
            if value:
                out.append((label, str(value)))
    if "subnets" in fields and request.subnets:
        out.append(("subnets", ",".join(str(s) for s in request.subnets)))
    if "attachment" in fields:
        attachment = request.attachment
        if attachment.container_id or attachment.interface:
            out.append(("container_id", str(attachment.container_id)))
            out.append(("interface", str(attachment.interface)))
    if "items" in fields and request.items:
        items = request.items
        addresses = [str(i.address) for i in items[:MAX_LISTED]]
        more = f",...+{len(items) - MAX_LISTED}" if len(items) > MAX_LISTED else ""
        out.append(("addresses", ",".join(addresses) + more))
    if "valid_attachments" in fields:
        out.append(("valid_attachments", str(len(request.valid_attachments))))
    return out
