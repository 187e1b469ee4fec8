"""Prometheus metrics (names follow Triton's and Prometheus' conventions), in a registry per app."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
RATIO_BUCKETS = (1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 2.0, 3.0, 5.0)
ENDPOINTS = frozenset({"/classify", "/healthz", "/readyz", "/v1/model", "/metrics"})


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # the *_created series only add noise to every scrape
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("scs_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("scs_request_duration_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("scs_queue_wait_seconds", "time a sentence waited in the queue before its run",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("scs_batch_size_sentences", "sentences per model run", buckets=SIZE_BUCKETS,
                                    registry=r)
        self.batch_tokens = Histogram("scs_batch_padded_tokens", "padded tokens (longest x count) per model run",
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.padding_ratio = Histogram("scs_batch_padding_ratio", "padded / real tokens per model run",
                                       buckets=RATIO_BUCKETS, registry=r)
        self.real_tokens_total = Counter("scs_real_tokens", "real tokens run through the model", registry=r)
        self.padded_tokens_total = Counter("scs_padded_tokens", "padded tokens run through the model", registry=r)
        self.run_time = Histogram("scs_model_run_seconds", "model run time per batch (worker thread)",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.rejections = Counter("scs_rejections_total", "requests refused or dropped, by reason", ["reason"],
                                  registry=r)
        self.queue_depth = Gauge("scs_queue_depth", "sentences waiting in the batch queue", registry=r)
        self.in_flight = Gauge("scs_requests_in_flight", "HTTP requests being handled", registry=r)
        self.model_info = Gauge("scs_model_info", "the model being served", ["name", "version", "provider"],
                                registry=r)
        self._request_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self._reject_children: dict[str, Counter] = {}

    def bind(self, queue_depth: Callable[[], float], in_flight: Callable[[], float]) -> None:
        """Gauges read at scrape time: no cost on the hot path."""
        self.queue_depth.set_function(queue_depth)
        self.in_flight.set_function(in_flight)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        key = (path if path in ENDPOINTS else "other", status)
        children = self._request_children.get(key)
        if children is None:
            endpoint = key[0]
            children = self._request_children[key] = (self.requests.labels(endpoint, str(status)),
                                                      self.latency.labels(endpoint))
        children[0].inc()
        children[1].observe(seconds)

    def observe_dispatch(self, waits: Sequence[float]) -> None:
        """A batch leaves the queue: how long each of its sentences waited."""
        observe = self.queue_wait.observe
        for wait in waits:
            observe(wait)

    def observe_batch(self, size: int, real_tokens: int, padded_tokens: int, seconds: float) -> None:
        """One model run: its size, tokens and time."""
        self.batch_size.observe(size)
        self.batch_tokens.observe(padded_tokens)
        self.padding_ratio.observe(padded_tokens / real_tokens)
        self.real_tokens_total.inc(real_tokens)
        self.padded_tokens_total.inc(padded_tokens)
        self.run_time.observe(seconds)

    def reject(self, reason: str) -> None:
        child = self._reject_children.get(reason)
        if child is None:
            child = self._reject_children[reason] = self.rejections.labels(reason)
        child.inc()
