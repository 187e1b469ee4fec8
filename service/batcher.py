"""Dynamic batching: one asyncio task owns the queue and turns many queued sentences into few model runs.

Rules (docs/architecture.md, "Batching"): when the runtime is idle, whatever is queued runs at once (no idle wait); while a
batch runs, the next one gathers. A batch starts from the oldest queued sentence (so nothing starves) and
fills with the queued sentences nearest its length, while it stays within ``max_batch_size`` sentences,
``max_batch_tokens`` padded tokens (longest x count) and ``max_padding_ratio`` padded/real tokens. The
model runs in a worker thread. A request whose deadline passed, whose client left (its future cancelled) or
whose other sentences failed is never run. A failing run fails only the requests in that batch.

Texts are queued as they come and tokenized by the owner task, all that arrived since its last batch in one call,
just before it groups them: one tokenizer call per batch rather than per request, whose tables stay in cache
(README, "Hot path").
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from .errors import BatchFailed, DeadlineExceeded, NotReady, QueueFull, internal_error, new_error_id

log = logging.getLogger("service.batcher")

R = TypeVar("R")  # what the model gives back per sentence
T = TypeVar("T")


class BatchTrace(Protocol):
    def ran(self, batch: list[Item], started: float, ended: float, padded_tokens: int, real_tokens: int,
            failed: bool) -> None: ...  # a batch ran, times by time.monotonic() (tracing: service/tracing.py)


class BatchMetrics(Protocol):
    def observe_dispatch(self, waits: Sequence[float]) -> None: ...  # a batch leaves the queue: each one's wait
    def observe_batch(self, size: int, real_tokens: int, padded_tokens: int, seconds: float) -> None: ...
    def reject(self, reason: str) -> None: ...


Encode = Callable[[list], tuple[list[list[int]], list[bool]]]  # texts -> (token ids, cut to the model's length)


def as_ids(sequences: list) -> tuple[list[list[int]], list[bool]]:
    """The encoder of a batcher that is handed token ids already."""
    return sequences, [False] * len(sequences)


class Job(Generic[R]):
    """One request: its sentences resolve ``future`` together, in input order, and ``ids`` and ``truncated`` hold
    their tokens once tokenized. Cancelling the future (the client left) drops its sentences still queued."""

    __slots__ = ("future", "results", "remaining", "deadline", "timeout_s", "request_id", "span", "queued_at", "ids",
                 "truncated")

    def __init__(self, future: asyncio.Future, count: int, now: float, timeout_s: float,
                 request_id: str | None, span: object | None = None) -> None:
        self.future = future
        self.results: list[R | None] = [None] * count
        self.remaining = count
        self.deadline, self.timeout_s = now + timeout_s, timeout_s
        self.request_id = request_id
        self.span = span  # the request's sampled trace span, or None
        # time.monotonic() when traced: the loop's clock is only millisecond-exact under uvloop
        self.queued_at = time.monotonic() if span is not None else 0.0
        self.ids: list[list[int]] = [[]] * count
        self.truncated: list[bool] = [False] * count

    def fail(self, error: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(error)



class Item:
    """One queued sentence: its text until the owner task tokenizes it, then its token ids."""

    __slots__ = ("job", "index", "ids", "length", "enqueued", "taken")

    def __init__(self, job: Job, index: int, text: object, enqueued: float) -> None:
        self.job, self.index, self.ids, self.length = job, index, text, 0
        self.enqueued = enqueued
        self.taken = False


@dataclass(frozen=True, kw_only=True)
class BatchLimits:
    """The batching knobs; the settings of the same names are their one source (``Settings.batch_limits``)."""

    max_batch_size: int
    max_batch_tokens: int
    max_padding_ratio: float
    max_wait_ms: float
    max_queue_size: int
    request_timeout_s: float


class Batcher(Generic[R]):
    def __init__(self, run: Callable[[list[list[int]]], Sequence[R]], limits: BatchLimits,
                 metrics: BatchMetrics | None = None, executor: ThreadPoolExecutor | None = None,
                 trace: BatchTrace | None = None, encode: Encode = as_ids) -> None:
        self._run_model = run
        self._encode = encode
        self.limits = limits
        self._metrics = metrics
        self._trace = trace
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="model")
        self._own_executor = executor is None
        self._fifo: deque[Item] = deque()  # arrival order: the oldest live item is found here
        self._new: list[Item] = []  # queued since the last tokenization, not yet in a length bucket
        self._buckets: dict[int, deque[Item]] = {}  # length -> items of that length, arrival order
        # Every job until it is answered, for its deadline: those with the server's timeout in arrival order (which is
        # deadline order), those that asked for less in a heap by deadline.
        self._jobs: deque[Job[R]] = deque()
        self._early: list[tuple[float, int, Job[R]]] = []
        self._count = 0  # ties in the heap break by arrival
        self._size = 0  # queued items not yet taken (some may belong to finished jobs until discarded)
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None
        self.running = 0  # sentences in the batch now in the model

    @property
    def queue_depth(self) -> int:
        return self._size

    def held(self) -> dict[str, int]:
        """What the batcher's own structures hold now (an idle batcher must hold nothing): for leak checks."""
        return {"queued": self._size, "fifo": len(self._fifo), "new": len(self._new),
                "buckets": sum(map(len, self._buckets.values())),
                "jobs": len(self._jobs) + len(self._early)}

    def start(self, on_failure: Callable[[BaseException], None] | None = None) -> None:
        """Start the owner task (and the deadline sweeper); ``on_failure`` hears if either dies."""
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._loop(), name="batcher")
        self._sweeper = loop.create_task(self._sweep(), name="batcher-deadlines")
        for task in (self._task, self._sweeper):
            task.add_done_callback(lambda done: self._ended(done, on_failure))

    def _ended(self, task: asyncio.Task, on_failure: Callable[[BaseException], None] | None) -> None:
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        log.critical("batcher task %s died", task.get_name(), exc_info=error)
        self._closing = True  # nothing new is accepted; everything waiting is answered now rather than at 504
        failure = internal_error(new_error_id())
        for job in [*self._jobs, *(job for _, _, job in self._early)]:
            job.fail(failure)
        if on_failure is not None:
            on_failure(error)

    def submit(self, texts: list, request_id: str | None = None, timeout_s: float | None = None,
               span: object | None = None) -> Job[R]:
        """Queue every sentence of one request, or none of them (``QueueFull``, or ``NotReady`` when closing).
        Its deadline is ``timeout_s`` from now, at most the limits' ``request_timeout_s``; ``span``: its trace
        span, when sampled."""
        if self._closing:
            raise NotReady(draining=True)
        if self._size + len(texts) > self.limits.max_queue_size:
            if self._metrics:
                self._metrics.reject("queue_full")
            raise QueueFull()
        loop = asyncio.get_running_loop()
        now = loop.time()
        timeout = self.limits.request_timeout_s if timeout_s is None else min(timeout_s, self.limits.request_timeout_s)
        job: Job[R] = Job(loop.create_future(), len(texts), now, timeout, request_id, span)
        if timeout < self.limits.request_timeout_s:
            self._count += 1
            heapq.heappush(self._early, (job.deadline, self._count, job))
        else:
            self._jobs.append(job)
        fifo, new = self._fifo, self._new
        for index, text in enumerate(texts):
            item = Item(job, index, text, now)
            fifo.append(item)
            new.append(item)
        self._size += len(texts)
        self._wakeup.set()
        return job

    def release(self) -> None:
        """A retired queue lets go of its tokenizer (with the session, the bulk of a version's memory)."""
        self._encode = as_ids

    async def run_in_worker(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the model's worker thread (warm-up), in line with the batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    async def close(self) -> None:
        """Refuse new work, let queued and running work finish, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)  # a task that died was reported as it died
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._own_executor:
            self._executor.shutdown(wait=True)

    # --- the owner task -------------------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._size == 0:
                # Nothing live is queued, so whatever the fifo and the buckets still hold was taken or discarded.
                self._fifo.clear()
                self._new.clear()
                self._buckets.clear()
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.limits.max_wait_ms > 0:
                await self._let_fill(loop)
            self._tokenize()
            batch = self._take(loop.time())
            if batch:
                await self._execute(loop, batch)

    def _tokenize(self) -> None:
        """Tokenize what arrived since the last batch, in one call, and file each sentence by its length."""
        new, self._new = self._new, []
        if not new:
            return
        ids, truncated = self._encode([item.ids for item in new])
        buckets = self._buckets
        for item, sequence, cut in zip(new, ids, truncated):
            item.ids = item.job.ids[item.index] = sequence
            item.length = length = len(sequence)
            item.job.truncated[item.index] = cut
            bucket = buckets.get(length)
            if bucket is None:
                bucket = buckets[length] = deque()
            bucket.append(item)

    async def _let_fill(self, loop: asyncio.AbstractEventLoop) -> None:
        """Optional: wait up to max_wait_ms after the oldest item's arrival for a fuller batch."""
        while self._size < self.limits.max_batch_size and not self._closing:
            oldest = self._oldest(loop.time())
            if oldest is None:
                return
            left = oldest.enqueued + self.limits.max_wait_ms / 1000 - loop.time()
            if left <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except TimeoutError:
                return

    def _oldest(self, now: float) -> Item | None:
        """The oldest item still worth running; discards finished, expired and taken ones on the way."""
        fifo = self._fifo
        while fifo:
            item = fifo[0]
            if item.taken:
                fifo.popleft()
            elif not self._alive(item, now):
                fifo.popleft()
                self._discard(item)
            else:
                return item
        return None

    def _alive(self, item: Item, now: float) -> bool:
        job = item.job
        if job.future.done():
            return False
        if job.deadline <= now:
            self._expire(job)
            return False
        return True

    def _discard(self, item: Item) -> None:
        item.taken = True
        self._size -= 1

    def _expire(self, job: Job) -> None:
        if not job.future.done():
            job.future.set_exception(DeadlineExceeded(job.timeout_s))
            if self._metrics:
                self._metrics.reject("deadline_exceeded")

    def _take(self, now: float) -> list[Item]:
        """Oldest item first, then the nearest lengths, within the size, token and padding limits."""
        first = self._oldest(now)
        if first is None:
            return []
        limits = self.limits
        batch = [first]
        first.taken = True
        self._size -= 1
        # The oldest live item is also the oldest live one of its length: what precedes it there is taken or
        # discarded. Take it out of its bucket now, or a batch that never visits the bucket leaves it there.
        bucket = self._buckets[first.length]
        while bucket.popleft() is not first:
            pass
        if not bucket:
            del self._buckets[first.length]
        longest = first.length
        real = first.length
        # Nearest lengths first: the same length, then one shorter, one longer, two shorter, ...
        # A side stops once its next length breaks a limit; farther lengths on that side only do worse.
        shorter_open, longer_open = True, True
        distance = 0
        max_distance = max(max(self._buckets, default=0) - first.length, first.length - 1)
        while len(batch) < limits.max_batch_size and (shorter_open or longer_open) and distance <= max_distance:
            for length in ((first.length,) if distance == 0 else (first.length - distance, first.length + distance)):
                is_longer = length > first.length
                if (is_longer and not longer_open) or (not is_longer and distance and not shorter_open) or length < 1:
                    continue
                bucket = self._buckets.get(length)
                while bucket and len(batch) < limits.max_batch_size:
                    item = bucket[0]
                    if item.taken:
                        bucket.popleft()
                        continue
                    if not self._alive(item, now):
                        bucket.popleft()
                        self._discard(item)
                        continue
                    new_longest = max(longest, length)
                    padded = new_longest * (len(batch) + 1)
                    if padded > limits.max_batch_tokens or padded > limits.max_padding_ratio * (real + length):
                        if is_longer:
                            longer_open = False
                        elif distance:
                            shorter_open = False
                        break
                    bucket.popleft()
                    item.taken = True
                    self._size -= 1
                    batch.append(item)
                    longest, real = new_longest, real + length
                if bucket is not None and not bucket:
                    del self._buckets[length]
            distance += 1
        return batch

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[Item]) -> None:
        started = loop.time()
        if self._metrics:
            self._metrics.observe_dispatch([started - item.enqueued for item in batch])
        self.running = len(batch)
        run_started = time.monotonic()
        try:
            outputs = await loop.run_in_executor(self._executor, self._run_model, [item.ids for item in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"model returned {len(outputs)} results for {len(batch)} sentences")
        except Exception:
            error_id = new_error_id()
            request_ids = sorted({item.job.request_id for item in batch if item.job.request_id})
            log.exception("model run failed", extra={"fields": {"error_id": error_id, "batch_size": len(batch),
                                                                 "request_ids": request_ids}})
            failure = BatchFailed(error_id)
            for item in batch:
                item.job.fail(failure)
            if self._metrics:
                self._metrics.reject("model_error")
            if self._trace is not None:
                self._traced(batch, run_started, time.monotonic(), failed=True)
            return
        finally:
            self.running = 0
        if self._trace is not None:
            self._traced(batch, run_started, time.monotonic(), failed=False)
        if self._metrics:
            lengths = [item.length for item in batch]
            self._metrics.observe_batch(len(batch), sum(lengths), max(lengths) * len(batch), loop.time() - started)
        for item, output in zip(batch, outputs):
            job = item.job
            if job.future.done():
                continue
            job.results[item.index] = output
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(job.results)

    def _traced(self, batch: list[Item], started: float, ended: float, failed: bool) -> None:
        lengths = [item.length for item in batch]
        try:
            self._trace.ran(batch, started, ended, max(lengths) * len(batch), sum(lengths), failed)
        except Exception:  # tracing must never fail a request or the owner task
            log.exception("tracing a batch failed")

    async def _sweep(self) -> None:
        """Answer 504 at the deadline even while a long batch runs; forget finished jobs."""
        loop = asyncio.get_running_loop()
        period = min(0.05, self.limits.request_timeout_s / 4)
        jobs, early = self._jobs, self._early
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            while jobs and (jobs[0].future.done() or jobs[0].deadline <= now):
                self._expire(jobs.popleft())
            while early and (early[0][2].future.done() or early[0][0] <= now):
                self._expire(heapq.heappop(early)[2])
