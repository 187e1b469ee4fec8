"""Every answer other than 200, as one exception type that knows its HTTP status.

The core (batcher, engine) raises these; each route writes them in its protocol's shape: ``/classify`` and the
other service routes as ``{"error": {"code", "message", "details"}}``, the Open Inference Protocol routes as
``{"error": "<message>"}``. ``Retry-After`` and the like travel in ``headers``.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson


class StartupError(Exception):
    """The service cannot start as configured (not an artifact problem): one line, exit code 2."""


class ServiceError(Exception):
    """An answer other than 200 for one request."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.code, self.message, self.details)


def error_body(code: str, message: str, details: Any = None) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message, "details": details}})


def new_error_id() -> str:
    """Short id that ties a 500 answer to its log line."""
    return uuid.uuid4().hex[:16]


RETRY = {"Retry-After": "1"}


class QueueFull(ServiceError):
    """The queue cannot take every sentence of the request: it is refused whole."""

    def __init__(self) -> None:
        super().__init__(503, "queue_full", "the service is at capacity; retry shortly", headers=RETRY)


class NotReady(ServiceError):
    def __init__(self, draining: bool = False) -> None:
        if draining:
            super().__init__(503, "draining", "the service is shutting down", headers=RETRY)
        else:
            super().__init__(503, "not_ready", "the model is still warming up", headers=RETRY)


class Unhealthy(ServiceError):
    """A core task died or warm-up failed: the process is on its way out (and exits non-zero)."""

    def __init__(self, reason: str) -> None:
        super().__init__(503, "unhealthy", f"the service failed and is stopping: {reason}", headers=RETRY)


class DeadlineExceeded(ServiceError):
    """Not answered within the request's deadline; its queued sentences were dropped."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(504, "deadline_exceeded", f"the request was not answered within {timeout_s:g} s")


class BatchFailed(ServiceError):
    """The model run holding one of the request's sentences raised; ``error_id`` is in the log line."""

    def __init__(self, error_id: str) -> None:
        super().__init__(500, "model_error", "the model run for this request failed", {"error_id": error_id})
        self.error_id = error_id


def internal_error(error_id: str) -> ServiceError:
    return ServiceError(500, "internal_error", "unexpected server error", {"error_id": error_id})


def too_large(limit: int) -> ServiceError:
    return ServiceError(413, "body_too_large", f"request body is larger than {limit} bytes", {"limit_bytes": limit})


def unauthorized() -> ServiceError:
    return ServiceError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <key>)",
                        headers={"WWW-Authenticate": "Bearer"})


def not_found(what: str) -> ServiceError:
    return ServiceError(404, "not_found", what)


def no_threshold_for(precision: float, available: list[float]) -> ServiceError:
    have = ", ".join(f"{p:g}" for p in available) or "none (its manifest has no selective thresholds)"
    return ServiceError(422, "invalid_request", "the request does not match the schema", [
        {"loc": ["min_precision"], "type": "min_precision_unavailable",
         "msg": f"no threshold of this model version reaches precision {precision:g}; it has: {have}"}])
