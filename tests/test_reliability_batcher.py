"""Hypothesis: any interleaving of arrivals, sizes, model progress, client departures and deadlines.

tests/test_service_batcher.py checks one burst queued behind a held model; here requests also arrive while
batches run, clients leave at any moment, deadlines pass, the queue fills and the model is released one
batch at a time. Whatever the order, every accepted request ends exactly once (its own answers in input
order, or 504, or gone), a request refused at the door leaves no trace, no batch breaks its caps, no
sentence runs twice, and nothing that left before its sentences were taken ever reaches the model.
"""

from __future__ import annotations

import asyncio
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.batcher import Batcher, BatchLimits, DeadlineExceeded, Disconnected, QueueFull


class SteppedModel:
    """Runs one batch per permit; records what entered and when, so the test knows what was taken."""

    def __init__(self) -> None:
        self.permits = threading.Semaphore(0)
        self.lock = threading.Lock()
        self.batches: list[list[int]] = []  # tags (first id) per batch, in entry order

    def __call__(self, sequences: list[list[int]]) -> list:
        with self.lock:
            self.batches.append([s[0] for s in sequences])
        self.permits.acquire(timeout=20)
        return [tuple(s) for s in sequences]

    def entered(self) -> int:
        with self.lock:
            return sum(map(len, self.batches))


class Dispatches:
    """BatchMetrics: counts sentences handed to the model (called before each run starts)."""

    def __init__(self) -> None:
        self.items = 0

    def observe_queue_wait(self, seconds: float) -> None:
        self.items += 1

    def observe_batch(self, *args) -> None:
        pass

    def reject(self, reason: str) -> None:
        pass


ACTIONS = st.lists(st.one_of(
    st.tuples(st.just("submit"), st.lists(st.integers(1, 30), min_size=1, max_size=6)),
    st.tuples(st.just("leave"), st.integers(0, 1000)),
    st.tuples(st.just("release"), st.integers(1, 3)),
    st.tuples(st.just("wait"), st.sampled_from([0.0, 0.01, 0.03])),
), min_size=1, max_size=40)


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(ACTIONS, st.integers(1, 8), st.integers(30, 200), st.integers(6, 40), st.sampled_from([0.02, 0.2, 30.0]))
def test_any_interleaving_answers_each_accepted_request_once(actions, max_size, max_tokens, queue, timeout):
    async def scenario():
        model, dispatches = SteppedModel(), Dispatches()
        limits = BatchLimits(max_batch_size=max_size, max_batch_tokens=max_tokens, max_padding_ratio=10.0,
                             max_queue_size=queue, timeout_s=timeout)
        batcher = Batcher(model, limits, dispatches)
        batcher.start()
        loop = asyncio.get_running_loop()
        tags = iter(range(1_000, 10**9))
        jobs, refused, left_before = [], [], {}  # left_before: job index -> tags taken when it left

        async def settle() -> set[int]:
            """Wait until every dispatched sentence has entered the model; the tags taken so far."""
            for _ in range(2000):
                await asyncio.sleep(0)
                if model.entered() == dispatches.items:
                    break
                await asyncio.sleep(0.001)
            with model.lock:
                return {t for batch in model.batches for t in batch}

        for action, value in actions:
            if action == "submit":
                request = [[next(tags)] + [7] * (length - 1) for length in value]
                try:
                    job = batcher.submit(request)
                except QueueFull:
                    refused.append(request)
                    continue
                ended: list[float] = []
                job.future.add_done_callback(lambda _, ended=ended: ended.append(loop.time()))
                jobs.append((request, job, loop.time(), ended))
            elif action == "leave" and jobs:
                index = value % len(jobs)
                taken = await settle()
                job = jobs[index][1]
                if not job.future.done():
                    job.fail(Disconnected())
                    left_before[index] = taken
            elif action == "release":
                for _ in range(value):
                    model.permits.release()
            elif action == "wait":
                await asyncio.sleep(value)
            await asyncio.sleep(0)
        for _ in range(10_000):  # let everything finish
            model.permits.release()
        await asyncio.wait_for(batcher.close(), 20)
        return model.batches, jobs, refused, left_before

    batches, jobs, refused, left_before = asyncio.run(scenario())
    ran = [tag for batch in batches for tag in batch]
    assert len(ran) == len(set(ran)), "a sentence ran twice"
    assert all(0 < len(batch) <= max_size for batch in batches)
    refused_tags = {s[0] for request in refused for s in request}
    assert not refused_tags & set(ran), "a refused request reached the model"
    for index, (request, job, submitted, ended) in enumerate(jobs):
        assert job.future.done(), "an accepted request was never answered"
        own = [s[0] for s in request]
        error = job.future.exception()
        if error is None:
            assert job.future.result() == [tuple(s) for s in request]  # its own answers, in input order
            assert all(tag in set(ran) for tag in own)
        elif isinstance(error, Disconnected):
            later = set(ran) - left_before[index]
            assert not set(own) & later, "a sentence ran after its client left"
        else:
            assert isinstance(error, DeadlineExceeded), error
            assert ended[0] >= submitted + timeout - 1e-6, "answered 504 before its deadline"
