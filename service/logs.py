"""Structured logs: one JSON object per line, with the request id of the request being handled."""

from __future__ import annotations

import logging
import os
import sys
import time
from contextvars import ContextVar

import orjson

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
# The sampled trace span of the request being handled (service/tracing.py), None when not traced.
request_span: ContextVar[object | None] = ContextVar("request_span", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            entry["request_id"] = rid
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        rid = request_id.get()
        extra = ({"request_id": rid} if rid else {}) | (fields if isinstance(fields, dict) else {})
        return line + "".join(f" {key}={value}" for key, value in extra.items())


def configure(level: str = "info", fmt: str = "json", worker: int | None = None) -> None:
    """Route every logger (uvicorn's too) through one stderr handler; a worker's lines name it and its pid (a
    replaced worker keeps its index)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if worker is not None:
        who = {"worker": worker, "pid": os.getpid()}
        handler.addFilter(lambda record: setattr(record, "fields", who | (getattr(record, "fields", None) or {}))
                          or True)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the service writes its own access lines, with request ids
