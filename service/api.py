"""The routes off the hot path, on FastAPI: probes, the model summaries, metrics, the V2 metadata, health and
repository routes (``v2.add_routes``), and the docs.

``service.app`` sends every request that is not a hot route (``POST /classify``, V2 infer) here, inside the one request-id,
metrics and auth stack it builds for all routes; this app adds no middleware of its own.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from . import __version__, v2
from .errors import NotReady, ServiceError, Unhealthy, internal_error, new_error_id, not_found
from .openapi import document
from .schemas import ErrorResponse, error_details
from .state import Phase, ServiceState

log = logging.getLogger("service.api")


class JSON(JSONResponse):
    """orjson instead of json; a JSONResponse, so the docs show the route's response model."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(error: ServiceError) -> Response:
    return Response(error.body(), error.status, error.headers, media_type="application/json")


def create_api(state: ServiceState) -> FastAPI:
    settings = state.settings
    api = FastAPI(
        title="Sentence classifier",
        version=__version__,
        description="Classify sentences with an ONNX model; concurrent requests are batched dynamically. "
                    "Every error answers `{\"error\": {\"code\", \"message\", \"details\"}}`.",
        default_response_class=JSON,
    )

    @api.get("/healthz", summary="the process is alive (503 once a core task died or warm-up failed)",
             responses={503: {"model": ErrorResponse}})
    async def healthz() -> Response:
        if state.phase is Phase.FAILED:
            return error_response(Unhealthy(state.failure or "failed"))
        return JSON({"status": "ok"})

    @api.get("/readyz", summary="the model is loaded and warm (503 while starting, draining or failed)",
             responses={503: {"model": ErrorResponse}})
    async def readyz() -> Response:
        if state.ready:
            return JSON({"status": "ready"})
        if state.phase is Phase.FAILED:
            return error_response(Unhealthy(state.failure or "failed"))
        return error_response(NotReady(draining=state.phase is Phase.DRAINING))

    @api.get("/v1/model", summary="the default model: its manifest summary, provider and the batching settings",
             responses={404: {"model": ErrorResponse, "description": "the default model is not served (unloaded)"}})
    async def model_info() -> Response:
        try:
            return JSON(model_summary(state))
        except ServiceError as error:
            return error_response(error)

    @api.get("/v1/models", summary="every model of the repository: its version policy, the versions served "
             "(provider, memory, queue) and the versions refused, with why")
    async def models() -> dict:
        return {"default": state.repository.default_model, "models": state.repository.describe()}

    @api.get("/v1/models/{name}/drift", summary="input drift of a served version (default: the newest): each "
             "signal's recent distribution against the training data's, its PSI and whether it alerts",
             responses={404: {"model": ErrorResponse, "description": "no such model or served version, or it "
                                                                    "carries no drift reference"}})
    async def drift(name: str, version: str | None = None) -> Response:
        try:
            engine = state.repository.route(name, version)
            if engine.drift is None:
                raise not_found(f"model {name!r} version {engine.version} was exported without a drift reference")
        except ServiceError as error:
            return error_response(error)
        return JSON({"model": engine.name, "version": engine.version} | engine.drift.report())

    @api.get("/metrics", summary="Prometheus metrics (OpenMetrics, with trace-id exemplars, when the scraper "
             "accepts application/openmetrics-text)", response_class=Response)
    async def metrics(request: Request) -> Response:
        if "application/openmetrics-text" in request.headers.get("accept", ""):
            return Response(openmetrics.generate_latest(state.metrics.exposition),
                            media_type=openmetrics.CONTENT_TYPE_LATEST)
        return Response(generate_latest(state.metrics.exposition), media_type=CONTENT_TYPE_LATEST)

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(ServiceError(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {})))

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(ServiceError(422, "invalid_request", "the request does not match the schema",
                                           error_details(list(exc.errors()))))

    @api.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        error_id = new_error_id()
        log.error("unhandled error", exc_info=exc, extra={"fields": {"error_id": error_id}})
        return error_response(internal_error(error_id))

    v2.add_routes(api, state)
    document(api, max_text_chars=settings.max_text_chars, max_texts=settings.max_texts,
             num_classes=max(len(e.labels) for e in state.repository.all_engines()),
             secured=settings.api_key is not None)
    return api


def model_summary(state: ServiceState) -> dict:
    engine, settings = state.repository.route(), state.settings
    manifest = engine.manifest.model_dump(mode="json")
    keep = ("name", "version", "created_at", "num_classes", "max_length", "vocab_size", "opset", "metrics",
            "dataset", "verification", "versions")
    return {
        "model": {key: manifest[key] for key in keep if key in manifest} | {
            "name": engine.name,
            "labels": engine.labels,
            "folder": engine.runtime.artifact.folder.name,
            "files": {name: entry["sha256"] for name, entry in manifest["files"].items()},
        },
        "provider": engine.provider,
        "batching": asdict(engine.batcher.limits),
        "limits": {key: getattr(settings, key) for key in (
            "max_text_chars", "max_texts", "max_body_bytes", "default_top_k")},
        "ready": state.ready,
    }
