"""The engine: one served model version behind one method. A route calls ``Engine.classify`` once per request and
gets a finished ``Answer``: every sentence's scores in order, from exactly this version, with the abstentions
decided, counted and the drift window fed. The engine owns the tokenizer, the batch queue, the onnxruntime session,
the thresholds and the drift window; nothing outside reaches into them.

With a response cache (``SCS_CACHE_MAX_BYTES``), each sentence is first looked up by its text (``service.cache``):
a hit is answered from the cache, skipping tokenization and the queue, and fed to the drift window here, on the event
loop. The other sentences of the request are queued as one job at the request's priority level, tokenized by the
batch queue's owner task (it needs their token lengths to group them) and run in length-grouped batches on the
model thread, which also feeds the drift window and packs their cache entries; the answers are merged back in input
order, all from this one version. If the awaiting task is cancelled (the client left), the job's future is
cancelled with it and its sentences still queued never run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import contract
import numpy as np

from . import memory
from .batcher import Batcher, BatchLimits
from .cache import ResponseCache
from .drift import DriftMonitor
from .errors import NotReady, no_threshold_for
from .logs import request_span
from .metrics import Metrics, ModelMetrics
from .runtime import Runtime, Scores

log = logging.getLogger("service.engine")
# (texts, their scores, abstained, the request's min_score and min_precision) of each answered request
ShadowHook = Callable[[list[str], list[Scores], list[bool] | None, float | None, float | None], None]


@dataclass(frozen=True, slots=True)
class Answer:
    """One request's answer: every sentence's scores in input order, from one model version. ``threshold``: the
    one that applied, if any; ``abstained`` per sentence (its top score under it), else None. A multi-label model
    (sigmoid per class) claims every label at or above the threshold, and abstains when none reaches it."""

    model: str
    version: str
    labels: list[str]
    scores: list[Scores]
    truncated: list[bool]
    abstained: list[bool] | None
    threshold: float | None = None
    multi_label: bool = False

    def chosen(self, index: int) -> list[int]:
        """A multi-label answer's labels for sentence ``index``: those at or above the threshold, most likely first."""
        scores, threshold = self.scores[index], self.threshold
        return [i for i in scores.ranked if scores.probabilities[i] >= threshold] if threshold is not None else []


class ModelTime:
    """Model-thread seconds, padded tokens and sentences per batch size (powers of two): what a shadow's latency
    ratio compares, per padded token at like batch sizes (an LSTM's run costs about longest x (a + b x count)).
    Fixed lists, written by the model thread only, read from the event loop."""

    def __init__(self) -> None:
        self.seconds = [0.0] * 16
        self.tokens = [0] * 16
        self.sentences = [0] * 16

    def add(self, sequences: list[list[int]], seconds: float) -> None:
        bucket = min(15, len(sequences).bit_length())
        self.seconds[bucket] += seconds
        self.tokens[bucket] += max(map(len, sequences)) * len(sequences)
        self.sentences[bucket] += len(sequences)


class Engine:
    def __init__(self, name: str, runtime: Runtime, limits: BatchLimits, metrics: Metrics | None = None,
                 executor: ThreadPoolExecutor | None = None, drift_window: int = 1000,
                 drift_alert_psi: float = 0.25, tracing=None, default_min_score: float | None = None,
                 cache_max_bytes: int = 0) -> None:
        artifact = runtime.artifact
        self.runtime = runtime
        self.manifest = artifact.manifest
        self.name, self.version, self.labels = name, artifact.version, artifact.labels
        self.folder = artifact.folder.name
        # What the manifest says about confidence, checked before any metrics series exists (a refused version
        # must leave none behind): (precision, min_score) pairs reached on validation (model_export/calibration.py),
        # the threshold a request without one gets (SCS_MIN_SCORE, else the model's own out-of-scope one), the
        # drift reference.
        self.thresholds = contract.selective_thresholds(self.manifest)
        self.default_min_score = (default_min_score if default_min_score is not None
                                  else contract.default_threshold(self.manifest))
        self.multi_label = self.manifest.activation == "sigmoid"
        self.kind = self.manifest.model_kind
        self.drift = DriftMonitor(self.manifest, drift_window, drift_alert_psi) if self.manifest.drift else None
        self.metrics: ModelMetrics | None = (metrics.for_model(name, self.version, runtime.provider,
                                                               lambda: self.queue_depth) if metrics else None)
        if self.drift is not None and self.metrics is not None:
            self.metrics.watch_drift(self.drift)
        # The response cache, or None (off); the batcher's results are (Scores, cache entry) pairs when it is on.
        self.cache = (ResponseCache(cache_max_bytes, self.manifest.num_classes, artifact.encoder.cache_key,
                                    self.metrics) if cache_max_bytes > 0 else None)
        self.batcher: Batcher = Batcher(self._run, limits, self.metrics, executor,
                                        tracing.batch(runtime.provider) if tracing is not None else None,
                                        artifact.encoder.encode)
        if self.metrics is not None:
            self.metrics.watch_levels(self.batcher.levels)
            if self.cache is not None:
                self.metrics.watch_cache(self.cache)
        self.memory_bytes = 0  # the heap this version's load allocated and holds (set by the repository)
        self.model_time = ModelTime()
        # On the CPU the model thread's own CPU time: with one intra-op thread the run's whole cost, without the waits
        # for the GIL or the core that a busy event loop adds (they swamp a small batch's time); on a GPU, wall time.
        self._clock = time.perf_counter if runtime.provider == "CUDAExecutionProvider" else time.thread_time
        # Set while a candidate shadows this version (service.rollout): hears every answered request.
        self.shadow: ShadowHook | None = None

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

    async def classify(self, texts: list[str], min_score: float | None = None, min_precision: float | None = None,
                       timeout_s: float | None = None, request_id: str | None = None, priority: int | None = None,
                       cached: bool = True) -> Answer:
        """Every text's scores, in order, within ``timeout_s`` (at most the server's; default: its priority level's),
        with the abstentions decided by ``min_score``, or the threshold that reached ``min_precision`` on validation,
        or the default. ``priority``: the queue's level (1 the highest; None: the default level); ``cached``: False
        bypasses the response cache (nothing read, nothing stored). Raises ``ServiceError``: 422
        ``min_precision_unavailable``, ``QueueFull``, ``NotReady`` (closing), ``DeadlineExceeded`` or
        ``BatchFailed``; cancelling the caller drops what is still queued."""
        threshold = self.threshold(min_score, min_precision)
        span = request_span.get()
        if span is not None:
            span.set_attributes({"scs.model": self.name, "scs.model.version": self.version,
                                 "scs.sentences": len(texts)})
        if self.cache is not None and cached:
            scores, truncated = await self._through_cache(self.cache, texts, request_id, timeout_s, span, priority)
        else:
            job = self.batcher.submit(texts, request_id, timeout_s, span, priority)
            scores, truncated = await job.future, job.truncated
            if self.cache is not None:  # bypassed: the batch's (Scores, entry) pairs, nothing stored
                scores = [score for score, _ in scores]
        abstained = None
        if threshold is not None:
            abstained = [s.probabilities[s.ranked[0]] < threshold for s in scores]
            if self.metrics is not None and any(abstained):
                self.metrics.abstain(sum(abstained))
        if self.shadow is not None:
            self.shadow(texts, scores, abstained, min_score, min_precision)
        return Answer(self.name, self.version, self.labels, scores, truncated, abstained, threshold,
                      self.multi_label)

    async def _through_cache(self, cache: ResponseCache, texts: list[str], request_id: str | None,
                             timeout_s: float | None, span, priority: int | None) -> tuple[list[Scores], list[bool]]:
        """The hits from the cache, the misses from the model (then stored), merged in input order."""
        key, get, put = cache.key, cache.get, cache.put
        keys = [key(text) for text in texts]
        entries = [get(k) for k in keys]
        missing = [index for index, entry in enumerate(entries) if entry is None]
        if self.metrics is not None:
            self.metrics.cache_lookups(len(texts) - len(missing), len(missing))
        if len(missing) == len(texts):  # nothing cached: the request as it came (the all-distinct case)
            job = self.batcher.submit(texts, request_id, timeout_s, span, priority)
            results, truncated = await job.future, job.truncated
            for k, (_, entry), cut in zip(keys, results, truncated):
                put(k, entry, cut)
            return [score for score, _ in results], truncated
        scores: list = [None] * len(texts)
        truncated = [False] * len(texts)
        if missing:
            job = self.batcher.submit([texts[index] for index in missing], request_id, timeout_s, span, priority)
            for index, (score, entry), cut in zip(missing, await job.future, job.truncated):
                scores[index], truncated[index] = score, cut
                put(keys[index], entry, cut)
        elif self.batcher.closing:
            raise NotReady(draining=True)
        rows = []
        for index, entry in enumerate(entries):
            if entry is not None:
                scores[index] = score = cache.scores(entry)
                truncated[index] = cache.truncated(entry)
                rows.append(cache.bins(entry, score.ranked[0]))
        if self.drift is not None:
            self.drift.observe(rows)
        return scores, truncated

    def _run(self, sequences: list[list[int]]) -> list:
        """One batch on the model thread, which also feeds the drift window and, with the cache on, packs each
        sentence's cache entry (after the run, off the event loop): a list of ``Scores``, or of (``Scores``, entry)
        pairs with the cache on."""
        started = self._clock()
        scores = self.runtime.run(sequences)
        self.model_time.add(sequences, self._clock() - started)
        bins = None
        if self.drift is not None:
            classes = [s.ranked[0] for s in scores]
            bins = self.drift.bins(sequences, classes, [s.probabilities[c] for s, c in zip(scores, classes)])
            self.drift.observe(bins)
        if self.cache is not None:  # float32 -> Python float -> float32 is exact: the entry holds the model's bits
            probabilities = np.array([s.probabilities for s in scores], np.float32)
            ranked = np.array([s.ranked for s in scores])
            return list(zip(scores, self.cache.pack(probabilities, ranked, bins)))
        return scores

    def threshold(self, min_score: float | None, min_precision: float | None) -> float | None:
        """The abstention threshold a request asks for: its ``min_score``, else the score that reached
        ``min_precision`` on validation (the nearest stored precision at or above it), else the default
        (SCS_MIN_SCORE, else the model's own out-of-scope threshold), else none."""
        if min_score is not None:
            return min_score
        if min_precision is None:
            return self.default_min_score
        for precision, score in self.thresholds:
            if precision >= min_precision - 1e-9:
                return score
        raise no_threshold_for(min_precision, [precision for precision, _ in self.thresholds])

    def describe(self) -> dict:
        """This version in ``GET /v1/models``."""
        cache = self.cache
        return {"version": self.version, "state": "ready", "provider": self.provider, "kind": self.kind,
                "multi_label": self.multi_label, "memory_bytes": self.memory_bytes, "queue_depth": self.queue_depth,
                "cache": None if cache is None else {"entries": len(cache), "bytes": cache.bytes,
                                                     "max_bytes": cache.max_bytes}}

    def summary(self) -> dict:
        """This version in ``GET /v1/model``: its manifest's summary, labels, files, provider and batching limits."""
        manifest = self.manifest.model_dump(mode="json")
        keep = ("version", "created_at", "model_kind", "activation", "num_classes", "max_length", "vocab_size",
                "opset", "metrics", "dataset", "verification", "versions")
        return {"model": {key: manifest[key] for key in keep if key in manifest} | {
                    "name": self.name, "labels": self.labels, "folder": self.folder,
                    "files": {name: entry["sha256"] for name, entry in manifest["files"].items()}},
                "provider": self.provider, "batching": asdict(self.batcher.limits)}

    def drift_report(self) -> dict | None:
        """The drift window against the training data (``GET /v1/models/{name}/drift``); None without a reference."""
        if self.drift is None:
            return None
        return {"model": self.name, "version": self.version} | self.drift.report()

    @property
    def queue_depth(self) -> int:
        return self.batcher.queue_depth

    def release(self) -> None:
        """After ``close``: free the session, the tokenizer and the response cache, and hand the freed pages back to
        the system."""
        self.runtime.close()
        self.batcher.release()
        if self.cache is not None:
            self.cache.clear()
        memory.trim()

    async def close(self, timeout_s: float) -> bool:
        """Refuse new work and let what is queued finish within ``timeout_s``; False if it did not."""
        try:
            await asyncio.wait_for(self.batcher.close(), timeout_s)
            return True
        except TimeoutError:
            return False
