"""The etcd adapter of the allocator's store port.

It uses the etcd v3 gRPC API stubs that ship with `etcd-sdk-python` (module `pyetcd.etcdrpc`) over
channels it manages itself, because the allocator needs what that package's high-level client
hides: revisions in every answer, compares over key ranges, paged reads at one revision, and
token refresh. Nothing of etcd's types leaves this module.

Endpoints: one channel per endpoint; after an UNAVAILABLE or DEADLINE_EXCEEDED the next endpoint
is used. Reads are retried once on each other endpoint; transactions are never retried here (a
lost reply may hide a committed change; the allocator's callers decide).

Streams: a watch is one Watch stream per `watch()` call, ended by its `close()`. Leases are kept
alive on one LeaseKeepAlive stream per `EtcdStore`, opened on first use and reopened (on the next
endpoint) when it breaks; it carries every lease the process holds, and the one-off refreshes of
`keep_alive`. That stream runs on grpc.aio, in a thread of its own with its own event loop and
channels (same endpoints, credentials and token), so a message costs no hand-off between Python
threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio
from pyetcd import etcdrpc
from pyetcd.etcdrpc import kv_pb2

from coil_allocator.store import (
    Compare,
    Delete,
    Get,
    KeyValue,
    Op,
    Put,
    StoreStatus,
    TxnResult,
    WatchBatch,
    WatchEvent,
    prefix_end,
)
from coil_core.errors import CoilError, Compacted, InvalidArgument, Unavailable

T = TypeVar("T")
log = logging.getLogger("coil.allocator.etcd")

_PAGE = 5000
CHANNELS_PER_ENDPOINT = 4
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_TARGETS = {
    "create": etcdrpc.Compare.CREATE,
    "mod": etcdrpc.Compare.MOD,
    "version": etcdrpc.Compare.VERSION,
    "value": etcdrpc.Compare.VALUE,
}
_RESULTS = {
    "=": etcdrpc.Compare.EQUAL,
    "!=": etcdrpc.Compare.NOT_EQUAL,
    "<": etcdrpc.Compare.LESS,
    ">": etcdrpc.Compare.GREATER,
}


@dataclass(frozen=True)
class EtcdConfig:
    """How to reach etcd. `endpoints` are "host:port", optionally with http:// or https://."""

    endpoints: tuple[str, ...]
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    timeout: float = 5.0


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InvalidArgument(f"etcd {what} {path!r}: {e.strerror}") from None


class EtcdStore:
    """`coil_allocator.store.Store` on etcd v3. Thread-safe; share one per process."""

    def __init__(self, config: EtcdConfig) -> None:
        if not config.endpoints:
            raise InvalidArgument("etcd endpoints: none given")
        if bool(config.username) != bool(config.password):
            raise InvalidArgument("etcd auth: give both a username and a password, or neither")
        if bool(config.tls_cert) != bool(config.tls_key):
            raise InvalidArgument("etcd TLS: give both a client certificate and its key")
        self._config = config
        secure = bool(config.tls_ca or config.tls_cert) or any(
            e.startswith("https://") for e in config.endpoints
        )
        creds = None
        if secure:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(config.tls_ca, "CA") if config.tls_ca else None,
                private_key=_read(config.tls_key, "key") if config.tls_key else None,
                certificate_chain=_read(config.tls_cert, "certificate")
                if config.tls_cert
                else None,
            )
        options = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 30_000),
            # Our own connections per channel: several channels to one endpoint must not share
            # one connection (and its lock) through gRPC's global subchannel pool.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        # Per endpoint a few channels, used in turn: one channel serialises the calls of all
        # the server's threads on its lock (measured in a claim storm).
        self._channels: list[list[grpc.Channel]] = []
        self._targets: list[str] = []
        self._creds = creds
        self._options = options
        for endpoint in config.endpoints:
            target = endpoint.split("://", 1)[-1].rstrip("/")
            if not target:
                raise InvalidArgument(f"etcd endpoint {endpoint!r}: empty address")
            self._targets.append(target)
            self._channels.append(
                [
                    grpc.secure_channel(target, creds, options=options)
                    if creds
                    else grpc.insecure_channel(target, options=options)
                    for _ in range(CHANNELS_PER_ENDPOINT)
                ]
            )
        # One KV stub per channel: building a stub per call cost ~30 us (profiled).
        self._kv_stubs = {id(ch): etcdrpc.KVStub(ch) for chs in self._channels for ch in chs}
        self._current = 0
        self._turn = 0
        self._lock = threading.Lock()
        self._token: str | None = None
        self._keeper = _LeaseKeeper(self)
        if config.username:
            self._authenticate()

    # -- plumbing ---------------------------------------------------------------------------

    def _endpoint(self) -> tuple[int, grpc.Channel]:
        with self._lock:
            self._turn += 1
            channels = self._channels[self._current]
            return self._current, channels[self._turn % len(channels)]

    def _endpoint_index(self) -> int:
        with self._lock:
            return self._current

    def _aio_channel(self, index: int) -> grpc.aio.Channel:
        """A grpc.aio channel to endpoint `index`, for the lease keeper's event loop (call it
        on that loop)."""
        target = self._targets[index]
        # No bandwidth probing: it pings etcd after incoming data to grow the window, which
        # tiny answers never need (some 15 % of the stream's CPU in a microbenchmark).
        options = [*self._options, ("grpc.http2.bdp_probe", 0)]
        if self._creds is not None:
            return grpc.aio.secure_channel(target, self._creds, options=options)
        return grpc.aio.insecure_channel(target, options=options)

    def _fail_over(self, failed: int) -> None:
        with self._lock:
            if self._current == failed:
                self._current = (failed + 1) % len(self._channels)

    def _metadata(self) -> list[tuple[str, str]] | None:
        return [("token", self._token)] if self._token else None

    def _authenticate(self) -> None:
        def call(channel: grpc.Channel) -> Any:
            return etcdrpc.AuthStub(channel).Authenticate(
                etcdrpc.AuthenticateRequest(
                    name=self._config.username, password=self._config.password
                ),
                timeout=self._config.timeout,
            )

        try:
            response = self._call(call, idempotent=True, authenticated=False)
        except Unavailable:
            raise
        except CoilError as e:
            raise CoilError(f'etcd auth as user "{self._config.username}" failed: {e}') from None
        self._token = response.token

    def _call(
        self,
        fn: Callable[[grpc.Channel], T],
        *,
        idempotent: bool,
        authenticated: bool = True,
    ) -> T:
        """Run one RPC, mapping gRPC errors to domain errors (see the module docstring)."""
        attempts = len(self._channels) if idempotent else 1
        reauthenticated = False
        last: grpc.RpcError | None = None
        attempt = 0
        while attempt < attempts:
            index, channel = self._endpoint()
            try:
                return fn(channel)
            except grpc.RpcError as e:
                code = e.code()
                if (
                    code == grpc.StatusCode.UNAUTHENTICATED
                    and authenticated
                    and self._config.username
                    and not reauthenticated
                ):
                    # Simple tokens expire; etcd refused the call before running it.
                    reauthenticated = True
                    self._authenticate()
                    continue
                if code in _TRANSIENT:
                    self._fail_over(index)
                    last = e
                    attempt += 1
                    continue
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise CoilError(f"etcd refused the request: {e.details()}") from None
                raise CoilError(f"etcd: {code.name}: {e.details()}") from None
        assert last is not None
        raise Unavailable(
            f"etcd at {', '.join(self._config.endpoints)} unreachable: {last.details()}"
        ) from None

    # -- the port ---------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        request = etcdrpc.RangeRequest(key=key.encode())
        response = self._call(self._ranger(request), idempotent=True)
        return _kv(response.kvs[0]) if response.kvs else None

    def range(
        self, prefix: str, *, keys_only: bool = False, revision: int = 0
    ) -> tuple[list[KeyValue], int]:
        out: list[KeyValue] = []
        for kvs, read_at in self._pages(prefix, keys_only=keys_only, revision=revision):
            out.extend(_kv(kv) for kv in kvs)
            revision = read_at
        return out, revision

    def count(self, prefix: str, *, revision: int = 0) -> int:
        request = etcdrpc.RangeRequest(
            key=prefix.encode(),
            range_end=prefix_end(prefix).encode(),
            revision=revision,
            count_only=True,
        )
        return int(self._call(self._ranger(request), idempotent=True).count)

    def keys(self, prefix: str, *, revision: int = 0) -> list[str]:
        out: list[str] = []
        for kvs, _ in self._pages(prefix, keys_only=True, revision=revision):
            # No KeyValue per key: listing many keys is dominated by object creation.
            out.extend(kv.key.decode() for kv in kvs)
        return out

    def _pages(
        self, prefix: str, *, keys_only: bool, revision: int
    ) -> Iterator[tuple[Sequence[Any], int]]:
        """The raw key-values under ``prefix`` page by page, with the revision they were read at:
        ``revision``, or if 0 the first page's, so that every page shows the same state."""
        end = prefix_end(prefix).encode()
        start = prefix.encode()
        while True:
            request = etcdrpc.RangeRequest(
                key=start, range_end=end, limit=_PAGE, revision=revision, keys_only=keys_only
            )
            response = self._call(self._ranger(request), idempotent=True)
            if revision == 0:
                revision = response.header.revision
            yield response.kvs, revision
            if not response.more or not response.kvs:
                return
            start = response.kvs[-1].key + b"\0"

    def _ranger(self, request: Any) -> Callable[[grpc.Channel], Any]:
        def call(channel: grpc.Channel) -> Any:
            return self._kv_stubs[id(channel)].Range(
                request, timeout=self._config.timeout, metadata=self._metadata()
            )

        return call

    def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        request = etcdrpc.TxnRequest(
            compare=[_compare(c) for c in compares],
            success=[_op(o) for o in success],
            failure=[_op(o) for o in failure],
        )
        response = self._call(
            lambda ch: self._kv_stubs[id(ch)].Txn(
                request, timeout=self._config.timeout, metadata=self._metadata()
            ),
            idempotent=False,
        )
        results: list[list[KeyValue] | int | None] = []
        for r in response.responses:
            kind = r.WhichOneof("response")
            if kind == "response_range":
                results.append([_kv(kv) for kv in r.response_range.kvs])
            elif kind == "response_delete_range":
                results.append(int(r.response_delete_range.deleted))
            else:
                results.append(None)
        return TxnResult(bool(response.succeeded), int(response.header.revision), tuple(results))

    def grant_lease(self, ttl: int) -> int:
        response = self._call(
            lambda ch: etcdrpc.LeaseStub(ch).LeaseGrant(
                etcdrpc.LeaseGrantRequest(TTL=ttl),
                timeout=self._config.timeout,
                metadata=self._metadata(),
            ),
            idempotent=False,
        )
        return int(response.ID)

    def keep_alive(self, lease_id: int) -> int:
        return self._keeper.refresh_once(lease_id, self._config.timeout)

    def hold_lease(self, lease_id: int, ttl: int) -> None:
        self._keeper.hold(lease_id, ttl)

    def drop_lease(self, lease_id: int) -> None:
        self._keeper.drop(lease_id)

    def lease_held(self, lease_id: int) -> bool:
        return self._keeper.held(lease_id)

    def revoke_lease(self, lease_id: int) -> None:
        self._keeper.drop(lease_id)

        def call(channel: grpc.Channel) -> None:
            try:
                etcdrpc.LeaseStub(channel).LeaseRevoke(
                    etcdrpc.LeaseRevokeRequest(ID=lease_id),
                    timeout=self._config.timeout,
                    metadata=self._metadata(),
                )
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:  # expired already
                    raise

        self._call(call, idempotent=True)

    def watch(self, prefix: str, start_revision: int, *, prev_kv: bool = False) -> EtcdWatch:
        return EtcdWatch(self, prefix, start_revision, prev_kv)

    def compact(self, revision: int) -> None:
        def call(channel: grpc.Channel) -> None:
            self._kv_stubs[id(channel)].Compact(
                etcdrpc.CompactionRequest(revision=revision, physical=False),
                timeout=self._config.timeout,
                metadata=self._metadata(),
            )

        try:
            self._call(call, idempotent=True)
        except CoilError as e:
            if "compacted" in str(e):
                raise Compacted(f"compact to {revision}: {e}", 0) from None
            raise

    def status(self) -> StoreStatus:
        response = self._call(
            lambda ch: etcdrpc.MaintenanceStub(ch).Status(
                etcdrpc.StatusRequest(), timeout=self._config.timeout, metadata=self._metadata()
            ),
            idempotent=True,
        )
        return StoreStatus(int(response.header.revision), int(response.dbSize))

    def close(self) -> None:
        self._keeper.close()
        for channels in self._channels:
            for channel in channels:
                channel.close()


_STREAM_END = object()


class EtcdWatch:
    """One etcd Watch stream over a prefix (see `coil_allocator.store.Watch`)."""

    def __init__(
        self, store: EtcdStore, prefix: str, start_revision: int, prev_kv: bool = False
    ) -> None:
        self._prefix = prefix
        self._start = start_revision
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._store = store
        self._index, channel = store._endpoint()
        self._requests.put(
            etcdrpc.WatchRequest(
                create_request=etcdrpc.WatchCreateRequest(
                    key=prefix.encode(),
                    range_end=prefix_end(prefix).encode(),
                    start_revision=start_revision,
                    progress_notify=True,
                    prev_kv=prev_kv,
                )
            )
        )
        self._call = etcdrpc.WatchStub(channel).Watch(
            self._request_stream(), metadata=store._metadata()
        )

    def _request_stream(self) -> Iterator[Any]:
        while True:
            item = self._requests.get()
            if item is _STREAM_END:
                return
            yield item

    def close(self) -> None:
        self._closed.set()
        self._requests.put(_STREAM_END)
        self._call.cancel()

    def __iter__(self) -> Iterator[WatchBatch]:
        what = f'watch "{self._prefix}" from revision {self._start}'
        try:
            for response in self._call:
                if response.compact_revision:
                    raise Compacted(
                        f"{what}: history before revision {response.compact_revision} is "
                        "compacted; list afresh",
                        int(response.compact_revision),
                    )
                if response.canceled:
                    raise Unavailable(f"{what}: etcd ended the watch: {response.cancel_reason}")
                if response.created and not response.events:
                    # The header of the creation answer is the store's revision, not the
                    # watcher's: events before it may still be on their way.
                    continue
                if not response.events:
                    # A progress note: etcd sends it only to watchers that have seen everything.
                    yield WatchBatch(int(response.header.revision), ())
                    continue
                events = tuple(_event(e) for e in response.events)
                # Not the header's revision: a watcher catching up gets the store's current
                # revision in the header while later events are still to come.
                yield WatchBatch(events[-1].revision, events)
        except grpc.RpcError as e:
            if self._closed.is_set():
                return
            self._store._fail_over(self._index)
            raise Unavailable(f"{what}: stream broken ({e.code().name}): {e.details()}") from None
        finally:
            if not self._closed.is_set():
                self.close()
        if not self._closed.is_set():
            raise Unavailable(f"{what}: etcd closed the stream")


def _event(e: Any) -> WatchEvent:
    prev = _kv(e.prev_kv) if e.HasField("prev_kv") else None
    if e.type == kv_pb2.Event.DELETE:
        key = KeyValue(e.kv.key.decode(), b"", 0, int(e.kv.mod_revision), 0)
        return WatchEvent("delete", key, prev)
    return WatchEvent("put", _kv(e.kv), prev)


@dataclass
class _Held:
    ttl: int
    due: float

    @property
    def period(self) -> float:
        """Refresh this often: when a minute of the TTL is left (so a lost answer is retried in
        time), and at least three times per TTL for short ones. Every refresh is a message each
        way through Python: ten thousand node leases of 180 s cost 83 of them a second instead of
        333 at a third of their TTL."""
        return max(self.ttl / 3, self.ttl - 60.0, 0.5)


class _LeaseKeeper:
    """The one LeaseKeepAlive stream of an `EtcdStore` and the leases it keeps alive.

    The stream runs on grpc.aio in a thread of its own, with its own event loop and one aio
    channel per endpoint (same addresses, TLS credentials and token as the store's channels):
    a sender coroutine writes a refresh for every held lease when it falls due (see
    `_Held.period`; due leases are gathered into one pass every `TICK` seconds, from a heap, so
    ten thousand leases cost no more than their messages) and for every one-off
    `refresh_once`; a reader coroutine takes the answers. Both run in that one thread, so a
    message costs no hand-off between Python threads (several per message on the sync API's
    request-iterator and reader threads: twice the CPU per refresh, measured with 5,000 other
    threads in the process). What is left per message is gRPC's own: each write and each read
    completes through its poller thread and wakes the loop. Other threads only
    touch the shared state under a lock and wake the loop when it must act sooner than it
    planned. When the stream breaks, the loop waits `RETRY` seconds and opens a new one on the
    next endpoint, refreshing every held lease at once. The thread starts on first use: a
    process that holds no lease has none.
    """

    RETRY = 0.5
    TICK = 0.5

    def __init__(self, store: EtcdStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._held: dict[int, _Held] = {}
        self._due: list[tuple[float, int]] = []  # heap of (due, lease); stale entries skipped
        self._waiting: dict[int, list[tuple[threading.Event, list[int]]]] = {}
        self._oneoffs: list[int] = []  # one-off refreshes not yet written
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._wake_at = 0.0  # when the sender next looks at the heap by itself
        self._closed = False

    # -- API --------------------------------------------------------------------------------

    def hold(self, lease_id: int, ttl: int) -> None:
        with self._lock:
            entry = self._held.get(lease_id)
            if entry is None:
                entry = self._held[lease_id] = _Held(ttl, 0.0)
                entry.due = time.monotonic() + entry.period
                heapq.heappush(self._due, (entry.due, lease_id))
                if entry.due < self._wake_at:
                    self._kick()
            else:
                entry.ttl = ttl
            self._start()

    def drop(self, lease_id: int) -> None:
        with self._lock:
            self._held.pop(lease_id, None)

    def held(self, lease_id: int) -> bool:
        with self._lock:
            return lease_id in self._held

    def refresh_once(self, lease_id: int, timeout: float) -> int:
        """Send one refresh on the stream and wait for its answer: the lease's TTL (<= 0 when it
        has expired). Unavailable when no answer comes within `timeout`."""
        done = threading.Event()
        answer: list[int] = []
        with self._lock:
            self._waiting.setdefault(lease_id, []).append((done, answer))
            self._oneoffs.append(lease_id)
            self._start()
            self._kick()
        if not done.wait(timeout):
            with self._lock:
                waiting = self._waiting.get(lease_id, [])
                if (done, answer) in waiting:
                    waiting.remove((done, answer))
                    if not waiting:
                        self._waiting.pop(lease_id, None)
            raise Unavailable(
                f"lease {lease_id} keep-alive: no answer from etcd within {timeout:g} s"
            )
        return answer[0]

    def close(self) -> None:
        """End the stream, close its channels and wait (briefly) for its thread: the store's
        channels close after this."""
        with self._lock:
            self._closed = True
            self._kick()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.RETRY + 2.0)

    # -- the stream -------------------------------------------------------------------------

    def _start(self) -> None:
        """Start the stream's thread if it is not running (lock held)."""
        if self._thread is None and not self._closed:
            self._loop = asyncio.new_event_loop()
            self._wake = asyncio.Event()
            self._thread = threading.Thread(target=self._run, name="etcd-keepalive", daemon=True)
            self._thread.start()

    def _kick(self) -> None:
        """Make the sender look at the heap and the one-offs now (lock held; any thread)."""
        if self._loop is not None and self._wake is not None:
            self._wake_at = 0.0  # one wake-up is enough until the sender runs
            with contextlib.suppress(RuntimeError):  # the loop has closed already
                self._loop.call_soon_threadsafe(self._wake.set)

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        try:
            loop.run_until_complete(self._main())
        finally:
            with self._lock:
                loop.close()

    async def _main(self) -> None:
        channels: dict[int, grpc.aio.Channel] = {}
        try:
            while not self._closed:
                index = self._store._endpoint_index()
                try:
                    channel = channels.get(index)
                    if channel is None:
                        channel = channels[index] = self._store._aio_channel(index)
                    reason = await self._stream(channel)
                except Exception as e:  # never let the thread die: held leases would expire
                    reason = repr(e)
                if self._closed:
                    return
                log.warning("lease keep-alive stream broken (%s); reopening", reason)
                self._store._fail_over(index)
                # A fresh channel next time: a broken one retries its connection only after a
                # growing back-off (seconds after a restart of etcd), and leases have TTLs.
                broken = channels.pop(index, None)
                if broken is not None:
                    await broken.close()
                await asyncio.sleep(self.RETRY)
        finally:
            for channel in channels.values():
                await channel.close()

    async def _stream(self, channel: grpc.aio.Channel) -> str:
        """Run one stream until it breaks or the keeper closes; say why it ended."""
        call = etcdrpc.LeaseStub(channel).LeaseKeepAlive(metadata=self._store._metadata())
        with self._lock:
            # A new stream refreshes every held lease at once, and repeats lost one-offs.
            now = time.monotonic()
            for entry in self._held.values():
                entry.due = now
            self._due = [(now, lease_id) for lease_id in self._held]
            heapq.heapify(self._due)
            self._oneoffs = list(self._waiting)
        reader = asyncio.ensure_future(self._read(call))
        sender = asyncio.ensure_future(self._send(call))
        try:
            await asyncio.wait((reader, sender), return_when=asyncio.FIRST_COMPLETED)
        finally:
            call.cancel()
            for task in (reader, sender):
                task.cancel()
        error: BaseException | None = None
        for task in (reader, sender):
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception as e:
                error = error or e
        if isinstance(error, grpc.RpcError):
            return error.code().name
        return repr(error) if error is not None else "closed by etcd"

    async def _read(self, call: Any) -> None:
        """Take the stream's answers until it ends (or raise the error that broke it)."""
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return
            self._answer(int(response.ID), int(response.TTL))

    async def _send(self, call: Any) -> None:
        """Write a refresh of each held lease when it falls due, and the one-offs, until
        the keeper closes."""
        while True:
            with self._lock:
                if self._closed:
                    return
                assert self._wake is not None
                self._wake.clear()
                now = time.monotonic()
                horizon = now + self.TICK
                batch = self._oneoffs
                self._oneoffs = []
                while self._due and self._due[0][0] <= horizon:
                    due, lease_id = heapq.heappop(self._due)
                    entry = self._held.get(lease_id)
                    if entry is None or entry.due != due:
                        continue  # dropped, or rescheduled by an answer
                    # Due again after another period unless an answer reschedules it: a lost
                    # answer is thus retried well before the lease can expire.
                    entry.due = now + entry.period
                    heapq.heappush(self._due, (entry.due, lease_id))
                    batch.append(lease_id)
                wait = max(self._due[0][0] - now if self._due else 60.0, self.TICK)
                self._wake_at = now + wait
            for lease_id in batch:
                await call.write(etcdrpc.LeaseKeepAliveRequest(ID=lease_id))
            await self._sleep(wait - (time.monotonic() - now))

    async def _sleep(self, seconds: float) -> None:
        """Sleep up to `seconds`, less if woken by `_kick`."""
        assert self._wake is not None
        if seconds <= 0 or self._wake.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def _answer(self, lease_id: int, ttl: int) -> None:
        with self._lock:
            entry = self._held.get(lease_id)
            if entry is not None:
                if ttl <= 0:
                    log.info("lease %x expired; no longer kept alive", lease_id)
                    del self._held[lease_id]
                else:
                    entry.due = time.monotonic() + entry.period
                    heapq.heappush(self._due, (entry.due, lease_id))
            waiting = self._waiting.pop(lease_id, None)
        if waiting:
            for done, answer in waiting:
                answer.append(ttl)
                done.set()


def _kv(kv: Any) -> KeyValue:
    return KeyValue(
        key=kv.key.decode(),
        value=bytes(kv.value),
        create_revision=int(kv.create_revision),
        mod_revision=int(kv.mod_revision),
        version=int(kv.version),
        lease=int(kv.lease),
    )


def _compare(c: Compare) -> Any:
    message = etcdrpc.Compare(key=c.key.encode(), target=_TARGETS[c.target], result=_RESULTS[c.op])
    if c.range_end is not None:
        message.range_end = c.range_end.encode()
    if c.target == "value":
        assert isinstance(c.operand, bytes)
        message.value = c.operand
    elif c.target == "create":
        message.create_revision = int(c.operand)
    elif c.target == "mod":
        message.mod_revision = int(c.operand)
    else:
        message.version = int(c.operand)
    return message


def _op(o: Op) -> Any:
    if isinstance(o, Put):
        return etcdrpc.RequestOp(
            request_put=etcdrpc.PutRequest(key=o.key.encode(), value=o.value, lease=o.lease)
        )
    if isinstance(o, Delete):
        request = etcdrpc.DeleteRangeRequest(key=o.key.encode())
        if o.prefix:
            request.range_end = prefix_end(o.key).encode()
        return etcdrpc.RequestOp(request_delete_range=request)
    request = etcdrpc.RangeRequest(key=o.key.encode(), keys_only=o.keys_only)
    if o.prefix:
        request.range_end = prefix_end(o.key).encode()
    return etcdrpc.RequestOp(request_range=request)


def open_store(config: EtcdConfig) -> EtcdStore:
    """Connect to etcd (lazily; the first call fails with Unavailable if it is unreachable)."""
    return EtcdStore(config)


__all__ = ["EtcdConfig", "EtcdStore", "open_store", "Get"]
