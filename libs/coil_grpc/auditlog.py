"""The audit line: one structured log line per change, and per refusal.

    audit method=ClaimBlock identity="system:node:node-1" role=node node=node-1 pool=default
        outcome=OK

Fields are `key=value`; a value with a space, a quote, an `=` or a control character is quoted as
a JSON string, so every line stays one line whatever a request carries. Values are cut to 256
characters. The logger is "coil.audit" (level INFO).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from coil_grpc.access import Identity, short, targets

MAX_VALUE = 256


def _value(text: str) -> str:
    text = text[:MAX_VALUE]
    if text and all(c.isprintable() and c not in ' "=\\' for c in text):
        return text
    return json.dumps(text)


def audit_line(
    identity: Identity, method: str, request: Any, outcome: str, reason: str = ""
) -> str:
    """The audit line of one call (without the logger's own prefix)."""
    fields: list[tuple[str, str]] = [
        ("method", short(method)),
        ("identity", identity.name),
        ("via", identity.via.value),
        ("role", identity.role.value if identity.role else "none"),
    ]
    if identity.grant is not None and identity.grant.node:
        fields.append(("as_node", identity.grant.node))
    if request is not None:
        fields.extend(targets(request))
    fields.append(("outcome", outcome))
    if reason:
        fields.append(("reason", reason))
    return "audit " + " ".join(f"{k}={_value(v)}" for k, v in fields)


class AuditLog:
    """Writes audit lines to a logger ("coil.audit" unless given)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("coil.audit")

    def record(
        self, identity: Identity, method: str, request: Any, outcome: str, reason: str = ""
    ) -> None:
        self.logger.info("%s", audit_line(identity, method, request, outcome, reason))
