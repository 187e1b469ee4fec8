"""The engine: one served model version behind one method. Routes call ``Engine.classify`` (and, for abstention,
``min_score`` and ``abstained``) and nothing else of the core; the engine owns the tokenizer, the batch queue, the
onnxruntime session and the drift window.

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

import contract

from . import memory
from .batcher import Batcher, BatchLimits
from .drift import DriftMonitor
from .logs import request_span
from .metrics import Metrics, ModelMetrics
from .errors import no_threshold_for
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


def fraction(value, where: str) -> float | None:
    """A manifest threshold: None, or a number in [0, 1]; else the version is refused naming the field."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise contract.ArtifactError(f"manifest.json: {where} must be a number in [0, 1], got {value!r}")
    return float(value)


def thresholds(manifest: contract.Manifest) -> list[tuple[float, float]]:
    """The manifest's (precision, min_score) pairs, by precision; rows no threshold reached are left out."""
    rows = manifest.selective.get("thresholds", []) if isinstance(manifest.selective, dict) else None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise contract.ArtifactError("manifest.json: selective.thresholds must be a list of objects")
    pairs = [(fraction(row.get("precision"), "selective.thresholds[].precision"),
              fraction(row.get("min_score"), "selective.thresholds[].min_score")) for row in rows]
    return sorted((p, score) for p, score in pairs if p is not None and score is not None)


class Engine:
    def __init__(self, name: str, runtime: Runtime, limits: BatchLimits, metrics: Metrics | None = None,
                 executor: ThreadPoolExecutor | None = None, drift_window: int = 1000,
                 drift_alert_psi: float = 0.25, tracing=None) -> None:
        artifact = runtime.artifact
        self.runtime = runtime
        self.manifest = artifact.manifest
        self.name, self.version, self.labels = name, artifact.version, artifact.labels
        # What the manifest says about confidence, checked before any metrics series exists (a refused version
        # must leave none behind): (precision, min_score) pairs reached on validation (model_export/calibration.py),
        # the out-of-scope threshold this model abstains below unless told otherwise, the drift reference.
        self.thresholds = thresholds(self.manifest)
        self.open_set_min_score = fraction(self.manifest.open_set.get("min_score"), "open_set.min_score")
        self.drift = DriftMonitor(self.manifest, drift_window, drift_alert_psi) if self.manifest.drift else None
        self.metrics: ModelMetrics | None = (metrics.for_model(name, self.version, runtime.provider,
                                                               lambda: self.queue_depth) if metrics else None)
        if self.drift is not None and self.metrics is not None:
            self.metrics.watch_drift(self.drift)
        self.batcher: Batcher[Scores] = Batcher(runtime.run, limits, self.metrics, executor,
                                                tracing.batch(runtime.provider) if tracing is not None else None)
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
        span = request_span.get()
        if span is not None:
            span.set_attributes({"scs.model": self.name, "scs.model.version": self.version,
                                 "scs.sentences": len(texts)})
        job = self.batcher.submit(ids, request_id, timeout_s, span)
        scores = await job.future
        if self.drift is not None:
            tops = [s.ranked[0] for s in scores]
            self.drift.observe(ids, tops, [s.probabilities[top] for s, top in zip(scores, tops)])
        return Classification(self.name, self.version, self.labels, scores, truncated)

    def min_score(self, min_score: float | None, min_precision: float | None, default: float | None) -> float | None:
        """The abstention threshold a request asks for: its ``min_score``, else the score that reached
        ``min_precision`` on validation (the nearest stored precision at or above it), else ``default``
        (SCS_MIN_SCORE), else the model's own out-of-scope threshold."""
        if min_score is not None:
            return min_score
        if min_precision is None:
            return default if default is not None else self.open_set_min_score
        for precision, score in self.thresholds:
            if precision >= min_precision - 1e-9:
                return score
        raise no_threshold_for(min_precision, [precision for precision, _ in self.thresholds])

    def abstained(self, count: int) -> None:
        if count and self.metrics is not None:
            self.metrics.abstain(count)

    @property
    def queue_depth(self) -> int:
        return self.batcher.queue_depth

    def release(self) -> None:
        """After ``close``: free the session and the tokenizer, and hand the freed pages back to the system."""
        self.runtime.close()
        self._encode = None
        memory.trim()

    async def close(self, timeout_s: float) -> bool:
        """Refuse new work and let what is queued finish within ``timeout_s``; False if it did not."""
        try:
            await asyncio.wait_for(self.batcher.close(), timeout_s)
            return True
        except TimeoutError:
            return False
