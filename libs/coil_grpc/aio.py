"""A grpc.aio server behind the blocking server's surface, for a service whose streams must not
each hold a thread (the allocator's WatchNode).

`AioServer` runs the asyncio server on an event loop in a thread of its own, and offers what
`listen_and_start` and the services' callers use of a `grpc.Server`: `add_insecure_port`,
`add_secure_port`, `start`, and `stop(grace)` returning an event to wait on.

`SyncBridge` is its one aio interceptor. It applies the blocking interceptors both services share
(`AccessGuard`, `ErrorsToStatus`: `grpc.ServerInterceptor`s that wrap handlers), then runs each
handler as the aio server needs it: a blocking unary handler on the thread pool; an async
generator (a stream that waits on the loop) on the loop; a blocking generator (the health
service's Watch) on a small pool of its own, one message at a time, so that streams which block
for their lives never take the unary calls' threads. Each handler gets a `SyncContext`: the
context the blocking interceptors and handlers were written for, whose `abort` raises (the aio
context's `abort` is a coroutine). Every generator the bridge or an interceptor wraps is closed
when its stream ends, however it ends, so a stream's `finally` runs then and not at some later
garbage collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc import aio

T = TypeVar("T")

BLOCKING_STREAMS = 4
"""Threads for blocking server streams (the health service's Watch): each holds one while open;
more wait for a thread, and the unary calls never do."""


class Aborted(Exception):
    """What `SyncContext.abort` raises: the bridge ends the call with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class SyncContext:
    """The part of `grpc.ServicerContext` coil's handlers use, over an aio call's context.
    Usable from any thread."""

    __slots__ = ("_context", "_code")

    def __init__(self, context: aio.ServicerContext) -> None:
        self._context = context
        self._code: grpc.StatusCode | None = None

    def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code = code
        raise Aborted(code, details)

    def code(self) -> grpc.StatusCode | None:
        """The status an `abort` or `set_code` set (None: none yet)."""
        return self._code

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        self._context.set_details(details)

    def peer(self) -> str:
        return self._context.peer()

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._context.auth_context()

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Call `callback` (on the loop) when the call ends, whatever ends it."""
        self._context.add_done_callback(lambda _context: callback())
        return True


async def _abort(context: aio.ServicerContext, aborted: Aborted) -> None:
    await context.abort(aborted.code, aborted.details)


class SyncBridge(aio.ServerInterceptor):
    """See the module docstring. `interceptors` in the order `grpc.server` takes them (the
    first is outermost); `executor` runs the blocking handlers."""

    def __init__(
        self, interceptors: Sequence[grpc.ServerInterceptor], executor: futures.Executor
    ) -> None:
        self._interceptors = list(interceptors)
        self._executor = executor
        self._streams = futures.ThreadPoolExecutor(
            BLOCKING_STREAMS, thread_name_prefix="blocking-stream"
        )
        self._handlers: dict[str, grpc.RpcMethodHandler | None] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Coroutine[Any, Any, grpc.RpcMethodHandler | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method  # type: ignore[attr-defined]
        if method in self._handlers:
            # Handlers of a registered service are the same for every call of a method.
            return self._handlers[method]
        handler = await continuation(handler_call_details)
        for interceptor in reversed(self._interceptors):
            handler = interceptor.intercept_service(
                lambda _details, inner=handler: inner, handler_call_details
            )
        bridged = None if handler is None else self._bridge(handler)
        if handler is not None:
            self._handlers[method] = bridged
        return bridged

    def close(self) -> None:
        self._streams.shutdown(wait=False, cancel_futures=True)

    def _bridge(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        executor, streams = self._executor, self._streams
        if handler.unary_unary is not None:
            unary = handler.unary_unary
            if inspect.iscoroutinefunction(unary):
                return handler

            async def unary_call(request: Any, context: aio.ServicerContext) -> Any:
                loop = asyncio.get_running_loop()
                try:
                    return await loop.run_in_executor(
                        executor, unary, request, SyncContext(context)
                    )
                except Aborted as e:
                    await _abort(context, e)

            return grpc.unary_unary_rpc_method_handler(
                unary_call, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream
            if inspect.isasyncgenfunction(stream):

                async def stream_call(request: Any, context: aio.ServicerContext) -> Any:
                    try:
                        async with contextlib.aclosing(stream(request, SyncContext(context))) as it:
                            async for message in it:
                                yield message
                    except Aborted as e:
                        await _abort(context, e)

            else:

                async def stream_call(request: Any, context: aio.ServicerContext) -> Any:
                    loop = asyncio.get_running_loop()
                    done = object()
                    try:
                        messages = iter(
                            await loop.run_in_executor(
                                streams, stream, request, SyncContext(context)
                            )
                        )
                        while True:
                            message = await loop.run_in_executor(streams, next, messages, done)
                            if message is done:
                                return
                            yield message
                    except Aborted as e:
                        await _abort(context, e)

            return grpc.unary_stream_rpc_method_handler(
                stream_call, handler.request_deserializer, handler.response_serializer
            )
        return handler  # client streams: coil serves none; the server's thread pool runs them


class AioServer:
    """A grpc.aio server on its own event loop thread (see the module docstring).

    `interceptors` are blocking ones, as for `grpc.server`; `executor` runs blocking handlers.
    Register services on `server` before `start`."""

    def __init__(
        self, executor: futures.Executor, interceptors: Sequence[grpc.ServerInterceptor] = ()
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="grpc-aio", daemon=True)
        self._thread.start()
        self._stopped: threading.Event | None = None
        self._lock = threading.Lock()

        self._bridge = SyncBridge(interceptors, executor)
        self._on_stop: list[Callable[[], None]] = [self._bridge.close]

        async def make() -> aio.Server:
            return aio.server(migration_thread_pool=executor, interceptors=[self._bridge])

        self.server = self._call(make())

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the server has stopped (to release what its services hold)."""
        self._on_stop.append(callback)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
            # Whatever still runs (a handler the stop's grace cut off) is cancelled and let
            # finish, so that its `finally` lets go of what it holds.
            left = asyncio.all_tasks(self._loop)
            for task in left:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        finally:
            self._loop.close()
            for callback in self._on_stop:
                callback()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def add_insecure_port(self, address: str) -> int:
        async def add() -> int:
            return self.server.add_insecure_port(address)

        return self._call(add())

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        async def add() -> int:
            return self.server.add_secure_port(address, credentials)

        return self._call(add())

    def start(self) -> None:
        self._call(self.server.start())

    def stop(self, grace: float | None = None) -> threading.Event:
        """Stop serving: calls in progress get `grace` seconds (None: none, they are cancelled
        now). Returns an event set once the server and its loop have stopped."""
        with self._lock:
            if self._stopped is not None:
                return self._stopped
            stopped = self._stopped = threading.Event()
        if not self._thread.is_alive():
            stopped.set()
            return stopped

        async def stop() -> None:
            try:
                await self.server.stop(grace)
            finally:
                self._loop.call_soon(self._loop.stop)

        asyncio.run_coroutine_threadsafe(stop(), self._loop)

        def wait_for_the_loop() -> None:
            self._thread.join()
            stopped.set()

        threading.Thread(target=wait_for_the_loop, name="grpc-aio-stop", daemon=True).start()
        return stopped
