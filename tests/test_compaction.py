"""Compaction on a real etcd: one replica at a time compacts, history stays bounded to the
retention window, the job moves on when its holder stops, and a quiet store sees no write."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from coil_allocator.compaction import Compactor
from coil_allocator.etcd_store import EtcdConfig, EtcdStore
from coil_allocator.store import Put
from coil_core.errors import Compacted
from tests.harness.etcd import EtcdServer, start_etcd

INTERVAL = 0.3
RETENTION = 1.5


@pytest.fixture
def own_etcd() -> Iterator[EtcdServer]:
    server = start_etcd("coil-compaction")
    try:
        yield server
    finally:
        server.stop()


def _store(server: EtcdServer) -> EtcdStore:
    return EtcdStore(EtcdConfig((server.endpoint,), timeout=3))


def _oldest_revision(store: EtcdStore) -> int:
    """The oldest revision still in etcd's history (1 when nothing was compacted)."""
    w = store.watch("/coil/", 1)
    try:
        for _ in w:
            return 1
    except Compacted as e:
        return e.compact_revision
    finally:
        w.close()
    return 1


def test_one_replica_compacts_and_history_stays_within_the_window(own_etcd: EtcdServer) -> None:
    stores = [_store(own_etcd) for _ in range(3)]
    a, b = (
        Compactor(s, "/coil/", interval=INTERVAL, retention=RETENTION, identity=f"replica-{i}")
        for i, s in enumerate(stores[:2])
    )
    writer = stores[2]
    written: list[tuple[float, int]] = []
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            written.append(
                (time.monotonic(), writer.txn([], [Put(f"/coil/k{i % 50}", b"v")]).revision)
            )
            i += 1
            time.sleep(0.02)

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    try:
        a.start()
        b.start()
        time.sleep(RETENTION + 8 * INTERVAL)
        assert sorted([a.compactions > 0, b.compactions > 0]) == [False, True]
        assert a.holding != b.holding
        holder, other = (a, b) if a.holding else (b, a)
        oldest = _oldest_revision(writer)
        now = time.monotonic()
        # History kept: at least the retention window, at most that plus two turns (and slack).
        kept_from = min(r for at, r in written if now - at <= RETENTION)
        dropped_before = max(r for at, r in written if now - at >= RETENTION + 4 * INTERVAL + 1)
        assert dropped_before <= oldest <= kept_from
        # The holder stops: the other takes the job over and compacts on.
        holder.stop()
        compactions = other.compactions
        time.sleep(RETENTION + 6 * INTERVAL)
        assert other.holding
        assert other.compactions > compactions
        assert _oldest_revision(writer) > oldest
    finally:
        stop.set()
        t.join(5)
        a.stop()
        b.stop()
        for s in stores:
            s.close()


def test_a_quiet_store_sees_no_write_from_compaction(own_etcd: EtcdServer) -> None:
    s = _store(own_etcd)
    c = Compactor(s, "/coil/", interval=INTERVAL, retention=0.5, identity="quiet")
    try:
        s.txn([], [Put("/coil/x", b"1")])
        c.start()
        time.sleep(4 * INTERVAL)
        assert c.holding
        settled = s.status().revision
        time.sleep(10 * INTERVAL)
        assert s.status().revision == settled
        # It compacted once the window passed, and not again since nothing changed.
        assert c.compactions == 1
    finally:
        c.stop()
        s.close()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="interval"):
        Compactor(None, "/coil/", interval=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("flag", ["--compaction-interval", "--compaction-retention"])
def test_allocator_refuses_a_bad_compaction_flag(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from coil_allocator.main import parse_args

    with pytest.raises(SystemExit):
        parse_args([flag, "soon"])
    assert f"{flag} 'soon': not a number of seconds" in capsys.readouterr().err
    assert getattr(parse_args([flag, "0"]), flag[2:].replace("-", "_")) == 0
