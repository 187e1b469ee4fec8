"""The ASGI application: the lifespan that runs the model repository's engines, and for every HTTP request one
stack (request id, metrics, in-flight count, then auth and CORS) in front of the routes: the hot routes
(``POST /classify``, the V2 infer route: ``service.hot_route``), everything else through FastAPI
(``service.routes``). The lifespan also starts the gRPC service (``service.grpc_server``) on the same event loop,
once the models are warm when this process is one worker of several.

    uvicorn --factory service.app:create_app     # works; ``python -m service`` adds signals, drain and our protocol
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable

from . import logs
from .classify import ClassifyProtocol
from .errors import ServiceError, StartupError
from .hot_route import HotRoute, respond
from .lifecycle import ServiceState
from .metrics import Metrics
from .repository import Repository
from .routes import create_api
from .runtime import Runtime
from .security import secure
from .settings import Settings
from .v2 import INFER, V2Protocol

log = logging.getLogger("service.app")


class App:
    _ids = itertools.count(1)
    _prefix = os.urandom(4).hex()

    def __init__(self, state: ServiceState, warm_before_serving: bool = False) -> None:
        self.state = state
        self.warm_before_serving = warm_before_serving
        self.api = create_api(state)
        self.classify = HotRoute(state, ClassifyProtocol(state.settings))
        self.infer = HotRoute(state, V2Protocol(state.settings))
        self.routes = secure(self._route, state.settings)
        self.access_log = logging.getLogger("service.access") if state.settings.access_log else None
        self.in_flight = 0
        state.metrics.bind(state.metrics.in_flight.labels("http"), lambda: self.in_flight)
        self._tasks: list[asyncio.Task] = []
        self.grpc = None  # service.grpc_server.GrpcServer once started (SCS_GRPC_PORT, 0: off)
        self.grpc_failure: str | None = None  # why gRPC could not start (then the lifespan's start-up fails)

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.api(scope, receive, send)

    async def _route(self, scope, receive, send) -> None:
        path = scope["path"]
        hot = self.classify if path == "/classify" else self.infer if INFER.match(path) else None
        if hot is None:
            await self.api(scope, receive, send)
        elif scope["method"] == "POST":
            await hot(scope, receive, send)
        else:
            error = ServiceError(405, "method_not_allowed", "Method Not Allowed", headers={"Allow": "POST"})
            await respond(send, error.status, error.body(), headers=error.headers)

    async def _http(self, scope, receive, send) -> None:
        """X-Request-ID in (if sane) or made, and out; per-request metrics; the optional access log."""
        rid = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                if 0 < len(value) <= 128 and value.isascii() and value.decode().isprintable():
                    rid = value.decode()
                break
        if rid is None:
            rid = f"{self._prefix}-{next(self._ids):x}"
        header = (b"x-request-id", rid.encode())
        token = logs.request_id.set(rid)
        started = time.perf_counter()
        status = 500
        route = endpoint(scope["path"])
        span = span_token = None
        tracing = self.state.tracing
        if tracing is not None and route not in UNTRACED:
            span = tracing.start_request(scope["method"], route, scope["headers"])
            if span is not None:
                span.set_attribute("scs.request_id", rid)
                span_token = logs.request_span.set(span)

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        self.in_flight += 1
        try:
            await self.routes(scope, receive, send_with_id)
        finally:
            self.in_flight -= 1
            seconds = time.perf_counter() - started
            trace_id = None
            if span is not None:
                tracing.end_request(span, status)
                logs.request_span.reset(span_token)
                trace_id = format(span.get_span_context().trace_id, "032x")
            self.state.metrics.observe_request(route, status, seconds, trace_id)
            if self.access_log is not None:
                self.access_log.info("%s %s %d", scope["method"], scope["path"], status, extra={"fields": {
                    "method": scope["method"], "path": scope["path"], "status": status,
                    "duration_ms": round(seconds * 1000, 3)}})
            logs.request_id.reset(token)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                warming = self._start()
                if self.warm_before_serving:  # a worker on a shared socket takes no connection until it is warm
                    await warming
                    if self.state.failure:
                        await send({"type": "lifespan.startup.failed", "message": self.state.failure})
                        return
                failure = await self._start_grpc()
                if failure:
                    await send({"type": "lifespan.startup.failed", "message": failure})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _start(self) -> asyncio.Task:
        """Start the engines, the warm-up (returned) and the background tasks."""
        loop = asyncio.get_running_loop()
        for engine in self.state.repository.all_engines():
            engine.start(self.state.repository.on_failure)
        warming = loop.create_task(self._warm_up(), name="warm-up")
        self._tasks.append(warming)
        if self.state.metrics.multiprocess:
            self._tasks.append(loop.create_task(self._refresh_gauges(), name="gauges"))
        if self.state.settings.repository_poll_s > 0:
            self._tasks.append(loop.create_task(self.state.repository.poll(self.state.settings.repository_poll_s),
                                                name="repository-poll"))
        return warming

    async def _start_grpc(self) -> str | None:
        """Serve gRPC on ``SCS_GRPC_PORT`` (unless 0); why it could not, or None."""
        settings = self.state.settings
        if not settings.grpc_port:
            return None
        from .grpc_server import BindError, GrpcServer, grpc_address  # grpcio is imported only when gRPC is on

        address = grpc_address(settings.grpc_host or settings.host, settings.grpc_port)
        # One worker of several (warm_before_serving) binds the port in a SO_REUSEPORT group with the others.
        server = GrpcServer(self.state, address, group=self.warm_before_serving)
        try:
            await server.start()
        except BindError as error:
            self.grpc_failure = f"cannot listen on {address} for gRPC ({error})"
            log.error(self.grpc_failure)
            return self.grpc_failure
        self.grpc = server
        return None

    def stop_grpc(self, grace_s: float) -> Awaitable[None]:
        """gRPC takes no new call from now on; the calls in flight get ``grace_s`` seconds (idempotent)."""
        if self.grpc is None:
            return asyncio.sleep(0)
        return self.grpc.stop(grace_s)

    def release_grpc(self) -> None:
        """Let go of the stopped gRPC server while the event loop still runs: grpcio's asyncio layer then shuts down
        here, rather than at interpreter exit, where it prints an empty "Error in sys.excepthook" (grpc/grpc#38679)."""
        if self.grpc is not None:
            self.grpc.server = None
            self.grpc = None
            gc.collect()

    async def _refresh_gauges(self) -> None:
        while True:
            self.state.metrics.refresh()
            await asyncio.sleep(0.5)

    async def _warm_up(self) -> None:
        state = self.state
        for engine in state.repository.all_engines():
            try:
                milliseconds = await engine.warm_up()
            except Exception as error:
                log.exception("warm-up failed")
                state.fail(f"warm-up failed for {engine.name} v{engine.version} ({error!r})")
                return
            log.info("warm", extra={"fields": {"model": engine.name, "version": engine.version,
                                               "warmup_ms": round(milliseconds, 1), "provider": engine.provider}})
        state.mark_ready()
        log.info("ready", extra={"fields": {"models": {n: sorted(v) for n, v in state.repository.engines.items()}}})

    async def _stop(self) -> None:
        """Queued and running sentences finish within what is left of the one shutdown deadline."""
        state = self.state
        state.start_draining()
        await self.stop_grpc(state.time_left())  # under ``python -m service`` already stopped with the HTTP port
        for task in self._tasks:
            task.cancel()
        if await state.repository.close(state.time_left()):
            log.info("stopped: queue drained")
        else:
            state.unfinished = True
            log.error("stopped with work still queued: it did not finish within graceful_timeout_s")
        if state.tracing is not None:  # what is queued for export, within what is left of the deadline (<= 2 s)
            await asyncio.to_thread(state.tracing.shutdown, min(2.0, state.time_left()))


UNTRACED = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})  # probes, scrapes
ENDPOINTS = frozenset({"/classify", "/healthz", "/readyz", "/v1/model", "/v1/models", "/metrics", "/v2",
                       "/v2/health/live", "/v2/health/ready", "/v2/repository/index"})
PATTERNS = [(re.compile(p), name) for p, name in (
    (r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$", "/v2/models/{model}/infer"),
    (r"^/v2/models/[^/]+(/versions/[^/]+)?/ready$", "/v2/models/{model}/ready"),
    (r"^/v2/models/[^/]+(/versions/[^/]+)?$", "/v2/models/{model}"),
    (r"^/v2/repository/models/[^/]+/(load|unload)$", "/v2/repository/models/{model}/load|unload"))]


def endpoint(path: str) -> str:
    """The metrics label of a path: the route it matched, never the raw path (whose values are unbounded)."""
    if path in ENDPOINTS:
        return path
    for pattern, name in PATTERNS:
        if pattern.match(path):
            return name
    return "other"


def create_app(settings: Settings | None = None, runtime: Runtime | None = None,
               warm_before_serving: bool = False) -> App:
    """The app for ``settings``: loads and checks the repository's models (``ArtifactError`` when none can be
    served; ``StartupError`` when tracing is on without OpenTelemetry installed). ``runtime``: an already opened
    version, served in place of loading that folder (tests). ``warm_before_serving``: the lifespan's start-up ends
    only once the models are warm (a worker on a shared socket), rather than at once with /readyz 503 meanwhile."""
    settings = settings or Settings()
    metrics = Metrics()
    tracing = None
    endpoint = settings.traces_endpoint()
    if endpoint:
        try:
            from .tracing import Tracing  # OpenTelemetry is imported only when tracing is on
        except ImportError as error:
            raise StartupError(f"tracing is on ({endpoint}) but OpenTelemetry is not installed ({error}): "
                               f"install the serve extra, or unset SCS_OTEL_ENDPOINT / OTEL_EXPORTER_OTLP_*") from None
        tracing = Tracing(endpoint, settings.otel_sample_ratio, settings.otel_queue_size,
                          settings.otel_export_timeout_s, metrics.trace_spans, metrics.traces_skipped)
        log.info("tracing", extra={"fields": {"endpoint": endpoint, "sample_ratio": settings.otel_sample_ratio}})
    repository = Repository(settings, metrics, tracing)
    repository.load_at_start(runtime)
    return App(ServiceState(settings, repository, metrics, tracing), warm_before_serving)
