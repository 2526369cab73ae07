"""The etcd adapter's streams on a real etcd: watches (events, resume, compaction) and the one
lease keep-alive stream that carries every lease a process holds."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from coil_allocator.etcd_store import EtcdConfig, EtcdStore
from coil_allocator.store import Delete, Put, WatchBatch
from coil_core.errors import Compacted, Unavailable
from tests.harness.etcd import EtcdServer, free_port, start_etcd


@pytest.fixture
def own_etcd() -> Iterator[EtcdServer]:
    """An etcd of this test alone: compaction forgets history for every client of a server."""
    server = start_etcd("coil-streams")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_store(own_etcd: EtcdServer) -> Iterator[EtcdStore]:
    s = EtcdStore(EtcdConfig((own_etcd.endpoint,), timeout=3))
    try:
        yield s
    finally:
        s.close()


class Collector:
    """Runs a watch in a thread and keeps what it delivers (or how it ended)."""

    def __init__(self, store: EtcdStore, prefix: str, start: int) -> None:
        self.watch = store.watch(prefix, start)
        self.batches: list[WatchBatch] = []
        self.error: Exception | None = None
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for batch in self.watch:
                with self.changed:
                    self.batches.append(batch)
                    self.changed.notify_all()
        except Exception as e:
            with self.changed:
                self.error = e
                self.changed.notify_all()

    def events(self) -> list[tuple[str, str, bytes, int]]:
        with self.changed:
            return [
                (e.kind, e.kv.key, e.kv.value, e.revision) for b in self.batches for e in b.events
            ]

    def wait_for(self, count: int, timeout: float = 5) -> list[tuple[str, str, bytes, int]]:
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(self.events()) < count and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.changed.wait(left)
        return self.events()

    def wait_error(self, timeout: float = 10) -> Exception | None:
        self.thread.join(timeout)
        return self.error

    def close(self) -> None:
        self.watch.close()
        self.thread.join(5)


def test_watch_delivers_puts_and_deletes_in_order_with_revisions(
    store: EtcdStore, etcd_prefix: str
) -> None:
    _, start = store.range(etcd_prefix)
    w = Collector(store, etcd_prefix, start + 1)
    try:
        r1 = store.txn([], [Put(etcd_prefix + "a", b"1")]).revision
        r2 = store.txn([], [Put(etcd_prefix + "b", b"2"), Put(etcd_prefix + "a", b"3")]).revision
        r3 = store.txn([], [Delete(etcd_prefix + "a")]).revision
        store.txn([], [Put(etcd_prefix.rstrip("/") + "-other/x", b"not mine")])
        events = w.wait_for(4)
        assert events == [
            ("put", etcd_prefix + "a", b"1", r1),
            ("put", etcd_prefix + "b", b"2", r2),
            ("put", etcd_prefix + "a", b"3", r2),
            ("delete", etcd_prefix + "a", b"", r3),
        ]
        assert w.error is None
    finally:
        w.close()
    # The batches never claim more than they delivered: the last one's revision is the last event's.
    assert w.batches[-1].revision == r3


def test_watch_with_prev_kv_tells_what_a_delete_removed(store: EtcdStore, etcd_prefix: str) -> None:
    first = store.txn([], [Put(etcd_prefix + "a", b"before")]).revision
    w = store.watch(etcd_prefix, first + 1, prev_kv=True)
    try:
        store.txn([], [Put(etcd_prefix + "a", b"after")])
        store.txn([], [Delete(etcd_prefix + "a")])
        events = []
        for batch in w:
            events.extend(batch.events)
            if len(events) >= 2:
                break
    finally:
        w.close()
    put, delete = events
    assert put.prev is not None and put.prev.value == b"before"
    assert delete.kind == "delete" and delete.prev is not None and delete.prev.value == b"after"


def test_a_watch_resumed_from_its_revision_loses_and_repeats_nothing(
    store: EtcdStore, etcd_prefix: str
) -> None:
    _, start = store.range(etcd_prefix)
    w = Collector(store, etcd_prefix, start + 1)
    for i in range(5):
        store.txn([], [Put(f"{etcd_prefix}k{i}", str(i).encode())])
    first = w.wait_for(5)
    w.close()
    seen_up_to = w.batches[-1].revision
    # Changes while nobody watches.
    for i in range(5, 9):
        store.txn([], [Put(f"{etcd_prefix}k{i}", str(i).encode())])
    store.txn([], [Delete(f"{etcd_prefix}k0")])
    w2 = Collector(store, etcd_prefix, seen_up_to + 1)
    try:
        second = w2.wait_for(5)
    finally:
        w2.close()
    keys = [k for _, k, _, _ in first + second]
    assert keys == [f"{etcd_prefix}k{i}" for i in range(9)] + [f"{etcd_prefix}k0"]
    assert [kind for kind, *_ in second] == ["put"] * 4 + ["delete"]


def test_watch_from_a_compacted_revision_says_so_and_a_fresh_list_resyncs(
    own_store: EtcdStore,
) -> None:
    prefix = "/coil/"
    old = own_store.txn([], [Put(prefix + "a", b"1")]).revision
    own_store.txn([], [Put(prefix + "a", b"2"), Put(prefix + "b", b"x")])
    now = own_store.txn([], [Delete(prefix + "b")]).revision
    own_store.compact(now)
    w = Collector(own_store, prefix, old)
    error = w.wait_error()
    assert isinstance(error, Compacted), error
    assert error.compact_revision == now
    # The clean resync: list, then watch from the list's revision on; nothing is missed.
    kvs, listed_at = own_store.range(prefix)
    assert {kv.key: kv.value for kv in kvs} == {prefix + "a": b"2"}
    w2 = Collector(own_store, prefix, listed_at + 1)
    try:
        r = own_store.txn([], [Put(prefix + "c", b"3")]).revision
        assert w2.wait_for(1) == [("put", prefix + "c", b"3", r)]
    finally:
        w2.close()
    # Compacting again below what is compacted is an error of its own kind.
    with pytest.raises(Compacted):
        own_store.compact(old)


def test_watch_reports_a_lost_etcd_as_unavailable() -> None:
    server = start_etcd("coil-lost")
    s = EtcdStore(EtcdConfig((server.endpoint,), timeout=2))
    try:
        _, now = s.range("/coil/")
        w = Collector(s, "/coil/", now + 1)
        s.txn([], [Put("/coil/x", b"1")])
        assert len(w.wait_for(1)) == 1
        server.proc.kill()
        error = w.wait_error(timeout=15)
        assert isinstance(error, Unavailable), error
    finally:
        s.close()
        server.stop()


def _keepalive_streams_started(server: EtcdServer) -> float:
    with urllib.request.urlopen(f"http://{server.endpoint}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("grpc_server_started_total{") and 'grpc_method="LeaseKeepAlive"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_held_leases_live_past_their_ttl_on_one_stream(
    own_store: EtcdStore, own_etcd: EtcdServer
) -> None:
    before = _keepalive_streams_started(own_etcd)
    leases = [own_store.grant_lease(3) for _ in range(30)]
    for i, lease in enumerate(leases):
        own_store.txn([], [Put(f"/coil/alive/{i}", b"", lease=lease)])
        own_store.hold_lease(lease, 3)
    # One-off refreshes (a node's report for a lease this process does not hold) ride the same
    # stream.
    extra = own_store.grant_lease(3)
    for _ in range(10):
        assert own_store.keep_alive(extra) > 0
    time.sleep(7)
    assert own_store.count("/coil/alive/") == 30
    assert all(own_store.lease_held(lease) for lease in leases)
    assert _keepalive_streams_started(own_etcd) - before == 1
    # A lease no longer held expires on its own, with its keys.
    own_store.drop_lease(leases[0])
    own_store.revoke_lease(leases[1])
    time.sleep(5)
    assert own_store.get("/coil/alive/0") is None
    assert own_store.get("/coil/alive/1") is None
    assert own_store.count("/coil/alive/") == 28
    assert not own_store.lease_held(leases[0])
    assert own_store.keep_alive(leases[1]) <= 0


def test_the_keepalive_stream_comes_back_after_etcd_restarts() -> None:
    server = start_etcd("coil-keeper")
    s = EtcdStore(EtcdConfig((server.endpoint,), timeout=2))
    try:
        lease = s.grant_lease(6)
        s.txn([], [Put("/coil/alive", b"", lease=lease)])
        s.hold_lease(lease, 6)
        # etcd stops and comes back on the same data: the stream must reopen and keep the lease.
        server.proc.terminate()
        server.proc.wait(10)
        import subprocess

        server.proc = subprocess.Popen(server.proc.args, stdout=subprocess.DEVNULL)  # type: ignore[arg-type]
        time.sleep(9)
        assert s.get("/coil/alive") is not None
        assert s.lease_held(lease)
    finally:
        s.close()
        server.stop()


def test_a_held_lease_that_etcd_says_has_expired_is_no_longer_held(
    own_store: EtcdStore, own_etcd: EtcdServer
) -> None:
    lease = own_store.grant_lease(2)
    own_store.hold_lease(lease, 2)
    assert own_store.lease_held(lease)
    # Revoked by another client: the next refresh is answered with TTL 0.
    other = EtcdStore(EtcdConfig((own_etcd.endpoint,), timeout=3))
    try:
        other.revoke_lease(lease)
    finally:
        other.close()
    deadline = time.monotonic() + 5
    while own_store.lease_held(lease) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not own_store.lease_held(lease)
    # Another lease held on the same stream lives on.
    kept = own_store.grant_lease(2)
    own_store.hold_lease(kept, 2)
    time.sleep(3)
    assert own_store.lease_held(kept)
    assert own_store.keep_alive(kept) > 0


def test_the_keepalive_stream_fails_over_to_the_next_endpoint(own_etcd: EtcdServer) -> None:
    dead = f"127.0.0.1:{free_port()}"
    live = EtcdStore(EtcdConfig((own_etcd.endpoint,), timeout=3))
    s = EtcdStore(EtcdConfig((dead, own_etcd.endpoint), timeout=3))
    try:
        lease = live.grant_lease(3)
        live.txn([], [Put("/coil/failover", b"", lease=lease)])
        # The stream opens on the dead endpoint first, breaks, and reopens on the live one,
        # repeating the refreshes that had no answer.
        s.hold_lease(lease, 3)
        assert s.keep_alive(lease) > 0
        time.sleep(5)
        assert live.get("/coil/failover") is not None
        assert s.lease_held(lease)
    finally:
        s.close()
        live.close()


def test_a_refresh_without_answer_is_unavailable_and_close_ends_the_stream() -> None:
    before = set(threading.enumerate())
    server = start_etcd("coil-keeper-down")
    s = EtcdStore(EtcdConfig((server.endpoint,), timeout=1))
    try:
        # The set-up, with time to spare on a loaded machine (the 1 s timeout is for the refresh).
        setup = EtcdStore(EtcdConfig((server.endpoint,), timeout=10))
        try:
            lease = setup.grant_lease(5)
        finally:
            setup.close()
        assert s.keep_alive(lease) > 0
        server.proc.kill()
        server.proc.wait(10)
        with pytest.raises(Unavailable, match=f"lease {lease} keep-alive: no answer"):
            s.keep_alive(lease)
    finally:
        s.close()
        server.stop()
    assert not [t for t in set(threading.enumerate()) - before if t.name == "etcd-keepalive"]
