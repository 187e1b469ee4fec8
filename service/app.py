"""The FastAPI app: routes, error handlers, request-id/metrics middleware, and the lifespan that runs the batcher."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.responses import Response

from . import errors, logs
from .batcher import Batcher, BatchLimits
from .classify import ClassifyEndpoint
from .metrics import Metrics
from .openapi import document
from .runtime import Runtime, load_runtime
from .schemas import ClassifyRequest, ClassifyResponse, ErrorResponse, error_details
from .security import secure
from .settings import Settings

log = logging.getLogger("service.app")


@dataclass
class ServiceState:
    settings: Settings
    runtime: Runtime
    metrics: Metrics
    classify: ClassifyEndpoint | None = None
    batcher: Batcher | None = None
    ready: bool = False
    draining: bool = False
    in_flight: int = 0
    warmup: Any = field(default=None, repr=False)


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(error: errors.ServiceError) -> Response:
    return Response(error.body(), error.status, error.headers, media_type="application/json")


class FastRoute(APIRoute):
    """Documented like any FastAPI route (schema, examples), but served by a raw ASGI callable."""

    def __init__(self, path: str, endpoint, *, asgi, **kwargs) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.app = asgi


class RequestContext:
    """Pure ASGI middleware: X-Request-ID in and out, per-request metrics, optional access log."""

    _ids = itertools.count(1)
    _prefix = os.urandom(4).hex()

    def __init__(self, app, state: ServiceState) -> None:
        self.app = app
        self.state = state
        self.access_log = logging.getLogger("service.access") if state.settings.access_log else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        state = self.state
        state.in_flight += 1
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            state.in_flight -= 1
            seconds = time.perf_counter() - started
            state.metrics.observe_request(scope["path"], status, seconds)
            if self.access_log is not None:
                self.access_log.info("%s %s %d", scope["method"], scope["path"], status, extra={"fields": {
                    "method": scope["method"], "path": scope["path"], "status": status,
                    "duration_ms": round(seconds * 1000, 3)}})
            logs.request_id.reset(token)


class FastLane:
    """What uvicorn serves: ``POST /classify`` goes straight to its handler (inside the same request-id and
    metrics middleware); everything else, lifespan included, goes through FastAPI. The FastAPI route for
    /classify stays (it documents the endpoint and serves it when the app is used without this wrapper);
    skipping FastAPI's middleware stack and router saves about 15-20 us of CPU per request."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        state: ServiceState = app.state.service
        self.classify = RequestContext(secure(state.classify, state.settings), state)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == "/classify" and scope["method"] == "POST":
            await self.classify(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    """The app for ``settings``; loads the model unless ``runtime`` is given (raises ``ArtifactError``)."""
    settings = settings or Settings()
    if runtime is None:
        runtime = load_runtime(settings.model_dir, settings.model_version, settings.provider,
                               settings.intra_op_threads, settings.inter_op_threads)
    state = ServiceState(settings, runtime, Metrics())
    state.classify = ClassifyEndpoint(state)
    state.metrics.model_info.labels(runtime.artifact.name, runtime.artifact.version, runtime.provider).set(1)
    state.metrics.bind(lambda: state.batcher.queue_depth if state.batcher else 0, lambda: state.in_flight)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        limits = BatchLimits(settings.max_batch_size, settings.max_batch_tokens, settings.max_padding_ratio,
                             settings.max_wait_ms, settings.max_queue_size, settings.request_timeout_s)
        state.batcher = Batcher(runtime.run, limits, state.metrics)
        state.batcher.start()
        state.warmup = asyncio.get_running_loop().create_task(_warm_up(state))
        yield
        state.draining = True
        try:
            await asyncio.wait_for(state.batcher.close(), settings.graceful_timeout_s)
            log.info("stopped: queue drained")
        except TimeoutError:
            log.error("stopped with work still queued: the model did not finish within graceful_timeout_s")

    app = FastAPI(
        title="Sentence classifier",
        version="0.1.0",
        description="Classify sentences with an ONNX model; concurrent requests are batched dynamically. "
                    "Every error answers `{\"error\": {\"code\", \"message\", \"details\"}}`.",
        lifespan=lifespan,
        default_response_class=JSON,
    )
    app.state.service = state
    _add_routes(app, state)
    _add_error_handlers(app)
    document(app, max_text_chars=settings.max_text_chars, max_texts=settings.max_texts,
             num_classes=len(runtime.labels), secured=settings.api_key is not None)
    app.add_middleware(secure, settings=settings)  # inside RequestContext: 401s get a request id and a metric
    app.add_middleware(RequestContext, state=state)
    return app


async def _warm_up(state: ServiceState) -> None:
    started = time.perf_counter()
    try:
        await state.batcher.run_in_worker(state.runtime.warmup)
    except Exception:
        log.exception("warm-up failed; staying not ready")
        return
    state.ready = True
    log.info("ready", extra={"fields": {"warmup_ms": round((time.perf_counter() - started) * 1000, 1),
                                        "provider": state.runtime.provider}})


ERROR_RESPONSES = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "malformed JSON or invalid UTF-8",
        413: "body larger than SCS_MAX_BODY_BYTES",
        422: "request does not match the schema (also: text too long, too many texts, top_k out of range)",
        500: "the model run failed (details.error_id is in the logs)",
        503: "queue full, warming up or shutting down (Retry-After)",
        504: "not answered within SCS_REQUEST_TIMEOUT_S",
    }.items()
}


def _add_routes(app: FastAPI, state: ServiceState) -> None:
    def classify(request: ClassifyRequest = Body(openapi_examples={
        "one": {"summary": "one sentence", "value": {"text": "I still have not received my new card."}},
        "many": {"summary": "several sentences, top 3 classes",
                 "value": {"texts": ["How do I top up by card?", "My card was stolen"], "top_k": 3}},
    })) -> ClassifyResponse:
        """Classify one sentence (`text`) or several (`texts`); predictions come back in input order.

        Texts longer than the model's `max_length` tokens are cut and marked `truncated`.
        """
        raise NotImplementedError  # served by ClassifyEndpoint; this signature only documents the route

    app.router.routes.append(FastRoute("/classify", classify, asgi=state.classify, methods=["POST"],
                                       response_model=ClassifyResponse, responses=ERROR_RESPONSES,
                                       name="classify"))

    @app.get("/healthz", summary="the process is alive")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="the model is loaded and warm (503 while starting or draining)",
             responses={503: {"model": ErrorResponse}})
    async def readyz() -> Response:
        if state.ready and not state.draining:
            return JSON({"status": "ready"})
        return error_response(errors.not_ready(state.draining))

    @app.get("/v1/model", summary="the model served, its provider and the batching settings")
    async def model_info() -> dict:
        return model_summary(state)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def model_summary(state: ServiceState) -> dict:
    runtime, settings = state.runtime, state.settings
    manifest = runtime.artifact.manifest
    keep = ("name", "version", "created_at", "num_classes", "max_length", "vocab_size", "opset", "metrics",
            "dataset", "verification", "versions")
    return {
        "model": {key: manifest[key] for key in keep if key in manifest} | {
            "labels": runtime.labels,
            "folder": runtime.artifact.folder.name,
            "files": {name: entry.get("sha256") for name, entry in manifest["files"].items()},
        },
        "provider": runtime.provider,
        "batching": {key: getattr(settings, key) for key in (
            "max_batch_size", "max_batch_tokens", "max_padding_ratio", "max_wait_ms", "max_queue_size",
            "request_timeout_s")},
        "limits": {key: getattr(settings, key) for key in (
            "max_text_chars", "max_texts", "max_body_bytes", "default_top_k")},
        "ready": state.ready and not state.draining,
    }


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        error = errors.ServiceError(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {}))
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(errors.ServiceError(422, "invalid_request", "the request does not match the schema",
                                                  error_details(list(exc.errors()))))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        error_id = errors.new_error_id()
        log.error("unhandled error", exc_info=exc, extra={"fields": {"error_id": error_id}})
        return error_response(errors.ServiceError(500, "internal_error", "unexpected server error",
                                                  {"error_id": error_id}))
