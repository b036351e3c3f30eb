import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from alnet.infer.batcher import BatcherClosed, MicroBatcher


class SlowDouble:
    """A forward pass that takes `seconds` and doubles its input, recording each batch it saw."""

    def __init__(self, seconds: float = 0.05):
        self.seconds, self.batches = seconds, []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch[:, 0].tolist())
        time.sleep(self.seconds)
        return batch[:, 0] * 2


def test_requests_that_arrive_together_share_one_forward_pass_and_each_gets_its_own_answer():
    forward = SlowDouble()
    batcher = MicroBatcher(forward, max_batch=16, max_wait=0.05)
    try:
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda i: batcher(np.array([i]), timeout=10), range(12)))
    finally:
        batcher.close()
    assert answers == [2 * i for i in range(12)]
    assert len(forward.batches) < 12, "concurrent requests were batched"
    assert sorted(x for batch in forward.batches for x in batch) == list(range(12))


def test_a_batch_never_holds_more_than_max_batch_items():
    forward = SlowDouble(0.02)
    batcher = MicroBatcher(forward, max_batch=4, max_wait=0.05)
    try:
        futures = [batcher.submit(np.array([i])) for i in range(10)]  # queued faster than one pass runs
        assert [f.result(10) for f in futures] == [2 * i for i in range(10)]
    finally:
        batcher.close()
    assert max(len(b) for b in forward.batches) == 4 and sum(map(len, forward.batches)) == 10
    assert batcher.batch_sizes[4] >= 2


def test_a_lone_request_is_not_held_back_for_the_wait():
    batcher = MicroBatcher(SlowDouble(0.0), max_batch=16, max_wait=2.0)
    try:
        start = time.perf_counter()
        assert batcher(np.array([3]), timeout=10) == 6
        assert time.perf_counter() - start < 1.0, "nobody else announced a request: no reason to wait"
    finally:
        batcher.close()


def test_a_forming_batch_waits_for_an_announced_request_until_max_wait():
    forward = SlowDouble(0.0)
    batcher = MicroBatcher(forward, max_batch=16, max_wait=1.0)
    try:
        announced = threading.Event()

        def late():
            with batcher.incoming() as submit:
                announced.set()
                time.sleep(0.2)  # "decoding"
                return submit(np.array([2]))

        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(late)
            announced.wait(5)
            first = batcher.submit(np.array([1]))
            assert first.result(10) == 2 and second.result().result(10) == 4
    finally:
        batcher.close()
    assert forward.batches == [[1, 2]]


def test_an_exception_in_a_forward_pass_answers_every_waiting_request_and_the_next_batch_still_runs():
    calls = []

    def failing_once(batch):
        calls.append(len(batch))
        time.sleep(0.05)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return batch[:, 0]

    batcher = MicroBatcher(failing_once, max_batch=8, max_wait=0.05)
    try:
        futures = [batcher.submit(np.array([i])) for i in range(5)]
        for future in futures:
            with pytest.raises(RuntimeError, match="out of memory"):
                future.result(10)
        assert batcher(np.array([7]), timeout=10) == 7, "the worker survives a failed pass"
    finally:
        batcher.close()


def test_shutdown_answers_waiting_requests_and_refuses_new_ones():
    started, release = threading.Event(), threading.Event()

    def blocking(batch):
        started.set()
        release.wait(10)
        return batch[:, 0]

    batcher = MicroBatcher(blocking, max_batch=1, max_wait=0)
    running = batcher.submit(np.array([1]))
    started.wait(5)
    queued = batcher.submit(np.array([2]))
    closer = threading.Thread(target=batcher.close)
    closer.start()
    time.sleep(0.1)
    release.set()
    closer.join(10)
    assert running.result(10) == 1, "the pass under way finishes"
    with pytest.raises(BatcherClosed):
        queued.result(10)
    with pytest.raises(BatcherClosed):
        batcher.submit(np.array([3]))
    assert not batcher._worker.is_alive()
