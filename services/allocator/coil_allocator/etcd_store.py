"""The etcd adapter of the allocator's store port.

It uses the etcd v3 gRPC API stubs that ship with `etcd-sdk-python` (module `pyetcd.etcdrpc`) over
channels it manages itself, because the allocator needs what that package's high-level client
hides: revisions in every answer, compares over key ranges, paged reads at one revision, and
token refresh. Nothing of etcd's types leaves this module.

Endpoints: one channel per endpoint; after an UNAVAILABLE or DEADLINE_EXCEEDED the next endpoint
is used. Reads are retried once on each other endpoint; transactions are never retried here (a
lost reply may hide a committed change; the allocator's callers decide).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from pyetcd import etcdrpc

from coil_allocator.store import (
    Compare,
    Delete,
    Get,
    KeyValue,
    Op,
    Put,
    TxnResult,
    prefix_end,
)
from coil_core.errors import CoilError, InvalidArgument, Unavailable

T = TypeVar("T")

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
        for endpoint in config.endpoints:
            target = endpoint.split("://", 1)[-1].rstrip("/")
            if not target:
                raise InvalidArgument(f"etcd endpoint {endpoint!r}: empty address")
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
        if config.username:
            self._authenticate()

    # -- plumbing ---------------------------------------------------------------------------

    def _endpoint(self) -> tuple[int, grpc.Channel]:
        with self._lock:
            self._turn += 1
            channels = self._channels[self._current]
            return self._current, channels[self._turn % len(channels)]

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
        def call(channel: grpc.Channel) -> int:
            responses = etcdrpc.LeaseStub(channel).LeaseKeepAlive(
                iter([etcdrpc.LeaseKeepAliveRequest(ID=lease_id)]),
                timeout=self._config.timeout,
                metadata=self._metadata(),
            )
            for response in responses:
                return int(response.TTL)
            return 0

        return self._call(call, idempotent=True)

    def close(self) -> None:
        for channels in self._channels:
            for channel in channels:
                channel.close()


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
