"""Group commit: many concurrent requests share one allocator RPC (and so few etcd transactions).

A `GroupCommitter` runs one worker thread. `submit` queues an item and returns a Future; the worker
takes everything queued (up to `max_batch`), commits it with one call, and resolves each item's
Future with its own result, or every Future with the call's exception. While a commit is in flight
new items pile up, so the batch size grows with the load by itself and an idle agent commits a
lone request at once.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

_STOP = object()


class GroupCommitter(Generic[Item, Result]):
    """Commits queued items in batches with `commit(items) -> results` (same length and order)."""

    def __init__(
        self,
        name: str,
        commit: Callable[[Sequence[Item]], Sequence[Result]],
        max_batch: int = 128,
        observe_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._commit = commit
        self._max = max_batch
        self._observe = observe_batch or (lambda n: None)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Item) -> Future[Result]:
        future: Future[Result] = Future()
        self._queue.put((item, future))
        return future

    def stop(self) -> None:
        """Commit what is queued, then end the worker."""
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stopping = False
            while len(batch) < self._max:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                batch.append(nxt)
            self._flush(batch)  # type: ignore[arg-type]
            if stopping:
                return

    def _flush(self, batch: list[tuple[Item, Future[Result]]]) -> None:
        self._observe(len(batch))
        try:
            results = self._commit([item for item, _ in batch])
        except Exception as e:  # noqa: BLE001 - handed to every waiter
            for _, future in batch:
                future.set_exception(e)
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)
