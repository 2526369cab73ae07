"""The allocator's store port: the few key-value operations coil needs from etcd.

The allocator speaks only these types; `coil_allocator.etcd_store.EtcdStore` is the one adapter.
Keys and values are the store's own: keys are `str` (UTF-8 in etcd), values `bytes`.
A transaction is a list of compares and two lists of operations, committed atomically at one
revision, exactly as etcd's Txn: `success` runs when every compare holds, `failure` otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

CompareTarget = Literal["create", "mod", "version", "value"]
CompareOp = Literal["=", "!=", "<", ">"]


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as read, with etcd's revisions (and the lease it is bound to, 0 for none)."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0  # the lease the key lives on; 0 for none


@dataclass(frozen=True, slots=True)
class Compare:
    """A compare of one key, or of every key in [key, range_end) when range_end is set.

    etcd semantics: a compare over an empty range holds for create/mod/version targets compared with
    the zero value; a value compare on a missing key never holds.
    """

    key: str
    target: CompareTarget
    op: CompareOp
    operand: int | bytes
    range_end: str | None = None


@dataclass(frozen=True, slots=True)
class Put:
    """Write `value` at `key` (optionally bound to a lease)."""

    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete `key`, or every key with that prefix when `prefix` is true."""

    key: str
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class Get:
    """Read `key`, or every key with that prefix when `prefix` is true."""

    key: str
    prefix: bool = False
    keys_only: bool = False


Op = Put | Delete | Get


@dataclass(frozen=True, slots=True)
class TxnResult:
    """Outcome of a transaction.

    `responses` has one entry per executed operation: a list of `KeyValue` for a `Get`, the number
    of deleted keys for a `Delete`, and None for a `Put`.
    """

    succeeded: bool
    revision: int
    responses: tuple[list[KeyValue] | int | None, ...]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change seen by a watch. For a "delete", `kv` carries the key, an empty value and the
    deletion's revision as `mod_revision` (create_revision and version are 0). `prev` is the
    key as it was before the change (None when it did not exist, or when the watch was not
    asked for it)."""

    kind: Literal["put", "delete"]
    kv: KeyValue
    prev: KeyValue | None = None

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """What a watch delivers at a time: the events of whole revisions, oldest first, and the
    revision the watcher has now seen everything up to (resume a broken watch from
    `revision + 1`). A batch without events is a progress note: nothing changed up to
    `revision`."""

    revision: int
    events: tuple[WatchEvent, ...]


class Watch(Protocol):
    """A running watch: iterate for batches; `close()` ends the iteration from any thread.

    Iterating raises `coil_core.errors.Compacted` when the start revision is older than the
    store's compacted history (list afresh, then watch from the list's revision + 1), and
    `coil_core.errors.Unavailable` when the stream breaks (watch again from the last batch's
    revision + 1, on any endpoint). It ends without error only after `close()`.
    """

    def __iter__(self) -> Iterator[WatchBatch]: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """The store's own figures: its current revision and the size of its database file."""

    revision: int
    db_size: int


def prefix_end(prefix: str) -> str:
    """The smallest key greater than every key that starts with `prefix` (etcd's range end)."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw).decode("utf-8", errors="surrogateescape")
        raw.pop()
    return "\0"


def absent(key: str) -> Compare:
    """Holds when `key` does not exist."""
    return Compare(key, "create", "=", 0)


def unchanged(key: str, mod_revision: int) -> Compare:
    """Holds when `key` was last modified at `mod_revision` (0: it does not exist)."""
    return Compare(key, "mod", "=", mod_revision)


def value_is(key: str, value: bytes) -> Compare:
    """Holds when `key` exists and its value is exactly `value`."""
    return Compare(key, "value", "=", value)


def none_with_prefix(prefix: str) -> Compare:
    """Holds when no key starts with `prefix`."""
    return Compare(prefix, "create", "=", 0, range_end=prefix_end(prefix))


def none_changed_since(prefix: str, revision: int) -> Compare:
    """Holds when no key with `prefix` was created or modified after `revision`.

    Deletions are not seen by this compare; callers use it where a deletion cannot break the
    invariant they protect (for example: a deleted pool cannot create an overlap).
    """
    return Compare(prefix, "mod", "<", revision + 1, range_end=prefix_end(prefix))


class Store(Protocol):
    """What the allocator needs from its store.

    Every method raises `coil_core.errors.Unavailable` when the store cannot be reached or
    does not answer in time, and `coil_core.errors.CoilError` for any other store failure
    (for example a transaction larger than the store accepts). Reads may be retried by the adapter
    on another endpoint; transactions are never retried by it.
    """

    def get(self, key: str) -> KeyValue | None:
        """The key's current value, or None when it does not exist."""
        ...

    def range(
        self, prefix: str, *, keys_only: bool = False, revision: int = 0
    ) -> tuple[list[KeyValue], int]:
        """Every key with `prefix` in key order, read at one revision (the current one when 0).

        Returns the keys and the revision they were read at. Large ranges are read in pages at
        that revision, so the result is one consistent snapshot.
        """
        ...

    def count(self, prefix: str, *, revision: int = 0) -> int:
        """How many keys start with `prefix` (counted by the store; nothing is transferred)."""
        ...

    def keys(self, prefix: str, *, revision: int = 0) -> list[str]:
        """The keys with `prefix` at one revision, without values (cheaper than `range`)."""
        ...

    def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """Commit one transaction. Never retried: a lost reply may hide a committed change."""
        ...

    def grant_lease(self, ttl: int) -> int:
        """Create a lease of `ttl` seconds; return its ID."""
        ...

    def keep_alive(self, lease_id: int) -> int:
        """Refresh a lease once and return its remaining TTL (0 or less when it has expired).

        Sent on the process's one lease keep-alive stream (see `hold_lease`), never on a stream
        of its own.
        """
        ...

    def hold_lease(self, lease_id: int, ttl: int) -> None:
        """Keep `lease_id` alive from now on, refreshing it on the process's one long-lived
        keep-alive stream (when a minute of its TTL is left, and at least three times per TTL)
        until `drop_lease`. A lease the store says has expired is dropped by itself
        (`lease_held` turns false)."""
        ...

    def drop_lease(self, lease_id: int) -> None:
        """Stop refreshing `lease_id`; it expires on its own after its TTL. No-op if not held."""
        ...

    def lease_held(self, lease_id: int) -> bool:
        """Whether `lease_id` is being kept alive and the store's last answer said it lives."""
        ...

    def revoke_lease(self, lease_id: int) -> None:
        """End a lease at once: every key bound to it is deleted. No-op if it has expired."""
        ...

    def watch(self, prefix: str, start_revision: int, *, prev_kv: bool = False) -> Watch:
        """Watch every key with `prefix` from `start_revision` on (the next revision when 0);
        with `prev_kv`, each event carries the key's previous value.

        Raises Unavailable when no endpoint accepts the watch; see `Watch` for what iterating
        raises."""
        ...

    def compact(self, revision: int) -> None:
        """Forget the history before `revision` (etcd's compaction; keys' current values stay).

        Raises Compacted if history is already compacted past `revision`."""
        ...

    def status(self) -> StoreStatus:
        """The store's current revision and database size."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...
