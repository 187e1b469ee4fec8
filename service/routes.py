"""Every route but the two hot ones, on FastAPI: probes, the model summaries and drift, metrics, the Open Inference
Protocol's metadata, health and repository routes, and the docs. They read the service through the repository's and
the engines' public methods.

``service.app`` sends every request that is not a hot route (``POST /classify``, V2 infer) here, inside the one
request-id, metrics and auth stack it builds for all routes; this app adds no middleware of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from . import __version__
from .errors import NotReady, ServiceError, Unhealthy, internal_error, new_error_id, not_found
from .lifecycle import Phase, ServiceState
from .openapi import document
from .rollout import load_body
from .schemas import ErrorResponse, error_details
from .v2 import SERVER_METADATA, Tensor, V2Error, error_body, metadata, v2_status

log = logging.getLogger("service.routes")


class JSON(JSONResponse):
    """orjson instead of json; a JSONResponse, so the docs show the route's response model."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(error: ServiceError) -> Response:
    return Response(error.body(), error.status, error.headers, media_type="application/json")


def v2_answer(value: dict | list, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(value), status, headers, media_type="application/json")


def v2_error(error: ServiceError) -> Response:
    return Response(error_body(error), v2_status(error), error.headers, media_type="application/json")


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
            engine = state.repository.route()
        except ServiceError as error:
            return error_response(error)
        limits = {key: getattr(settings, key) for key in ("max_text_chars", "max_texts", "max_body_bytes",
                                                         "default_top_k")}
        return JSON(engine.summary() | {"limits": limits, "ready": state.ready})

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
            report = engine.drift_report()
            if report is None:
                raise not_found(f"model {name!r} version {engine.version} was exported without a drift reference")
        except ServiceError as error:
            return error_response(error)
        return JSON(report)

    @api.get("/v1/models/{name}/versions/{version}/shadow", summary="a candidate version's rollout (under way or "
             "decided): sentences compared and shed, agreement, probability shift, abstention rates, model time, "
             "the gate's checks and verdict, the canary's requests per version",
             responses={404: {"model": ErrorResponse, "description": "the version has not been a candidate"}})
    async def shadow(name: str, version: str) -> Response:
        try:
            return JSON(state.repository.shadow_report(name, version))
        except ServiceError as error:
            return error_response(error)

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

    add_v2_routes(api, state)
    document(api, max_text_chars=settings.max_text_chars, max_texts=settings.max_texts,
             num_classes=max(len(e.labels) for e in state.repository.all_engines()),
             secured=settings.api_key is not None, priority_levels=settings.priority_levels)
    return api


# --- the Open Inference Protocol, off the hot path -----------------------------------------------------------------

class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="the versions served now")
    platform: str
    parameters: dict[str, Any] = Field(description='{"multi_label": true} for a multi-label model (a sigmoid per '
                                       "class)")
    inputs: list[Tensor]
    outputs: list[Tensor]


class ModelReady(BaseModel):
    name: str
    version: str | None = None
    ready: bool
    error: str | None = None


class IndexEntry(BaseModel):
    name: str
    version: str | None = None
    state: str = Field(description="READY or UNAVAILABLE")
    reason: str | None = None


class Change(BaseModel):
    model: str
    version: int | None = None
    reason: str | None = None


class Candidate(BaseModel):
    model: str
    version: int
    stage: str = Field(description="shadow or canary")


class RepositoryChange(BaseModel):
    loaded: list[Change]
    retired: list[Change]
    refused: list[Change]
    candidates: list[Candidate] = Field([], description="a new version held back by a rollout policy (a shadow, "
                                        "a canary): what served keeps serving until it is decided")


def add_v2_routes(api: FastAPI, state: ServiceState) -> None:
    """Server metadata and health, model metadata and readiness, and the repository extension."""
    repository = state.repository
    errors = {code: {"model": V2Error, "description": text} for code, text in (
        (400, "a bad request"), (403, "repository control is off"), (404, "no such model or version served"),
        (409, "several workers: use polling"), (503, "not ready"))}

    @api.get("/v2", summary="V2: server metadata", tags=["v2"], response_model=ServerMetadata)
    async def server_metadata() -> Response:
        return v2_answer(SERVER_METADATA)

    @api.get("/v2/health/live", summary="V2: the server is alive (503 once it failed)", tags=["v2"],
             response_model=Live, responses={503: {"model": Live}})
    async def live() -> Response:
        failed = state.phase is Phase.FAILED
        return v2_answer({"live": not failed}, 503 if failed else 200)

    @api.get("/v2/health/ready", summary="V2: the server is ready (503 while starting, draining or failed)",
             tags=["v2"], response_model=Ready, responses={503: {"model": Ready}})
    async def ready() -> Response:
        return v2_answer({"ready": state.ready}, 200 if state.ready else 503,
                         None if state.ready else {"Retry-After": "1"})

    async def model_metadata(model_name: str, model_version: str | None = None) -> Response:
        try:
            return v2_answer(model_metadata_of(repository, model_name, model_version))
        except ServiceError as failure:
            return v2_error(failure)

    async def model_ready(model_name: str, model_version: str | None = None) -> Response:
        try:
            engine = repository.route(model_name, model_version)
        except ServiceError as failure:
            return v2_answer({"name": model_name[:100], "ready": False, "error": failure.message}, failure.status)
        ok = state.ready
        return v2_answer({"name": engine.name, "version": engine.version, "ready": ok}, 200 if ok else 503)

    for path, endpoint, summary, shape in (
            ("/v2/models/{model_name}", model_metadata, "V2: model metadata (inputs, outputs, versions served)",
             ModelMetadata),
            ("/v2/models/{model_name}/versions/{model_version}", model_metadata, "V2: one version's metadata",
             ModelMetadata),
            ("/v2/models/{model_name}/ready", model_ready, "V2: the model is ready (its newest served version)",
             ModelReady),
            ("/v2/models/{model_name}/versions/{model_version}/ready", model_ready, "V2: this version is ready",
             ModelReady)):
        shown = {404: {"model": shape if shape is ModelReady else V2Error, "description": "not served"},
                 503: {"model": shape if shape is ModelReady else V2Error, "description": "not ready"}}
        api.add_api_route(path, endpoint, methods=["GET"], summary=summary, tags=["v2"], response_model=shape,
                          responses=shown)

    async def control(change: Callable[[], Awaitable[dict]]) -> Response:
        try:
            return v2_answer(await change_repository(state, change))
        except ServiceError as failure:
            return v2_error(failure)

    @api.post("/v2/repository/index", summary="V2 repository extension: every model and its versions", tags=["v2"],
              response_model=list[IndexEntry])
    async def index() -> Response:
        return v2_answer(repository_index(repository))

    @api.post("/v2/repository/models/{model_name}/load", tags=["v2"], response_model=RepositoryChange,
              responses={c: errors[c] for c in (400, 403, 404, 409)},
              summary="V2 repository extension: load (or reload) a model's versions as its policy chooses; an "
              "optional body {\"parameters\": {\"rollout\": {\"shadow\", \"gate\", \"canary\"}}} makes a new "
              "version a candidate (README: Rollouts)")
    async def load(model_name: str, request: Request) -> Response:
        body = await request.body()
        return await control(lambda: repository.load_model(model_name, load_body(body)))

    @api.post("/v2/repository/models/{model_name}/promote", tags=["v2"], response_model=RepositoryChange,
              responses={c: errors[c] for c in (403, 404, 409)},
              summary="repository: promote the model's candidate now (the usual swap), whatever its gate says so far")
    async def promote(model_name: str) -> Response:
        return await control(lambda: repository.promote(model_name))

    @api.post("/v2/repository/models/{model_name}/abort", tags=["v2"], response_model=RepositoryChange,
              responses={c: errors[c] for c in (403, 404, 409)},
              summary="repository: drop the model's candidate; what serves keeps serving")
    async def abort(model_name: str) -> Response:
        return await control(lambda: repository.abort(model_name))

    @api.post("/v2/repository/models/{model_name}/unload", tags=["v2"], response_model=RepositoryChange,
              responses={c: errors[c] for c in (403, 404, 409)},
              summary="V2 repository extension: stop serving every version of a model (queued work finishes)")
    async def unload(model_name: str) -> Response:
        return await control(lambda: repository.unload(model_name))


# --- what REST (above) and gRPC (service.grpc_server) answer alike --------------------------------------------------

def model_metadata_of(repository, name: str, version: str | None) -> dict:
    """A model's metadata (every served version), or one version's (404 ``ServiceError`` if not served)."""
    engine = repository.route(name, version)
    versions = repository.served_versions(name) if version is None else [engine.version]
    return metadata(engine.name, engine.labels, versions, engine.multi_label)


async def change_repository(state: ServiceState, change: Callable[[], Awaitable[dict]]) -> dict:
    """A repository change, if this server may make one: 409 with several workers, 403 when control is off."""
    if state.metrics.multiprocess:  # each worker has its own repository: one request would change one of them
        raise ServiceError(409, "conflict", "with several workers (SCS_WORKERS) the repository is changed on disk and "
                           "picked up by SCS_REPOSITORY_POLL_S; run one worker to use this API")
    if state.settings.api_key is None and not state.settings.allow_repository_control:
        raise ServiceError(403, "forbidden", "repository control is off: set SCS_API_KEY (then it needs the key) or "
                           "SCS_ALLOW_REPOSITORY_CONTROL=true")
    return await change()


def repository_index(repository) -> list[dict]:
    """Every model and version: READY when served, UNAVAILABLE (with the reason) when refused or unloaded."""
    rows = []
    for model in repository.describe():
        rows += [{"name": model["name"], "version": v["version"], "state": "READY"} for v in model["versions"]]
        rows += [{"name": model["name"], "version": v["version"], "state": "UNAVAILABLE", "reason": v["reason"]}
                 for v in model["refused"]]
        if not model["versions"] and not model["refused"]:
            rows.append({"name": model["name"], "state": "UNAVAILABLE", "reason": "unloaded"})
    return rows
