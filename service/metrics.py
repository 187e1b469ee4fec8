"""Prometheus metrics (names follow Triton's and Prometheus' conventions), in a registry per app.

Model-side series carry ``model`` and ``version`` labels. Each engine gets a ``ModelMetrics`` with its label
children bound once, so the hot path does no label lookups; unloading a version removes its series.

With several workers (``PROMETHEUS_MULTIPROC_DIR`` set by the supervisor) values live in prometheus-client's
shared files and ``/metrics`` sums every worker's; the gauges read from a function at scrape time in one process
are then refreshed twice a second instead (``refresh``), and a retired version's gauges drop to 0 (the client
cannot remove series in that mode).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
RATIO_BUCKETS = (1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 2.0, 3.0, 5.0)
MODEL = ["model", "version"]


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # the *_created series only add noise to every scrape
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self.exposition = r  # what /metrics renders
        if self.multiprocess:
            self.exposition = CollectorRegistry()
            MultiProcessCollector(self.exposition)
        self._functions: list[tuple[Gauge, Callable[[], float]]] = []
        # protocol: "http" (status: the HTTP status) or "grpc" (endpoint: /service/method, status: the code's name)
        self.requests = Counter("scs_requests_total", "requests by protocol, endpoint and status",
                                ["protocol", "endpoint", "status"], registry=r)
        self.latency = Histogram("scs_request_duration_seconds", "request latency", ["protocol", "endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("scs_requests_in_flight", "requests being handled", ["protocol"], registry=r,
                               multiprocess_mode="livesum")
        self.rejections = Counter("scs_rejections_total", "requests refused or dropped, by reason (model and version "
                                  "empty when refused before one was chosen)", ["reason", *MODEL], registry=r)
        self.queue_wait = Histogram("scs_queue_wait_seconds", "time a sentence waited in the queue before its run",
                                    MODEL, buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("scs_batch_size_sentences", "sentences per model run", MODEL, buckets=SIZE_BUCKETS,
                                    registry=r)
        self.batch_tokens = Histogram("scs_batch_padded_tokens", "padded tokens (longest x count) per model run",
                                      MODEL, buckets=TOKEN_BUCKETS, registry=r)
        self.padding_ratio = Histogram("scs_batch_padding_ratio", "padded / real tokens per model run", MODEL,
                                       buckets=RATIO_BUCKETS, registry=r)
        self.real_tokens = Counter("scs_real_tokens", "real tokens run through the model", MODEL, registry=r)
        self.padded_tokens = Counter("scs_padded_tokens", "padded tokens run through the model", MODEL, registry=r)
        self.run_time = Histogram("scs_model_run_seconds", "model run time per batch (worker thread)", MODEL,
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("scs_queue_depth", "sentences waiting in the batch queue", MODEL, registry=r,
                                 multiprocess_mode="livesum")
        # Priority levels (1 the highest): the same three views per level
        self.level_depth = Gauge("scs_priority_queue_depth", "sentences waiting in the batch queue, per priority level",
                                 [*MODEL, "priority"], registry=r, multiprocess_mode="livesum")
        self.level_wait = Histogram("scs_priority_queue_wait_seconds", "time a sentence waited in the queue before "
                                    "its run, per priority level", [*MODEL, "priority"], buckets=LATENCY_BUCKETS,
                                    registry=r)
        self.level_rejections = Counter("scs_priority_rejections_total", "requests refused (queue_full) or dropped "
                                        "(deadline_exceeded) by the batch queue, per priority level",
                                        [*MODEL, "priority", "reason"], registry=r)
        self.model_info = Gauge("scs_model_info", "a model version being served, and its provider",
                                ["name", "version", "provider"], registry=r, multiprocess_mode="livemax")
        self.model_memory = Gauge("scs_model_memory_bytes", "resident memory the processes grew by while loading "
                                  "this version (approximate)", MODEL, registry=r, multiprocess_mode="livesum")
        self.abstentions = Counter("scs_abstentions", "predictions answered without a class (score under the "
                                   "request's threshold)", MODEL, registry=r)
        self.drift_psi = Gauge("scs_drift_psi", "population stability index of the recent traffic against the "
                               "training data, per drift signal", [*MODEL, "signal"], registry=r,
                               multiprocess_mode="livemax")
        # The response cache (service/cache.py), per model version and process
        self.cache_hits = Counter("scs_cache_hits", "sentences answered from the response cache", MODEL, registry=r)
        self.cache_misses = Counter("scs_cache_misses", "sentences looked up in the response cache and not found "
                                    "(answered by the model, then stored)", MODEL, registry=r)
        self.cache_evictions = Counter("scs_cache_evictions", "response cache entries evicted to stay within "
                                       "SCS_CACHE_MAX_BYTES", MODEL, registry=r)
        self.cache_bytes = Gauge("scs_cache_bytes", "bytes the response cache holds (its entries as charged against "
                                 "SCS_CACHE_MAX_BYTES; with workers, summed over them)", MODEL, registry=r,
                                 multiprocess_mode="livesum")
        self.cache_entries = Gauge("scs_cache_entries", "entries the response cache holds", MODEL, registry=r,
                                   multiprocess_mode="livesum")
        self.load_failures = Counter("scs_model_load_failures_total", "versions refused at load (checks failed)",
                                     MODEL, registry=r)
        self.worker_replacements = Counter("scs_worker_replacements_total", "workers started in place of one that "
                                           "died, by how it died (SIGKILL, exit_3, ...)", ["cause"], registry=r)
        self.trace_spans = Counter("scs_trace_spans_total", "trace spans by outcome: exported, failed (the collector "
                                   "refused or was unreachable) or dropped (the export queue was full)", ["outcome"],
                                   registry=r)
        for outcome in ("exported", "failed", "dropped"):  # shown at 0 from the start, tracing on or off
            self.trace_spans.labels(outcome)
        self.traces_skipped = Counter("scs_traces_skipped_total", "requests not traced because the span export was "
                                      "backed up (queue full, or the collector failing)", registry=r)
        # Rollouts (service/rollout.py): version is the candidate's; gauges read the evaluation at scrape time.
        self.shadow_sentences = Counter("scs_shadow_sentences_total", "live sentences copied to a candidate in "
                                        "shadow, by outcome: compared, or shed (dropped under load, expired)",
                                        [*MODEL, "outcome"], registry=r)
        self.shadow_agreement = Gauge("scs_shadow_agreement", "share of compared sentences on which the candidate's "
                                      "most likely class is the live version's", MODEL, registry=r,
                                      multiprocess_mode="livemax")
        self.shadow_shift = Gauge("scs_shadow_probability_shift", "largest absolute change of any class's "
                                  "probability per compared sentence: mean and p99", [*MODEL, "stat"], registry=r,
                                  multiprocess_mode="livemax")
        self.shadow_abstention = Gauge("scs_shadow_abstention_rate", "abstention rate over the compared sentences, "
                                       "of the live version and of the candidate", [*MODEL, "side"], registry=r,
                                       multiprocess_mode="livemax")
        self.shadow_latency_ratio = Gauge("scs_shadow_latency_ratio", "candidate's model time over the live "
                                          "version's for as many padded tokens, in batches of like size", MODEL, registry=r,
                                          multiprocess_mode="livemax")
        self.rollout_decisions = Counter("scs_rollout_decisions_total", "candidates decided, by decision: promoted, "
                                         "canary (the gate passed, on to the canary), refused, aborted",
                                         [*MODEL, "decision"], registry=r)
        self.canary_requests = Counter("scs_canary_requests_total", "requests without a version answered during a "
                                       "canary split, per version", MODEL, registry=r)
        self._request_children: dict[tuple[str, str, int | str], tuple[Counter, Histogram]] = {}
        self._reject_children: dict[tuple[str, str, str], Counter] = {}

    def bind(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """``gauge`` shows ``read()``: at scrape time (no cost on the hot path), or, with several workers, as of
        the last ``refresh``."""
        if self.multiprocess:  # the newest reader replaces the gauge's last one, as set_function does
            self._functions = [(g, old) for g, old in self._functions if g is not gauge] + [(gauge, read)]
        else:
            gauge.set_function(read)

    def unbind(self, gauge: Gauge) -> None:
        self._functions = [(g, read) for g, read in self._functions if g is not gauge]

    def refresh(self) -> None:
        for gauge, read in self._functions:
            gauge.set(read())

    def observe_request(self, endpoint: str, status: int | str, seconds: float, trace_id: str | None = None,
                        protocol: str = "http") -> None:
        """One answered request (``status``: an HTTP status, or a gRPC code's name); ``trace_id`` (a sampled
        request's) becomes its latency bucket's exemplar, shown in the OpenMetrics exposition (one process only:
        prometheus-client keeps none across workers)."""
        key = (protocol, endpoint, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (self.requests.labels(protocol, endpoint, str(status)),
                                                      self.latency.labels(protocol, endpoint))
        children[0].inc()
        if trace_id is None:
            children[1].observe(seconds)
        else:
            children[1].observe(seconds, {"trace_id": trace_id})

    def worker_replaced(self, cause: str) -> None:
        self.worker_replacements.labels(cause).inc()

    def reject(self, reason: str, model: str = "", version: str = "") -> None:
        key = (reason, model, version)
        child = self._reject_children.get(key)
        if child is None:
            child = self._reject_children[key] = self.rejections.labels(reason, model, version)
        child.inc()

    def for_model(self, model: str, version: str, provider: str, queue_depth: Callable[[], float]) -> ModelMetrics:
        self.model_info.labels(model, version, provider).set(1)
        self.bind(self.queue_depth.labels(model, version), queue_depth)
        return ModelMetrics(self, model, version, provider)


class ModelMetrics:
    """One model version's series, children bound once (the batcher's ``BatchMetrics``)."""

    def __init__(self, metrics: Metrics, model: str, version: str, provider: str) -> None:
        self.metrics, self.model, self.version, self.provider = metrics, model, version, provider
        self._wait = metrics.queue_wait.labels(model, version).observe
        self._size = metrics.batch_size.labels(model, version).observe
        self._tokens = metrics.batch_tokens.labels(model, version).observe
        self._ratio = metrics.padding_ratio.labels(model, version).observe
        self._real = metrics.real_tokens.labels(model, version).inc
        self._padded = metrics.padded_tokens.labels(model, version).inc
        self._run = metrics.run_time.labels(model, version).observe
        self.abstain = metrics.abstentions.labels(model, version).inc
        self._drift: dict[str, Gauge] = {}  # signal -> its scs_drift_psi child (watch_drift)
        self._levels: list = []  # priority level (1 first) -> (its wait's observe, its depth gauge) (watch_levels)
        self._level_rejects: dict[tuple[int, str], Callable[[], None]] = {}  # (level, reason) -> its counter's inc
        self._cache_gauges: list[Gauge] = []  # the response cache's bytes and entries (watch_cache)

    def watch_cache(self, cache) -> None:
        """The response cache's series: hits, misses and evictions counted as they happen, its bytes and entries read
        at scrape time."""
        m, labels = self.metrics, (self.model, self.version)
        self._hit = m.cache_hits.labels(*labels).inc
        self._miss = m.cache_misses.labels(*labels).inc
        self.cache_evicted = m.cache_evictions.labels(*labels).inc
        self._cache_gauges = [m.cache_bytes.labels(*labels), m.cache_entries.labels(*labels)]
        m.bind(self._cache_gauges[0], lambda: cache.bytes)
        m.bind(self._cache_gauges[1], lambda: len(cache))

    def cache_lookups(self, hits: int, misses: int) -> None:
        if hits:
            self._hit(hits)
        if misses:
            self._miss(misses)

    def watch_levels(self, levels) -> None:
        """Per priority level (the batcher's ``Level`` objects): its queue depth (read at scrape time), wait and
        rejections, each shown from the start."""
        m, labels = self.metrics, (self.model, self.version)
        for level in levels:
            priority = str(level.priority)
            depth = m.level_depth.labels(*labels, priority)
            m.bind(depth, lambda level=level: level.size)
            self._levels.append((m.level_wait.labels(*labels, priority).observe, depth))
            for reason in ("queue_full", "deadline_exceeded"):
                self._level_rejects[(level.priority, reason)] = m.level_rejections.labels(*labels, priority, reason).inc

    def observe_dispatch(self, waits: Sequence[float], priorities: Sequence[int] = ()) -> None:
        """A batch leaves the queue: how long each of its sentences waited, and at which priority level."""
        observe, levels = self._wait, self._levels
        for wait in waits:
            observe(wait)
        if levels:
            for wait, priority in zip(waits, priorities):
                levels[priority - 1][0](wait)

    def observe_batch(self, size: int, real_tokens: int, padded_tokens: int, seconds: float) -> None:
        """One model run: its size, tokens and time."""
        self._size(size)
        self._tokens(padded_tokens)
        self._ratio(padded_tokens / real_tokens)
        self._real(real_tokens)
        self._padded(padded_tokens)
        self._run(seconds)

    def reject(self, reason: str, priority: int | None = None) -> None:
        self.metrics.reject(reason, self.model, self.version)
        if priority is not None and self._levels:
            self._level_rejects[(priority, reason)]()

    def watch_drift(self, monitor) -> None:
        """``scs_drift_psi`` per signal reads the monitor (at scrape time)."""
        for index, name in enumerate(monitor.names):
            self._drift[name] = gauge = self.metrics.drift_psi.labels(self.model, self.version, name)
            self.metrics.bind(gauge, lambda index=index: monitor.gauge(index))

    def memory(self, grown_bytes: int) -> None:
        self.metrics.model_memory.labels(self.model, self.version).set(grown_bytes)

    def remove(self) -> None:
        """The version is unloaded: its series go (a scrape must not show a model that is not served)."""
        m, labels = self.metrics, (self.model, self.version)
        drift = list(self._drift.values())
        depths = [depth for _, depth in self._levels] + self._cache_gauges
        for gauge in drift + depths:
            m.unbind(gauge)
        if m.multiprocess:  # series cannot be removed there: the gauges drop to 0, the counters keep their totals
            m.unbind(m.queue_depth.labels(*labels))
            for gauge in drift + depths:
                gauge.set(0)
            for gauge in (m.queue_depth.labels(*labels), m.model_memory.labels(*labels),
                          m.model_info.labels(self.model, self.version, self.provider)):
                gauge.set(0)
            return
        for family in (m.queue_wait, m.batch_size, m.batch_tokens, m.padding_ratio, m.real_tokens, m.padded_tokens,
                       m.run_time, m.queue_depth, m.model_memory, m.abstentions, m.cache_hits, m.cache_misses,
                       m.cache_evictions, m.cache_bytes, m.cache_entries):
            try:
                family.remove(*labels)
            except KeyError:
                pass
        try:
            m.model_info.remove(self.model, self.version, self.provider)
        except KeyError:
            pass
        for name in self._drift:
            m.drift_psi.remove(*labels, name)
        for priority in range(1, len(self._levels) + 1):
            for family in (m.level_depth, m.level_wait):
                family.remove(*labels, str(priority))
            for reason in ("queue_full", "deadline_exceeded"):
                m.level_rejections.remove(*labels, str(priority), reason)
