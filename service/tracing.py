"""OpenTelemetry traces, exported over OTLP/HTTP (protobuf); off, and never imported, unless an endpoint is set
(``SCS_OTEL_ENDPOINT``, else the standard ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``).

What a trace shows, so that a slow request can be explained by the batch it rode in:

- one SERVER span per HTTP request (``POST /classify``) or gRPC call (``inference.GRPCInferenceService/ModelInfer``),
  the child of the request's W3C ``traceparent`` (a header, or gRPC metadata) when it has one: route or method,
  status, and for classification the model, version and sentence count;
- under it, one ``queue wait`` span per sentence: from being queued to its model run starting;
- one ``model run`` span per batch (its own trace), linked to every sampled request span it served, each of
  which links back to it: batch size, real and padded tokens, padding ratio, provider.

Sampling is decided here, before the SDK is called (an unsampled request costs one random draw, not a
non-recording span): the caller's ``traceparent`` decides when it has one, else a draw at ``SCS_OTEL_SAMPLE_RATIO``;
a model run is traced when any request it served is (so the SDK itself samples everything it is given). Spans are
created after the fact with explicit times where they can be (queue waits, model runs), and only for sampled
requests. Ended spans go to a bounded queue that one thread exports; a full queue drops the span and counts it
(``scs_trace_spans_total{outcome="dropped"}``). While the queue is full or the collector failing (after a failed
export: 1 s, doubling to 30 s, until one succeeds), requests are not traced at all (``scs_traces_skipped_total``):
with the Python SDK, tracing a request costs about as much CPU as serving it (README, "What tracing costs"), so a
slow or dead collector must not make every request pay for spans that cannot go.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import __version__

if TYPE_CHECKING:
    from prometheus_client import Counter

    from .batcher import Item

log = logging.getLogger("service.tracing")

EXPORT_BATCH = 512
EXPORT_EVERY_S = 0.5
MAX_BACKOFF_S = 30.0
MAX_LINKS = 100_000  # a model run links every request it served (the SDK's default keeps 128)


class BoundedExport(SpanProcessor):
    """Ended spans into a bounded queue; one daemon thread exports them in batches. A full queue drops and
    counts: the hot path only ever appends to a deque."""

    def __init__(self, exporter, max_queue: int, spans: Counter) -> None:
        self.exporter, self.max_queue = exporter, max_queue
        self.backoff_s, self.down_until = 0.0, 0.0  # after a failed export: no new traces until then
        self.exported, self.dropped, self.failed = (spans.labels(outcome) for outcome in ("exported", "dropped",
                                                                                           "failed"))
        self.queue: deque[ReadableSpan] = deque()
        self.wake = threading.Event()
        self.draining = threading.Lock()
        self.stopping = self.stopped = False
        self.thread = threading.Thread(target=self._work, name="otel-export", daemon=True)
        self.thread.start()

    @property
    def backlogged(self) -> bool:
        """The queue is full or the collector failing: tracing a request now would only cost it."""
        return len(self.queue) >= self.max_queue or (self.down_until > 0 and time.monotonic() < self.down_until)

    def on_start(self, span, parent_context=None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if len(self.queue) >= self.max_queue:
            self.dropped.inc()
            return
        self.queue.append(span)
        if len(self.queue) >= EXPORT_BATCH:
            self.wake.set()

    def _work(self) -> None:
        while not self.stopping:
            self.wake.wait(EXPORT_EVERY_S)
            self.wake.clear()
            self._drain()
        self._drain()

    def _drain(self) -> None:
        with self.draining:  # the export thread, or a flush / shutdown: one at a time
            while batch := self._take():
                self._send(batch)

    def _take(self) -> list[ReadableSpan]:
        batch: list[ReadableSpan] = []
        try:
            while len(batch) < EXPORT_BATCH:
                batch.append(self.queue.popleft())
        except IndexError:  # empty
            pass
        return batch

    def _send(self, batch: list[ReadableSpan]) -> None:
        try:
            result = self.exporter.export(batch)
        except Exception:  # an exporter bug must not end the thread
            log.exception("trace export failed")
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.exported.inc(len(batch))
            self.backoff_s = self.down_until = 0.0
        else:
            self.failed.inc(len(batch))
            self.backoff_s = min(MAX_BACKOFF_S, max(1.0, 2 * self.backoff_s))
            self.down_until = time.monotonic() + self.backoff_s

    def shutdown(self, timeout_s: float = 2.0) -> None:
        """Export what is queued, for at most ``timeout_s``, then stop (what is left is counted as dropped)."""
        if self.stopped:
            return
        self.stopped = self.stopping = True
        self.wake.set()
        self.thread.join(timeout_s)  # its last round exports what is queued
        left = len(self.queue)  # still there: the collector is slow or down
        self.queue.clear()
        self.dropped.inc(left)
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._drain()
        return True


class Tracing:
    """The tracer, the exporter thread and the helpers the app, the engine and the batcher call."""

    def __init__(self, endpoint: str, ratio: float, max_queue: int, timeout_s: float, spans: Counter,
                 skipped: Counter, service_name: str = "sentence-classifier") -> None:
        self.skipped = skipped
        self.export = BoundedExport(OTLPSpanExporter(endpoint=endpoint, timeout=timeout_s), max_queue, spans)
        self.ratio = ratio
        self.provider = TracerProvider(
            sampler=ALWAYS_ON, shutdown_on_exit=False,  # the app's shutdown stops the export, once
            span_limits=SpanLimits(max_links=MAX_LINKS),
            resource=Resource.create({"service.name": service_name, "service.version": __version__}))
        self.provider.add_span_processor(self.export)
        self.tracer = self.provider.get_tracer("service", __version__)
        self.propagator = TraceContextTextMapPropagator()
        # Every span's times come from time.monotonic() (the batcher stamps it too), shifted once to the epoch:
        # spans made after the fact (queue waits, model runs) then nest exactly inside their request's.
        self.offset_ns = time.time_ns() - time.monotonic_ns()

    def ns(self, monotonic_s: float) -> int:
        return int(monotonic_s * 1e9) + self.offset_ns

    def now_ns(self) -> int:
        return time.monotonic_ns() + self.offset_ns

    def start_request(self, method: str, route: str, headers: list[tuple[bytes, bytes]]):
        """An HTTP request's SERVER span if it is sampled, else None (then nothing else is traced for it)."""
        traceparent = tracestate = None
        for name, value in headers:
            if name == b"traceparent" and traceparent is None:
                traceparent = value.decode("latin-1")
            elif name == b"tracestate" and tracestate is None:
                tracestate = value.decode("latin-1")
        return self._start(f"{method} {route}", {"http.request.method": method, "http.route": route}, traceparent,
                           tracestate)

    def start_rpc(self, service: str, method: str, metadata) -> object | None:
        """A gRPC call's SERVER span if it is sampled, else None; ``metadata``: the call's (key, value) pairs."""
        traceparent = tracestate = None
        for key, value in metadata or ():
            if key == "traceparent" and traceparent is None:
                traceparent = value if isinstance(value, str) else value.decode("latin-1")
            elif key == "tracestate" and tracestate is None:
                tracestate = value if isinstance(value, str) else value.decode("latin-1")
        return self._start(f"{service}/{method}", {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
                           traceparent, tracestate)

    def _start(self, name: str, attributes: dict, traceparent: str | None, tracestate: str | None):
        if self.export.backlogged:
            self.skipped.inc()
            return None
        parent = None
        if traceparent is not None:
            carrier = {"traceparent": traceparent} | ({"tracestate": tracestate} if tracestate is not None else {})
            parent = self.propagator.extract(carrier)
            caller = trace.get_current_span(parent).get_span_context()
            if not caller.is_valid:  # a malformed traceparent is ignored, as W3C says: a new trace
                parent = None
            elif not caller.trace_flags.sampled:
                return None  # the caller decided: not sampled
        if parent is None and self.ratio < 1 and random.random() >= self.ratio:
            return None
        return self.tracer.start_span(name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes,
                                      start_time=self.now_ns())

    def end_request(self, span, status: int) -> None:
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(trace.Status(trace.StatusCode.ERROR))
        span.end(self.now_ns())

    def end_rpc(self, span, code: int, failed: bool) -> None:
        """``code``: the gRPC status code's number; ``failed``: a server-side failure (an error status)."""
        span.set_attribute("rpc.grpc.status_code", code)
        if failed:
            span.set_status(trace.Status(trace.StatusCode.ERROR))
        span.end(self.now_ns())

    def batch(self, provider: str) -> BatchTrace:
        return BatchTrace(self, provider)

    def shutdown(self, timeout_s: float) -> None:
        self.export.shutdown(max(0.0, timeout_s))


class BatchTrace:
    """One engine's model runs and queue waits (the batcher's ``trace`` hook)."""

    def __init__(self, tracing: Tracing, provider: str) -> None:
        self.tracing, self.provider = tracing, provider

    def ran(self, batch: list[Item], started: float, ended: float, padded_tokens: int, real_tokens: int,
            failed: bool) -> None:
        """A batch ran from ``started`` to ``ended`` (time.monotonic()): its model-run span, linked both ways to
        the sampled requests it served (now, while their spans are open), and each of their sentences' queue wait
        (just after the answers are on their way: one span per sentence is the bulk of the work)."""
        requests = {id(item.job): item.job.span for item in batch if item.job.span is not None}
        if not requests:
            return
        tracing = self.tracing
        tracer, ns = tracing.tracer, tracing.ns
        start_ns, end_ns = ns(started), ns(ended)
        links = [trace.Link(span.get_span_context()) for span in requests.values()]
        run = tracer.start_span("model run", context=otel_context.Context(), links=links, start_time=start_ns,
                                attributes={"scs.batch.size": len(batch), "scs.batch.padded_tokens": padded_tokens,
                                            "scs.batch.real_tokens": real_tokens,
                                            "scs.batch.padding_ratio": padded_tokens / real_tokens,
                                            "scs.batch.requests": len(requests), "scs.provider": self.provider})
        if failed:
            run.set_status(trace.Status(trace.StatusCode.ERROR, "the model run failed"))
        run.end(end_ns)
        run_context = run.get_span_context()
        for span in requests.values():
            if span.is_recording():  # not if it already ended (answered 504, or the client left)
                span.add_link(run_context)
        waits = [(item.job.span, item.job.queued_at, item.index, item.length) for item in batch
                 if item.job.span is not None]
        asyncio.get_running_loop().call_soon(self._queue_waits, waits, start_ns)

    def _queue_waits(self, waits: list[tuple], start_ns: int) -> None:
        tracer, ns = self.tracing.tracer, self.tracing.ns
        try:
            for span, queued_at, index, tokens in waits:
                wait = tracer.start_span("queue wait", context=trace.set_span_in_context(span),
                                         start_time=ns(queued_at),
                                         attributes={"scs.sentence.index": index, "scs.sentence.tokens": tokens})
                wait.end(start_ns)
        except Exception:  # tracing must never break the event loop
            log.exception("tracing the queue waits failed")
