"""Dynamic micro-batching: single images sent from many threads share one forward pass.

A worker thread takes whatever is waiting (up to `max_batch` items) and runs the model once on the stacked
batch. It waits up to `max_wait` seconds for more only while callers have announced items that are still being
prepared (`incoming()`, e.g. a picture being decoded): a lone request is never held back, and under load the
requests that queue up during one forward pass form the next batch. An exception in a forward pass is the
answer of every request of that batch; after `close()` new items are refused and waiting ones are answered
with `BatcherClosed`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import contextmanager

import numpy as np


class BatcherClosed(RuntimeError):
    """The batcher was closed before this item could run."""


class MicroBatcher:
    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], max_batch: int = 16, max_wait: float = 0.005):
        if max_batch < 1 or max_wait < 0:
            raise ValueError("max_batch must be at least 1 and max_wait at least 0")
        self.forward, self.max_batch, self.max_wait = forward, max_batch, max_wait
        self.batch_sizes: Counter[int] = Counter()  # forward passes by batch size (bounded: max_batch keys)
        self._pending: list[tuple[np.ndarray, Future]] = []
        self._incoming = 0
        self._closed = False
        self._changed = threading.Condition()
        self._worker = threading.Thread(target=self._loop, name="alnet-batcher", daemon=True)
        self._worker.start()

    @contextmanager
    def incoming(self):
        """Announce an item on its way (being decoded): a batch being formed may wait for it.

        Yields the `submit` to send it with; the announcement ends when it is sent or the block is left."""
        with self._changed:
            self._incoming += 1
        announced = [True]

        def submit(item: np.ndarray) -> Future:
            announced[0] = False
            return self.submit(item, announced=True)

        try:
            yield submit
        finally:
            if announced[0]:
                with self._changed:
                    self._incoming -= 1
                    self._changed.notify_all()

    def submit(self, item: np.ndarray, announced: bool = False) -> Future:
        """Queue one item; the future resolves to its row of the forward pass's output."""
        future: Future = Future()
        with self._changed:  # queued and no longer announced in one step: a forming batch never waits for it
            self._incoming -= announced
            self._changed.notify_all()
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            self._pending.append((item, future))
        return future

    def __call__(self, item: np.ndarray, timeout: float | None = None):
        return self.submit(item).result(timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Refuse new items, let the forward pass under way finish, answer the rest with BatcherClosed."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._worker.join(timeout)

    def _next_batch(self) -> list[tuple[np.ndarray, Future]] | None:
        with self._changed:
            while not self._pending and not self._closed:
                self._changed.wait()
            if self._closed:
                left, self._pending = self._pending, []
                for _, future in left:
                    if future.set_running_or_notify_cancel():
                        future.set_exception(BatcherClosed("the service is shutting down"))
                return None
            deadline = time.monotonic() + self.max_wait
            while len(self._pending) < self.max_batch and self._incoming > 0 and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
            if live:
                self._run(live)

    def _run(self, batch: list[tuple[np.ndarray, Future]]) -> None:
        self.batch_sizes[len(batch)] += 1
        try:
            outputs = self.forward(np.stack([item for item, _ in batch]))
            if len(outputs) != len(batch):
                raise RuntimeError(f"the forward pass returned {len(outputs)} rows for a batch of {len(batch)}")
        except BaseException as err:  # every waiting caller hears of it; the worker goes on
            for _, future in batch:
                future.set_exception(err)
            return
        for (_, future), output in zip(batch, outputs):
            future.set_result(output)
