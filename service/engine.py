"""The engine: one served model version behind one method. Routes call ``Engine.classify`` and nothing else of
the core; the engine owns the tokenizer, the batch queue and the onnxruntime session.

A request's sentences are encoded here, on the event loop (the batcher needs their token lengths to group
them), queued as one job, run in length-grouped batches on the model thread, and come back as one
``Classification`` from exactly this version. If the awaiting task is cancelled (the client left), the job's
future is cancelled with it and its sentences still queued never run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .batcher import Batcher, BatchLimits
from .metrics import Metrics, ModelMetrics
from .runtime import Runtime, Scores

log = logging.getLogger("service.engine")


@dataclass(frozen=True, slots=True)
class Classification:
    """One request's answer: every sentence's scores, in input order, from one model version."""

    model: str
    version: str
    labels: list[str]
    scores: list[Scores]
    truncated: list[bool]


class Engine:
    def __init__(self, name: str, runtime: Runtime, limits: BatchLimits, metrics: Metrics | None = None,
                 executor: ThreadPoolExecutor | None = None) -> None:
        artifact = runtime.artifact
        self.runtime = runtime
        self.manifest = artifact.manifest
        self.name, self.version, self.labels = name, artifact.version, artifact.labels
        self.metrics: ModelMetrics | None = (metrics.for_model(name, self.version, runtime.provider,
                                                               lambda: self.queue_depth) if metrics else None)
        self.batcher: Batcher[Scores] = Batcher(runtime.run, limits, self.metrics, executor)
        self.memory_bytes = 0  # how much the process grew while this version loaded (set by the repository)
        self._encode = artifact.encoder.encode

    @property
    def provider(self) -> str:
        return self.runtime.provider

    def start(self, on_failure: Callable[[BaseException], None] | None = None) -> None:
        """Start the batch queue (in the running event loop); ``on_failure`` hears if its task dies."""
        self.batcher.start(on_failure)

    async def warm_up(self) -> float:
        """Run a few batch shapes on the model thread; returns the milliseconds it took (raises if a run fails)."""
        started = time.perf_counter()
        await self.batcher.run_in_worker(self.runtime.warmup)
        return (time.perf_counter() - started) * 1000

    async def classify(self, texts: list[str], request_id: str | None = None,
                       timeout_s: float | None = None) -> Classification:
        """Every text's scores, in order, within ``timeout_s`` (at most the server's). Raises ``QueueFull``,
        ``NotReady`` (closing), ``DeadlineExceeded`` or ``BatchFailed`` (all ``ServiceError``); cancelling the
        caller drops what is still queued."""
        ids, truncated = self._encode(texts)
        job = self.batcher.submit(ids, request_id, timeout_s)
        scores = await job.future
        return Classification(self.name, self.version, self.labels, scores, truncated)

    @property
    def queue_depth(self) -> int:
        return self.batcher.queue_depth

    async def close(self, timeout_s: float) -> bool:
        """Refuse new work and let what is queued finish within ``timeout_s``; False if it did not."""
        try:
            await asyncio.wait_for(self.batcher.close(), timeout_s)
            return True
        except TimeoutError:
            return False
