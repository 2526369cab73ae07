"""Roles, and the policy that maps a client certificate's subject to one.

Pure logic. The policy is a small TOML file; without one, `DEFAULT_POLICY` applies:

- a Kubernetes kubelet client certificate (CN ``system:node:<name>``, O ``system:nodes``) is the
  node ``<name>``;
- O ``coil:operators`` is an operator;
- O ``coil:viewers`` is a viewer.

A UNIX-socket peer is not a matter of policy: the socket admits only the server's own uid and
root, who hold every secret the server holds anyway, so it is an operator (`coil_grpc.identity`).

Rules are tried in order and the first whose every condition holds gives the role. A certificate
no rule matches has no role: every RPC refuses it.
"""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class Role(enum.Enum):
    """What a caller may do (see `coil_grpc.access` for the RPCs of each)."""

    NODE = "node"  # node-scoped RPCs, for its own node only
    VIEWER = "viewer"  # reads only
    OPERATOR = "operator"  # everything


class PolicyError(ValueError):
    """The policy file is malformed; the message names the file and the rule."""


@dataclass(frozen=True, slots=True)
class Subject:
    """What a verified client certificate says about its holder."""

    common_name: str = ""
    organizations: tuple[str, ...] = ()
    sans: tuple[str, ...] = ()  # DNS names, URIs, e-mail addresses and IP addresses, as text


@dataclass(frozen=True, slots=True)
class Grant:
    """The outcome of matching a subject: a role, and for NODE the node's name."""

    role: Role
    node: str = ""


@dataclass(frozen=True, slots=True)
class Match:
    """One rule: every condition that is set must hold."""

    role: Role
    common_name: str | None = None
    common_name_prefix: str | None = None  # for NODE: the node's name is the rest of the CN
    organization: str | None = None  # one of the subject's O values
    san: str | None = None  # one of the subject alternative names

    def grant(self, subject: Subject) -> Grant | None:
        cn = subject.common_name
        if self.common_name is not None and cn != self.common_name:
            return None
        if self.common_name_prefix is not None and not cn.startswith(self.common_name_prefix):
            return None
        if self.organization is not None and self.organization not in subject.organizations:
            return None
        if self.san is not None and self.san not in subject.sans:
            return None
        if self.role is Role.NODE:
            node = cn[len(self.common_name_prefix or "") :]
            return Grant(Role.NODE, node) if node else None
        return Grant(self.role)


@dataclass(frozen=True)
class Policy:
    """Certificate rules, tried in order."""

    matches: tuple[Match, ...]

    def grant(self, subject: Subject) -> Grant | None:
        """The first matching rule's grant, or None when no rule matches."""
        for match in self.matches:
            granted = match.grant(subject)
            if granted is not None:
                return granted
        return None


DEFAULT_POLICY_TOML = """\
# coil's default policy: who may do what on the allocator (docs/security.md).
# Rules are tried in order; the first whose every condition holds gives the role.
# Conditions: common_name, common_name_prefix, organization, san. A "node" rule needs
# common_name_prefix: the node's name is the rest of the certificate's common name.

[[match]]  # the kubelet's client certificate, /var/lib/kubelet/pki/kubelet-client-current.pem
role = "node"
common_name_prefix = "system:node:"
organization = "system:nodes"

[[match]]
role = "operator"
organization = "coil:operators"

[[match]]
role = "viewer"
organization = "coil:viewers"
"""

_MATCH_KEYS = {"role", "common_name", "common_name_prefix", "organization", "san"}


def _text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise PolicyError(f"{where}: {key} must be a non-empty string, not {value!r}")
    return value


def _role(value: Any, where: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        names = ", ".join(r.value for r in Role)
        raise PolicyError(f"{where}: role {value!r} is not one of {names}") from None


def parse_policy(text: str, source: str = "policy") -> Policy:
    """Parse a policy file's text; PolicyError naming `source` and the rule on any mistake."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{source}: not valid TOML: {e}") from None
    unknown = set(doc) - {"match"}
    if unknown:
        raise PolicyError(f"{source}: unknown key {sorted(unknown)[0]!r} (expected [[match]])")
    rules = doc.get("match", [])
    if not isinstance(rules, list):
        raise PolicyError(f"{source}: match must be an array of tables ([[match]])")
    matches: list[Match] = []
    for i, rule in enumerate(rules, 1):
        where = f"{source}: match #{i}"
        if not isinstance(rule, dict):
            raise PolicyError(f"{where}: must be a table")
        extra = set(rule) - _MATCH_KEYS
        if extra:
            raise PolicyError(
                f"{where}: unknown key {sorted(extra)[0]!r} "
                f"(expected {', '.join(sorted(_MATCH_KEYS))})"
            )
        if "role" not in rule:
            raise PolicyError(f"{where}: role is missing")
        role = _role(rule["role"], where)
        conditions = {k: _text(v, where, k) for k, v in rule.items() if k != "role"}
        if not conditions:
            raise PolicyError(f"{where}: no condition: it would match every certificate")
        if role is Role.NODE and "common_name_prefix" not in conditions:
            raise PolicyError(
                f"{where}: a node rule needs common_name_prefix (the node's name follows it)"
            )
        matches.append(Match(role, **conditions))
    return Policy(tuple(matches))


DEFAULT_POLICY = parse_policy(DEFAULT_POLICY_TOML, "default policy")


def load_policy(path: str | None) -> Policy:
    """The policy in the file at `path`, or DEFAULT_POLICY when `path` is empty.

    Raises PolicyError when the file cannot be read or is malformed."""
    if not path:
        return DEFAULT_POLICY
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"policy file {path!r}: {getattr(e, 'strerror', None) or e}") from None
    return parse_policy(text, f"policy file {path!r}")


__all__: Sequence[str] = (
    "DEFAULT_POLICY",
    "DEFAULT_POLICY_TOML",
    "Grant",
    "Match",
    "Policy",
    "PolicyError",
    "Role",
    "Subject",
    "load_policy",
    "parse_policy",
)
