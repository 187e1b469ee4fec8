"""Dynamic batching: one asyncio task owns the queue and turns many queued sentences into few model runs.

Rules (docs/architecture.md, "Batching"): when the runtime is idle, whatever is queued runs at once (no idle wait); while a
batch runs, the next one gathers. A batch starts from the oldest queued sentence of the highest priority level
that has work and fills with that level's queued sentences nearest its length, then (room left) with the lower
levels' nearest ones, while it stays within ``max_batch_size`` sentences, ``max_batch_tokens`` padded tokens
(longest x count) and ``max_padding_ratio`` padded/real tokens. Starvation guard: one batch in every
``priority_fair_every`` starts from the oldest queued sentence of any level instead. Each level admits a request
only while the whole queue stays within that level's share of ``max_queue_size``, so a full queue refuses the
lowest level first; each level has its own default deadline. The model runs in a worker thread. A request whose
deadline passed, whose client left (its future cancelled) or whose other sentences failed is never run. A failing
run fails only the requests in that batch.

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
    # a batch leaves the queue: each sentence's wait and priority level
    def observe_dispatch(self, waits: Sequence[float], priorities: Sequence[int]) -> None: ...
    def observe_batch(self, size: int, real_tokens: int, padded_tokens: int, seconds: float) -> None: ...
    def reject(self, reason: str, priority: int | None = None) -> None: ...  # priority: the request's level


Encode = Callable[[list], tuple[list[list[int]], list[bool]]]  # texts -> (token ids, cut to the model's length)


def as_ids(sequences: list) -> tuple[list[list[int]], list[bool]]:
    """The encoder of a batcher that is handed token ids already."""
    return sequences, [False] * len(sequences)


class Job(Generic[R]):
    """One request: its sentences resolve ``future`` together, in input order, and ``truncated`` says which were cut
    once tokenized. Cancelling the future (the client left) drops its sentences still queued."""

    __slots__ = ("future", "results", "remaining", "deadline", "timeout_s", "request_id", "span", "queued_at",
                 "truncated", "level")

    def __init__(self, future: asyncio.Future, count: int, now: float, timeout_s: float,
                 request_id: str | None, span: object | None = None, level: Level | None = None) -> None:
        self.future = future
        self.level = level  # its priority level's queue
        self.results: list[R | None] = [None] * count
        self.remaining = count
        self.deadline, self.timeout_s = now + timeout_s, timeout_s
        self.request_id = request_id
        self.span = span  # the request's sampled trace span, or None
        # time.monotonic() when traced: the loop's clock is only millisecond-exact under uvloop
        self.queued_at = time.monotonic() if span is not None else 0.0
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


class Level:
    """One priority level's queue: its items in arrival order (the oldest live one is found here) and by token
    length, how many are queued and not yet taken, the admission bound (the whole queue's size at most), the
    default deadline, and the jobs with that deadline (arrival order is deadline order)."""

    __slots__ = ("priority", "fifo", "buckets", "size", "bound", "timeout_s", "jobs")

    def __init__(self, priority: int, bound: int, timeout_s: float) -> None:
        self.priority, self.bound, self.timeout_s = priority, bound, timeout_s
        self.fifo: deque[Item] = deque()
        self.buckets: dict[int, deque[Item]] = {}  # length -> items of that length, arrival order
        self.size = 0
        self.jobs: deque[Job] = deque()


@dataclass(frozen=True, kw_only=True)
class BatchLimits:
    """The batching knobs; the settings of the same names are their one source (``Settings.batch_limits``).
    Priority levels are numbered from 1, the highest; ``priority_queue_shares`` and ``priority_timeouts_s`` hold one
    value per level (the share of ``max_queue_size`` the whole queue may reach and still admit that level, and its
    default deadline); empty: every level the whole queue and ``request_timeout_s``."""

    max_batch_size: int
    max_batch_tokens: int
    max_padding_ratio: float
    max_wait_ms: float
    max_queue_size: int
    request_timeout_s: float
    priority_levels: int = 1
    default_priority: int = 1
    priority_queue_shares: tuple[float, ...] = ()
    priority_timeouts_s: tuple[float, ...] = ()
    priority_fair_every: int = 0  # 0: no starvation guard
    min_queue_bound: int = 1  # no level's bound is below this (SCS_MAX_TEXTS: a whole request fits an empty queue)

    def levels(self) -> list[Level]:
        shares = self.priority_queue_shares or (1.0,) * self.priority_levels
        timeouts = self.priority_timeouts_s or (self.request_timeout_s,) * self.priority_levels
        return [Level(number, max(self.min_queue_bound, int(share * self.max_queue_size)), timeout)
                for number, share, timeout in zip(range(1, self.priority_levels + 1), shares, timeouts)]


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
        self.levels = limits.levels()  # highest priority first
        self._new: list[Item] = []  # queued since the last tokenization, not yet in a length bucket
        # Every job until it is answered, for its deadline: those with their level's default timeout in arrival order
        # (which is deadline order) in their level's ``jobs``, any other in a heap by deadline.
        self._early: list[tuple[float, int, Job[R]]] = []
        self._count = 0  # ties in the heap break by arrival
        self._size = 0  # queued items not yet taken (some may belong to finished jobs until discarded)
        self._batches = 0  # batches taken: every priority_fair_every-th starts from the oldest of any level
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None
        self.running = 0  # sentences in the batch now in the model

    @property
    def queue_depth(self) -> int:
        return self._size

    @property
    def closing(self) -> bool:
        return self._closing

    def held(self) -> dict[str, int]:
        """What the batcher's own structures hold now (an idle batcher must hold nothing): for leak checks."""
        levels = self.levels
        return {"queued": self._size, "fifo": sum(len(level.fifo) for level in levels), "new": len(self._new),
                "buckets": sum(sum(map(len, level.buckets.values())) for level in levels),
                "jobs": sum(len(level.jobs) for level in levels) + len(self._early)}

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
        for job in [*(job for level in self.levels for job in level.jobs), *(job for _, _, job in self._early)]:
            job.fail(failure)
        if on_failure is not None:
            on_failure(error)

    def submit(self, texts: list, request_id: str | None = None, timeout_s: float | None = None,
               span: object | None = None, priority: int | None = None) -> Job[R]:
        """Queue every sentence of one request, or none of them (``QueueFull``, or ``NotReady`` when closing).
        ``priority``: its level (1 the highest; None: the default level); it is admitted while the whole queue stays
        within its level's bound. Its deadline is ``timeout_s`` from now (at most the limits' ``request_timeout_s``),
        else its level's default; ``span``: its trace span, when sampled."""
        if self._closing:
            raise NotReady(draining=True)
        level = self.levels[(priority or self.limits.default_priority) - 1]
        if self._size + len(texts) > level.bound:
            if self._metrics:
                self._metrics.reject("queue_full", level.priority)
            raise QueueFull()
        loop = asyncio.get_running_loop()
        now = loop.time()
        timeout = level.timeout_s if timeout_s is None else min(timeout_s, self.limits.request_timeout_s)
        job: Job[R] = Job(loop.create_future(), len(texts), now, timeout, request_id, span, level)
        if timeout != level.timeout_s:
            self._count += 1
            heapq.heappush(self._early, (job.deadline, self._count, job))
        else:
            level.jobs.append(job)
        fifo, new = level.fifo, self._new
        for index, text in enumerate(texts):
            item = Item(job, index, text, now)
            fifo.append(item)
            new.append(item)
        self._size += len(texts)
        level.size += len(texts)
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
                # Nothing live is queued, so whatever the fifos and the buckets still hold was taken or discarded.
                for level in self.levels:
                    level.fifo.clear()
                    level.buckets.clear()
                self._new.clear()
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
        """Tokenize what arrived since the last batch, in one call, and file each sentence by its level and length."""
        new, self._new = self._new, []
        if not new:
            return
        ids, truncated = self._encode([item.ids for item in new])
        for item, sequence, cut in zip(new, ids, truncated):
            job = item.job
            item.ids = sequence
            item.length = length = len(sequence)
            job.truncated[item.index] = cut
            buckets = job.level.buckets
            bucket = buckets.get(length)
            if bucket is None:
                bucket = buckets[length] = deque()
            bucket.append(item)

    async def _let_fill(self, loop: asyncio.AbstractEventLoop) -> None:
        """Optional: wait up to max_wait_ms after the oldest item's arrival for a fuller batch."""
        while self._size < self.limits.max_batch_size and not self._closing:
            oldest = self._first(loop.time(), fair=True)
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

    def _oldest(self, level: Level, now: float) -> Item | None:
        """The level's oldest item still worth running; discards finished, expired and taken ones on the way."""
        fifo = level.fifo
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

    def _first(self, now: float, fair: bool) -> Item | None:
        """The sentence a batch starts from: the oldest of the highest level that has work or, ``fair``, the oldest
        of any level."""
        first = None
        for level in self.levels:
            if level.size:
                item = self._oldest(level, now)
                if item is not None and (first is None or item.enqueued < first.enqueued):
                    first = item
                    if not fair:
                        break
        return first

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
        item.job.level.size -= 1

    def _expire(self, job: Job) -> None:
        if not job.future.done():
            job.future.set_exception(DeadlineExceeded(job.timeout_s))
            if self._metrics:
                self._metrics.reject("deadline_exceeded", job.level.priority)

    def _take(self, now: float) -> list[Item]:
        """The first item (``_first``), then the nearest lengths of its level, then of the other levels (highest
        first), within the size, token and padding limits."""
        every = self.limits.priority_fair_every
        self._batches += 1
        first = self._first(now, fair=every > 0 and self._batches % every == 0)
        if first is None:
            return []
        level = first.job.level
        self._discard(first)
        # The oldest live item is also the oldest live one of its length: what precedes it there is taken or
        # discarded. Take it out of its bucket now, or a batch that never visits the bucket leaves it there.
        bucket = level.buckets[first.length]
        while bucket.popleft() is not first:
            pass
        if not bucket:
            del level.buckets[first.length]
        batch = [first]
        longest = real = first.length
        longest, real = self._fill(level, batch, first.length, longest, real, now)
        for other in self.levels:
            if len(batch) >= self.limits.max_batch_size:
                break
            if other is not level and other.size:
                longest, real = self._fill(other, batch, first.length, longest, real, now)
        return batch

    def _fill(self, level: Level, batch: list[Item], anchor: int, longest: int, real: int,
              now: float) -> tuple[int, int]:
        """Add ``level``'s items nearest ``anchor`` in length to ``batch`` while the limits allow; the batch's new
        longest length and real tokens."""
        limits, buckets = self.limits, level.buckets
        # Nearest lengths first: the same length, then one shorter, one longer, two shorter, ...
        # A side stops once its next length breaks a limit; farther lengths on that side only do worse.
        shorter_open, longer_open = True, True
        distance = 0
        max_distance = max(max(buckets, default=0) - anchor, anchor - 1)
        while len(batch) < limits.max_batch_size and (shorter_open or longer_open) and distance <= max_distance:
            for length in ((anchor,) if distance == 0 else (anchor - distance, anchor + distance)):
                is_longer = length > anchor
                if (is_longer and not longer_open) or (not is_longer and distance and not shorter_open) or length < 1:
                    continue
                bucket = buckets.get(length)
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
                        else:  # the anchor's own length no longer fits: nothing else of this level will
                            shorter_open = longer_open = False
                        break
                    bucket.popleft()
                    self._discard(item)
                    batch.append(item)
                    longest, real = new_longest, real + length
                if bucket is not None and not bucket:
                    del buckets[length]
            distance += 1
        return longest, real

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[Item]) -> None:
        started = loop.time()
        if self._metrics:
            self._metrics.observe_dispatch([started - item.enqueued for item in batch],
                                           [item.job.level.priority for item in batch])
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
        early = self._early
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            for level in self.levels:
                jobs = level.jobs
                while jobs and (jobs[0].future.done() or jobs[0].deadline <= now):
                    self._expire(jobs.popleft())
            while early and (early[0][2].future.done() or early[0][0] <= now):
                self._expire(heapq.heappop(early)[2])
