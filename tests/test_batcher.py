"""coild's group commit (coild.batcher): every item gets its own result exactly once, commits never
overlap, batches grow under load, and a failed commit reaches every item of its batch."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from coild.batcher import GroupCommitter


class Recorder:
    """A commit function that records its batches and checks that calls never overlap."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.fail_on = fail_on
        self._active = 0
        self._lock = threading.Lock()
        self.overlaps = 0

    def __call__(self, items: Sequence[int]) -> list[str]:
        with self._lock:
            self._active += 1
            if self._active > 1:
                self.overlaps += 1
            self.batches.append(list(items))
        try:
            time.sleep(self.delay)
            if self.fail_on is not None and self.fail_on in items:
                raise ValueError(f"commit of {list(items)} failed")
            return [f"done {i}" for i in items]
        finally:
            with self._lock:
                self._active -= 1


def _run_clients(committer: GroupCommitter[int, str], clients: int, per_client: int) -> dict:
    outcomes: dict[int, object] = {}
    lock = threading.Lock()

    def client(c: int) -> None:
        for k in range(per_client):
            item = c * per_client + k
            try:
                outcome: object = committer.submit(item).result()
            except ValueError as e:
                outcome = e
            with lock:
                assert item not in outcomes
                outcomes[item] = outcome

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a client never got its result"
    return outcomes


def test_a_lone_request_is_committed_at_once() -> None:
    committer: GroupCommitter[int, int] = GroupCommitter("t", lambda items: [i * 2 for i in items])
    assert committer.submit(21).result() == 42
    committer.stop()


@pytest.mark.parametrize("clients", [1, 8, 64])
def test_every_item_gets_its_own_result_and_commits_never_overlap(clients: int) -> None:
    recorder = Recorder(delay=0.002)
    sizes: list[int] = []
    committer: GroupCommitter[int, str] = GroupCommitter("t", recorder, 16, sizes.append)
    outcomes = _run_clients(committer, clients, 20)
    assert outcomes == {i: f"done {i}" for i in range(clients * 20)}
    committed = [i for batch in recorder.batches for i in batch]
    assert sorted(committed) == list(range(clients * 20))  # each item exactly once
    assert recorder.overlaps == 0
    assert max(len(b) for b in recorder.batches) <= 16
    assert sizes == [len(b) for b in recorder.batches]
    if clients == 64:  # while one commit runs, the others pile up into the next batch
        assert len(recorder.batches) < clients * 20 / 4


def test_a_failed_commit_reaches_each_item_of_its_batch_and_no_other() -> None:
    recorder = Recorder(delay=0.001, fail_on=77)
    committer: GroupCommitter[int, str] = GroupCommitter("t", recorder)
    outcomes = _run_clients(committer, 16, 10)
    failed_batch = next(b for b in recorder.batches if 77 in b)
    for item, outcome in outcomes.items():
        if item in failed_batch:
            assert isinstance(outcome, ValueError)
        else:
            assert outcome == f"done {item}"


def test_items_submitted_together_are_committed_together() -> None:
    """A dual-stack pod submits both families before waiting: one commit carries both."""
    started, go_on = threading.Event(), threading.Event()
    batches: list[list[int]] = []

    def commit(items: Sequence[int]) -> list[str]:
        batches.append(list(items))
        started.set()
        go_on.wait(10)
        return [f"done {i}" for i in items]

    committer: GroupCommitter[int, str] = GroupCommitter("t", commit)
    first = committer.submit(0)
    assert started.wait(10)  # a commit is in flight while the pod submits both families
    tickets = [committer.submit(4), committer.submit(6)]
    go_on.set()
    assert [t.result() for t in tickets] == ["done 4", "done 6"]
    assert first.result() == "done 0"
    assert batches == [[0], [4, 6]]
    committer.stop()
