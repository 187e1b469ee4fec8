"""One error shape for every 4xx/5xx: ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import uuid
from typing import Any

import orjson


class ArtifactError(Exception):
    """The model folder disagrees with its manifest or the contract: the service refuses to start."""


class ServiceError(Exception):
    """An answer other than 200 for one request; carries its HTTP status and extra headers."""

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


def queue_full() -> ServiceError:
    return ServiceError(503, "queue_full", "the service is at capacity; retry shortly", headers={"Retry-After": "1"})


def not_ready(draining: bool) -> ServiceError:
    if draining:
        return ServiceError(503, "draining", "the service is shutting down", headers={"Retry-After": "1"})
    return ServiceError(503, "not_ready", "the model is still warming up", headers={"Retry-After": "1"})


def deadline_exceeded(timeout_s: float) -> ServiceError:
    return ServiceError(504, "deadline_exceeded", f"the request was not answered within {timeout_s:g} s")


def batch_failed(error_id: str) -> ServiceError:
    return ServiceError(500, "model_error", "the model run for this request failed", {"error_id": error_id})
