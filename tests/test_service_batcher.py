"""The batcher with a fake model: caps, grouping, deadlines, a full queue, failure isolation, order, clients that
leave, closing, a task that dies, nothing held once idle; and (Hypothesis) any interleaving of arrivals, model
progress, departures and deadlines answers every accepted request exactly once."""

from __future__ import annotations

import asyncio
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.batcher import Batcher
from service.errors import BatchFailed, DeadlineExceeded, NotReady, QueueFull, ServiceError
from service.settings import Settings


def limits(**overrides):
    """The service's defaults (from Settings, their one source) with ``overrides`` (queues as small as 1 allowed),
    one priority level unless the overrides set more."""
    return Settings(**{"max_texts": 1, "priority_levels": 1, "default_priority": 1} | overrides).batch_limits()


class FakeModel:
    """Records every batch it runs; answers each sentence with its own ids; can be held or made to fail."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[list[int]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on = fail_on

    def __call__(self, sequences: list[list[int]]) -> list:
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(sequences)
        if self.fail_on is not None and any(self.fail_on in s for s in sequences):
            raise RuntimeError("poisoned batch")
        return [tuple(s) for s in sequences]

    def ran(self) -> list[list[int]]:
        return [s for batch in self.batches for s in batch]


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


async def started(model: FakeModel, **limits) -> Batcher:
    batcher = Batcher(model, globals()["limits"](**limits))
    batcher.start()
    return batcher


async def hold_first_batch(batcher: Batcher, model: FakeModel) -> asyncio.Future:
    """Queue one sentence and keep the model busy with it, so what is queued next gathers."""
    model.gate.clear()
    model.entered.clear()
    job = batcher.submit([[999]])
    await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, 5)
    return job.future


def sentence(length: int, tag: int) -> list[int]:
    return [tag] + [1] * (length - 1)


def test_idle_runtime_dispatches_at_once_and_busy_runtime_gathers():
    async def scenario():
        model = FakeModel()
        batcher = await started(model)
        first = await hold_first_batch(batcher, model)
        jobs = [batcher.submit([sentence(5, i)]) for i in range(10)]
        model.gate.set()
        await asyncio.gather(first, *(j.future for j in jobs))
        await batcher.close()
        return model

    model = run(scenario())
    assert [len(b) for b in model.batches] == [1, 10]  # the first ran alone at once, the other ten together


def test_batch_size_cap():
    async def scenario():
        model = FakeModel()
        batcher = await started(model, max_batch_size=4)
        first = await hold_first_batch(batcher, model)
        jobs = [batcher.submit([sentence(5, i)]) for i in range(10)]
        model.gate.set()
        await asyncio.gather(first, *(j.future for j in jobs))
        await batcher.close()
        return model

    model = run(scenario())
    assert [len(b) for b in model.batches] == [1, 4, 4, 2]


def test_padded_token_cap():
    async def scenario():
        model = FakeModel()
        batcher = await started(model, max_batch_tokens=40, max_padding_ratio=100.0)
        first = await hold_first_batch(batcher, model)
        jobs = [batcher.submit([sentence(length, i)]) for i, length in enumerate([10, 3, 9, 10, 2, 8, 10, 7])]
        model.gate.set()
        await asyncio.gather(first, *(j.future for j in jobs))
        await batcher.close()
        return model

    model = run(scenario())
    assert sorted(len(s) for s in model.ran()) == sorted([1, 10, 3, 9, 10, 2, 8, 10, 7])
    for batch in model.batches:
        assert max(map(len, batch)) * len(batch) <= 40


def test_groups_similar_lengths_and_oldest_goes_first():
    async def scenario():
        model = FakeModel()
        batcher = await started(model, max_padding_ratio=1.3)
        first = await hold_first_batch(batcher, model)
        lengths = [30, 4, 31, 5, 29, 4, 30, 6, 5, 31]
        jobs = [batcher.submit([sentence(length, i)]) for i, length in enumerate(lengths)]
        model.gate.set()
        await asyncio.gather(first, *(j.future for j in jobs))
        await batcher.close()
        return model

    model = run(scenario())
    batches = model.batches[1:]
    assert batches[0][0][0] == 0  # the oldest queued sentence leads the next batch
    assert len(batches) == 2  # not one batch padded to 31 for everyone
    assert sorted(map(len, batches[0]))[-5:] == [29, 30, 30, 31, 31]
    assert max(map(len, batches[1])) <= 6
    for batch in batches:
        assert max(map(len, batch)) * len(batch) <= 1.3 * sum(map(len, batch))


def test_multi_text_request_answers_in_input_order():
    async def scenario():
        model = FakeModel()
        batcher = await started(model, max_batch_size=3)
        first = await hold_first_batch(batcher, model)
        texts = [sentence(length, 100 + i) for i, length in enumerate([20, 3, 19, 4, 21, 2, 3, 20])]
        other = batcher.submit([sentence(3, 7), sentence(20, 8)])
        job = batcher.submit(texts)
        model.gate.set()
        await first
        return texts, await job.future, await other.future, model

    texts, answers, other, model = run(scenario())
    assert answers == [tuple(t) for t in texts]
    assert other == [tuple(sentence(3, 7)), tuple(sentence(20, 8))]
    assert len(model.batches) > 3  # the request really was split across batches


def test_full_queue_refuses_whole_request_and_recovers():
    async def scenario():
        model = FakeModel()
        batcher = await started(model, max_queue_size=3)
        first = await hold_first_batch(batcher, model)
        batcher.submit([[1], [2]])
        with pytest.raises(QueueFull):
            batcher.submit([[3], [4]])  # would make 4: refused whole, nothing of it queued
        assert batcher.queue_depth == 2
        last = batcher.submit([[5]])
        model.gate.set()
        await first
        await last.future
        await batcher.close()
        return model

    model = run(scenario())
    assert [3] not in model.ran() and [4] not in model.ran()


def test_expired_requests_never_run():
    async def scenario():
        model = FakeModel()
        batcher = await started(model, request_timeout_s=0.2)
        first = await hold_first_batch(batcher, model)
        late = batcher.submit([[42], [43]])
        with pytest.raises(DeadlineExceeded):
            await late.future  # answered at the deadline although the model is still busy
        model.gate.set()
        with pytest.raises(DeadlineExceeded):
            await first  # the running batch outlived its deadline too: its answer is dropped
        after = batcher.submit([[44]])
        assert await after.future == [(44,)]
        await batcher.close()
        return model

    model = run(scenario())
    assert [42] not in model.ran() and [43] not in model.ran()


def test_failing_batch_fails_only_its_requests():
    async def scenario():
        model = FakeModel(fail_on=666)
        batcher = await started(model, max_padding_ratio=1.0)
        first = await hold_first_batch(batcher, model)
        poisoned = batcher.submit([sentence(2, 666)])
        bystander = batcher.submit([sentence(2, 5)])  # same length: same batch as the poison
        healthy = batcher.submit([sentence(9, 6)])  # other length: another batch
        model.gate.set()
        await first
        with pytest.raises(BatchFailed) as failed:
            await poisoned.future
        with pytest.raises(BatchFailed):
            await bystander.future
        assert await healthy.future == [tuple(sentence(9, 6))]
        again = batcher.submit([[7]])
        assert await again.future == [(7,)]  # the batcher is still serving
        await batcher.close()
        return failed.value

    error = run(scenario())
    assert len(error.error_id) == 16


def test_cancelled_and_disconnected_requests_never_run():
    async def scenario():
        model = FakeModel()
        batcher = await started(model)
        first = await hold_first_batch(batcher, model)
        cancelled = batcher.submit([[11], [12]])
        gone = batcher.submit([[13]])
        kept = batcher.submit([[14]])
        cancelled.future.cancel()  # what a client leaving does to its job (its awaiting task is cancelled)
        gone.future.cancel()
        model.gate.set()
        await first
        assert await kept.future == [(14,)]
        await batcher.close()
        return model

    model = run(scenario())
    assert not {11, 12, 13} & {s[0] for s in model.ran()}


def test_close_finishes_queued_work_then_refuses():
    async def scenario():
        model = FakeModel()
        batcher = await started(model, max_batch_size=2)
        first = await hold_first_batch(batcher, model)
        jobs = [batcher.submit([[i]]) for i in range(7)]
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.05)
        with pytest.raises(NotReady):
            batcher.submit([[100]])
        model.gate.set()
        await closing
        return [job.future.result() for job in jobs], await first

    answers, first = run(scenario())
    assert answers == [[(i,)] for i in range(7)] and first == [(999,)]


def test_the_highest_level_with_work_runs_first_and_keeps_its_length_groups():
    async def scenario():
        model = FakeModel()
        batcher = await started(model, priority_levels=3, default_priority=2, max_batch_size=2)
        first = await hold_first_batch(batcher, model)
        low = [batcher.submit([sentence(3, 30 + i)], priority=3) for i in range(2)]
        middle = batcher.submit([sentence(3, 20)])  # no priority: the default level, 2
        high = [batcher.submit([sentence(length, 10 + i)], priority=1) for i, length in enumerate((3, 9, 3))]
        model.gate.set()
        await first
        await asyncio.gather(*(job.future for job in [*low, middle, *high]))
        await batcher.close()
        return [[s[0] for s in batch] for batch in model.batches[1:]]

    batches = run(scenario())
    # level 1 first, its two length-3 sentences together; then its length-9 one (with a length-3 one it would pad
    # past max_padding_ratio); then level 2, then level 3
    assert batches[0] == [10, 12]
    assert batches[1][0] == 11 and [s for batch in batches for s in batch][3:] == [20, 30, 31]


def test_a_full_queue_refuses_the_lowest_level_first():
    async def scenario():
        model = FakeModel()
        # shares 1, 2/3, 1/3 of 6: the whole queue may reach 6, 4, 2 sentences and still admit level 1, 2, 3
        batcher = await started(model, priority_levels=3, default_priority=2, max_queue_size=6)
        first = await hold_first_batch(batcher, model)
        jobs = [batcher.submit([[1], [2]], priority=3)]
        with pytest.raises(QueueFull):
            batcher.submit([[3]], priority=3)
        jobs.append(batcher.submit([[4], [5]], priority=2))
        with pytest.raises(QueueFull):
            batcher.submit([[6]], priority=2)
        jobs.append(batcher.submit([[7], [8]], priority=1))
        with pytest.raises(QueueFull):
            batcher.submit([[9]], priority=1)
        model.gate.set()
        await first
        await asyncio.gather(*(job.future for job in jobs))
        await batcher.close()
        return model

    ran = run(scenario()).ran()
    assert all([tag] in ran for tag in (1, 2, 4, 5, 7, 8)) and not any([tag] in ran for tag in (3, 6, 9))


def test_the_starvation_guard_runs_the_oldest_sentence_of_any_level_every_nth_batch():
    async def scenario():
        model = FakeModel()
        batcher = await started(model, priority_levels=2, default_priority=2, max_batch_size=1, priority_fair_every=3)
        first = await hold_first_batch(batcher, model)  # batch 1
        low = batcher.submit([[50]], priority=2)
        high = [batcher.submit([[10 + i]], priority=1) for i in range(6)]
        model.gate.set()
        await first
        await asyncio.gather(low.future, *(job.future for job in high))
        await batcher.close()
        return [batch[0][0] for batch in model.batches[1:]]

    # batches 2 and 3 take level 1's oldest; batch 3 is the third: the oldest of any level, the low sentence
    assert run(scenario()) == [10, 50, 11, 12, 13, 14, 15]


def test_each_level_has_its_own_default_deadline():
    async def scenario():
        model = FakeModel()
        batcher = await started(model, priority_levels=2, default_priority=1, priority_timeouts_s="10,0.2")
        first = await hold_first_batch(batcher, model)
        patient, hurried = batcher.submit([[1]], priority=1), batcher.submit([[2]], priority=2)
        with pytest.raises(DeadlineExceeded):
            await hurried.future
        assert not patient.future.done()
        model.gate.set()
        await first
        await patient.future
        await batcher.close()
        return model

    ran = run(scenario()).ran()
    assert [1] in ran and [2] not in ran


def test_max_wait_lets_a_batch_fill():
    async def scenario():
        model = FakeModel()
        batcher = await started(model, max_wait_ms=150)
        jobs = [batcher.submit([[1]])]
        await asyncio.sleep(0.02)
        jobs += [batcher.submit([[2]]), batcher.submit([[3]])]
        await asyncio.gather(*(j.future for j in jobs))
        await batcher.close()
        return model

    model = run(scenario())
    assert [len(b) for b in model.batches] == [3]


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=5), min_size=1, max_size=30),
       st.tuples(st.integers(1, 16), st.integers(40, 400), st.floats(1.0, 3.0)))
def test_any_mix_runs_each_sentence_once_within_limits_oldest_first(lengths, limits):
    """Property: random requests and limits; each sentence runs once, answers keep order, every batch keeps
    its limits, and the oldest waiting sentence leads each batch."""
    size, tokens, ratio = limits

    async def scenario():
        model = FakeModel()
        batcher = await started(model, max_batch_size=size, max_batch_tokens=tokens, max_padding_ratio=ratio)
        first = await hold_first_batch(batcher, model)
        tag = iter(range(1_000, 1_000_000))
        sent = [[sentence(length, next(tag)) for length in request] for request in lengths]
        jobs = [batcher.submit(request) for request in sent]
        model.gate.set()
        await first
        answers = [await job.future for job in jobs]
        await batcher.close()
        return sent, answers, model.batches[1:]

    sent, answers, batches = run(scenario())
    assert answers == [[tuple(s) for s in request] for request in sent]
    order = [s[0] for request in sent for s in request]
    ran = [s[0] for batch in batches for s in batch]
    assert sorted(ran) == sorted(order)  # each sentence exactly once
    waiting = list(order)
    for batch in batches:
        assert batch[0][0] == waiting[0]  # the oldest waiting sentence leads every batch
        for s in batch:
            waiting.remove(s[0])
        padded = max(map(len, batch)) * len(batch)
        assert len(batch) <= size
        assert len(batch) == 1 or (padded <= tokens and padded <= ratio * sum(map(len, batch)) + 1e-9)


@pytest.mark.parametrize("max_batch_size, texts", [(1, 1), (64, 1), (64, 8), (1, 8)],
                         ids=["batching-off", "batching-on", "multi-text", "off-multi-text"])
def test_finished_work_is_not_held(max_batch_size, texts):
    """Regression: with max_batch_size=1 every served sentence stayed in its length bucket forever (a leak of
    about 4.6 kB per request). After any mix of work, an idle batcher holds no item and no job."""

    async def scenario():
        model = FakeModel()
        batcher = await started(model, max_batch_size=max_batch_size)
        for round_ in range(50):
            jobs = [batcher.submit([sentence(1 + (i * 7 + j) % 13, i) for j in range(texts)]) for i in range(40)]
            await asyncio.gather(*(job.future for job in jobs))
        await asyncio.sleep(0.2)  # one sweep of finished jobs
        held = batcher.held()
        await batcher.close()
        return held, len(model.ran())

    held, ran = run(scenario())
    assert ran == 50 * 40 * texts
    assert held == {"queued": 0, "fifo": 0, "new": 0, "buckets": 0, "jobs": 0}, held


def test_a_dying_batcher_task_answers_everyone_and_says_so():
    """If the owner task raises, every waiting request is answered at once (not at its deadline), new work is
    refused, and ``on_failure`` hears it (the service then reports unhealthy and exits non-zero)."""

    async def scenario():
        model = FakeModel()
        batcher = Batcher(model, limits())
        heard: list[BaseException] = []
        batcher.start(on_failure=heard.append)
        first = await hold_first_batch(batcher, model)
        waiting = batcher.submit([[5], [6]])

        def broken(now):
            raise RuntimeError("injected: the batcher's own code failed")

        batcher._take = broken
        model.gate.set()
        with pytest.raises(ServiceError) as failed:
            await asyncio.wait_for(waiting.future, 5)
        with pytest.raises(NotReady):
            batcher.submit([[7]])
        await batcher.close()
        return heard, failed.value, first

    heard, error, first = run(scenario())
    assert len(heard) == 1 and "injected" in str(heard[0])
    assert error.status == 500 and error.code == "internal_error"
    assert first.done()


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

    def observe_dispatch(self, waits, priorities) -> None:
        self.items += len(waits)

    def observe_batch(self, *args) -> None:
        pass

    def reject(self, reason: str, priority: int | None = None) -> None:
        pass


ACTIONS = st.lists(st.one_of(
    st.tuples(st.just("submit"), st.lists(st.integers(1, 30), min_size=1, max_size=6), st.integers(1, 3)),
    st.tuples(st.just("leave"), st.integers(0, 1000)),
    st.tuples(st.just("release"), st.integers(1, 3)),
    st.tuples(st.just("wait"), st.sampled_from([0.0, 0.01, 0.03])),
), min_size=1, max_size=40)


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(ACTIONS, st.integers(1, 8), st.integers(30, 200), st.integers(6, 40), st.sampled_from([0.02, 0.2, 30.0]),
       st.sampled_from([1, 3]))
def test_any_interleaving_answers_each_accepted_request_once(actions, max_size, max_tokens, queue, timeout, levels):
    """Also with three priority levels (each submit asks for one), their queue shares and the starvation guard."""
    async def scenario():
        model, dispatches = SteppedModel(), Dispatches()
        batcher = Batcher(model, limits(max_batch_size=max_size, max_batch_tokens=max_tokens, max_padding_ratio=10.0,
                                        max_queue_size=queue, request_timeout_s=timeout, priority_levels=levels,
                                        priority_fair_every=3), dispatches)
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

        for action, value, *priority in actions:
            if action == "submit":
                request = [[next(tags)] + [7] * (length - 1) for length in value]
                submitted = loop.time()  # before submit, which takes the deadline from its own reading
                try:
                    job = batcher.submit(request, priority=min(priority[0], levels))
                except QueueFull:
                    refused.append(request)
                    continue
                ended: list[float] = []
                job.future.add_done_callback(lambda _, ended=ended: ended.append(loop.time()))
                jobs.append((request, job, submitted, ended))
            elif action == "leave" and jobs:
                index = value % len(jobs)
                taken = await settle()
                job = jobs[index][1]
                if not job.future.done():
                    job.future.cancel()
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
        if job.future.cancelled():
            later = set(ran) - left_before[index]
            assert not set(own) & later, "a sentence ran after its client left"
            continue
        error = job.future.exception()
        if error is None:
            assert job.future.result() == [tuple(s) for s in request]  # its own answers, in input order
            assert all(tag in set(ran) for tag in own)
        else:
            assert isinstance(error, DeadlineExceeded), error
            assert ended[0] >= submitted + timeout - 1e-6, "answered 504 before its deadline"


def test_on_cuda_the_batching_knobs_not_set_take_the_gpu_defaults() -> None:
    from service.settings import CUDA_BATCH_DEFAULTS

    cpu, cuda = Settings().batch_limits(), Settings().batch_limits("CUDAExecutionProvider")
    assert (cpu.max_batch_size, cpu.max_batch_tokens) == (64, 4096)
    assert (cuda.max_batch_size, cuda.max_batch_tokens) == (CUDA_BATCH_DEFAULTS["max_batch_size"],
                                                           CUDA_BATCH_DEFAULTS["max_batch_tokens"])
    assert cuda.max_padding_ratio == cpu.max_padding_ratio and cuda.max_queue_size == cpu.max_queue_size
    chosen = Settings(max_batch_size=32).batch_limits("CUDAExecutionProvider")  # a knob set explicitly wins
    assert (chosen.max_batch_size, chosen.max_batch_tokens) == (32, CUDA_BATCH_DEFAULTS["max_batch_tokens"])
