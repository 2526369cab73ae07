"""The one server interceptor of both services: identify the caller, authorize the call, bound
expensive reads, and audit.

It must be the outermost interceptor (first in `grpc.server(interceptors=...)`), so that it sees
the final status of every call, including those the error mapping produces.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

from coil_grpc.access import OPERATORS_ONLY, RpcRule, decide, rule_of, short
from coil_grpc.auditlog import AuditLog
from coil_grpc.identity import Identifier
from coil_grpc.limits import ExpensiveReads

log = logging.getLogger("coil.edge")

Refused = Callable[[str, str], None]  # (method, code)


def _outcome(context: Any, default: str) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else default


class AccessGuard(grpc.ServerInterceptor):
    """Wraps every unary-unary and unary-stream handler; refuses the other kinds unless the
    caller is an operator (coil has none)."""

    def __init__(
        self,
        identifier: Identifier,
        *,
        audit: AuditLog | None = None,
        reads: ExpensiveReads | None = None,
        refused: Refused | None = None,
    ) -> None:
        self.identifier = identifier
        self.audit = audit or AuditLog()
        self.reads = reads
        self._refused = refused or (lambda method, code: None)
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method  # type: ignore[attr-defined]
        wrapped = self._handlers.get(method)
        if wrapped is not None:
            return wrapped
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        rule = rule_of(method)
        if handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._unary(method, rule, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        elif handler.unary_stream is not None:
            wrapped = grpc.unary_stream_rpc_method_handler(
                self._stream(method, rule, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        else:
            return self._operators_only(method, handler)
        # Handlers of a registered service are the same for every call of a method.
        self._handlers[method] = wrapped
        return wrapped

    def _admit(self, method: str, rule: RpcRule, request: Any, context: Any) -> Any:
        """Authorize the call (aborting it when refused); returns the caller's identity."""
        identity = self.identifier.identify(context)
        decision = decide(method, rule, identity, request)
        if not decision.allowed:
            self.audit.record(identity, method, request, decision.code, decision.reason)
            self._refused(short(method), decision.code)
            context.abort(getattr(grpc.StatusCode, decision.code), decision.reason)
        return identity

    def _unary(self, method: str, rule: RpcRule, inner: Callable[..., Any]) -> Callable[..., Any]:
        def behavior(request: Any, context: Any) -> Any:
            identity = self._admit(method, rule, request, context)
            changes = rule.change(request)
            reads = self.reads if rule.expensive(request) else None
            if reads is not None and not reads.try_enter():
                reason = (
                    f"{short(method)}: too many expensive reads in progress (at most "
                    f"{reads.limit}); try again later"
                )
                if changes:
                    self.audit.record(identity, method, request, "UNAVAILABLE", reason)
                self._refused(short(method), "UNAVAILABLE")
                context.abort(grpc.StatusCode.UNAVAILABLE, reason)
            outcome = "UNKNOWN"
            try:
                response = inner(request, context)
                outcome = _outcome(context, "OK")
                return response
            except BaseException:
                outcome = _outcome(context, "UNKNOWN")
                raise
            finally:
                if reads is not None:
                    reads.leave()
                if changes:
                    self.audit.record(identity, method, request, outcome)

        return behavior

    def _stream(self, method: str, rule: RpcRule, inner: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(inner):  # a stream served on an event loop (coil_grpc.aio)

            async def async_behavior(request: Any, context: Any) -> AsyncIterator[Any]:
                self._admit(method, rule, request, context)
                async with contextlib.aclosing(inner(request, context)) as messages:
                    async for message in messages:
                        yield message

            return async_behavior

        def behavior(request: Any, context: Any) -> Iterator[Any]:
            self._admit(method, rule, request, context)
            yield from inner(request, context)

        return behavior

    def _operators_only(self, method: str, handler: grpc.RpcMethodHandler) -> Any:
        # Streaming requests: the rule table cannot read a request before the call starts.
        def admit(context: Any) -> None:
            self._admit(method, OPERATORS_ONLY, None, context)

        if handler.stream_unary is not None:
            stream_unary = handler.stream_unary

            def su(requests: Any, context: Any) -> Any:
                admit(context)
                return stream_unary(requests, context)

            return grpc.stream_unary_rpc_method_handler(
                su, handler.request_deserializer, handler.response_serializer
            )
        stream_stream = handler.stream_stream

        def ss(requests: Any, context: Any) -> Any:
            admit(context)
            yield from stream_stream(requests, context)

        return grpc.stream_stream_rpc_method_handler(
            ss, handler.request_deserializer, handler.response_serializer
        )
