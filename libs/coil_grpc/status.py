"""Domain errors to gRPC statuses, once for both servers (the allocator and coild).

`STATUS_OF` maps each class of `coil_core.errors` to its one status code; the node agent's errors
subclass those classes, so the same table serves it. `ErrorsToStatus` is the server interceptor
that applies it to every unary call of one service: a `CoilError` aborts the call with its status
and message; any other exception is logged with its traceback and aborts with INTERNAL and a
message that points at the service's log. A request that does not decode as its message aborts
with INVALID_ARGUMENT and one log line (gRPC itself would answer INTERNAL and log a traceback
per request). Messages are cut to `MAX_MESSAGE` characters, so an error quoting a huge input
still fits the status trailer. Every call's method, status name and duration go to an observer
(the services' metrics) on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

from coil_core import errors

STATUS_OF: dict[type[errors.CoilError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PoolExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Conflict: grpc.StatusCode.ABORTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Internal: grpc.StatusCode.INTERNAL,
}

MAX_MESSAGE = 1024
"""Characters of an error message sent in the status; the rest is cut (gRPC's trailers are
limited to 8 KiB, and a cut message is better than RESOURCE_EXHAUSTED in its place)."""

Observer = Callable[[str, str, float], None]
"""Called once per call with the method name (``"ClaimBlock"``), the status name and seconds."""


class _Undecodable:
    """What the deserializer hands the handler for a request that is not a valid message."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _decoder(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """`deserialize`, answering an `_Undecodable` for bytes that are not a valid message (the
    handler then refuses the call; gRPC itself would answer INTERNAL and log a traceback)."""

    def decode(data: bytes) -> Any:
        if deserialize is None:
            return data
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 - any decoding failure is the caller's
            return _Undecodable(f"{type(e).__name__}: {e}")

    return decode


def _code_of(e: BaseException) -> grpc.StatusCode:
    """The status a call that ended with `e` is observed with."""
    if isinstance(e, errors.CoilError):
        return status_of(e)
    if isinstance(e, (GeneratorExit, asyncio.CancelledError)):
        return grpc.StatusCode.CANCELLED  # the client went away, or the server stops
    return grpc.StatusCode.INTERNAL


def cut(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message``, or its first ``limit`` characters and a note of how many were cut."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}... ({len(message) - limit} more characters cut)"


def status_of(error: errors.CoilError) -> grpc.StatusCode:
    """The status of ``error``: that of its nearest class in `STATUS_OF`, else INTERNAL."""
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


class ErrorsToStatus(grpc.ServerInterceptor):
    """Map the domain errors of one service's calls (unary and server-streaming) to statuses, and
    observe each call.

    ``service`` is the full protobuf service name (``"coil.v1.AllocatorService"``); calls to other
    services of the same server (the health service) pass through untouched. ``unexpected`` is
    the message after ``"<method>: "`` of an unexpected exception's INTERNAL status.
    """

    def __init__(
        self,
        service: str,
        log: logging.Logger,
        unexpected: str,
        observe: Observer | None = None,
    ) -> None:
        self._prefix = f"/{service}/"
        self._log = log
        self._unexpected = unexpected
        self._observe = observe

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        full = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or not full.startswith(self._prefix):
            return handler
        method = full[len(self._prefix) :]
        if handler.unary_stream is not None:
            return self._stream(method, handler)
        if handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                self._refuse_undecodable(method, request, context)
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return inner(request, context)
            except Exception as e:  # noqa: BLE001 - mapped to a status, or logged
                code = _code_of(e)
                self._abort_for(method, e, context)
            finally:
                self._ended(method, code, started)

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=_decoder(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _abort_for(self, method: str, e: Exception, context: grpc.ServicerContext) -> None:
        """Abort the call for `e` (abort raises): a domain error with its status and message,
        logged when the service is at fault or unreachable; anything else as INTERNAL, logged
        with its traceback."""
        if isinstance(e, errors.CoilError):
            code = status_of(e)
            if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE):
                self._log.warning("%s failed: %s", method, cut(str(e)))
            context.abort(code, cut(str(e)))
        self._log.exception("%s failed unexpectedly", method)
        context.abort(grpc.StatusCode.INTERNAL, f"{method}: {self._unexpected}")

    def _ended(self, method: str, code: grpc.StatusCode, started: float) -> None:
        if self._observe is not None:
            self._observe(method, code.name, time.perf_counter() - started)

    def _refuse_undecodable(
        self, method: str, request: _Undecodable, context: grpc.ServicerContext
    ) -> None:
        """Abort with INVALID_ARGUMENT and one log line (abort raises)."""
        reason = cut(request.reason, 200)
        self._log.warning("%s: undecodable request: %s", method, reason)
        if self._observe is not None:
            self._observe(method, grpc.StatusCode.INVALID_ARGUMENT.name, 0.0)
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{method}: the request is not a valid protobuf message ({reason})",
        )

    def _stream(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The same for a server stream: an error while streaming ends it with its status; the
        call is observed when the stream ends (its duration is the stream's life). A stream
        that is an async generator (served on an event loop, `coil_grpc.aio`) stays one."""
        inner = handler.unary_stream

        async def async_call(request: Any, context: grpc.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                self._refuse_undecodable(method, request, context)
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                async with contextlib.aclosing(inner(request, context)) as messages:
                    async for message in messages:
                        yield message
            except (GeneratorExit, asyncio.CancelledError) as e:
                code = _code_of(e)
                raise
            except Exception as e:  # noqa: BLE001 - mapped to a status, or logged
                code = _code_of(e)
                self._abort_for(method, e, context)
            finally:
                self._ended(method, code, started)

        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            if isinstance(request, _Undecodable):
                self._refuse_undecodable(method, request, context)
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                yield from inner(request, context)
            except GeneratorExit as e:
                code = _code_of(e)
                raise
            except Exception as e:  # noqa: BLE001 - mapped to a status, or logged
                code = _code_of(e)
                self._abort_for(method, e, context)
            finally:
                self._ended(method, code, started)

        return grpc.unary_stream_rpc_method_handler(
            async_call if inspect.isasyncgenfunction(inner) else call,
            request_deserializer=_decoder(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
