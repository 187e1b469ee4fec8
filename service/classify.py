"""``POST /classify`` as a raw ASGI callable: the hot path, kept lean.

Measured per request, the FastAPI machinery (dependency solving, response validation, JSONResponse) cost
more than the model's share of a batch, so this route reads the body itself (size limit enforced before
parsing), validates with pydantic, tokenizes, queues the sentences and writes orjson bytes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import orjson
from pydantic import ValidationError

from . import errors
from .batcher import BatchFailed, Closed, DeadlineExceeded, Disconnected, QueueFull
from .logs import request_id
from .protocol import DISCONNECT_NOTICE
from .schemas import ClassifyRequest, Limits, error_details

if TYPE_CHECKING:
    from .app import ServiceState

log = logging.getLogger("service.classify")

JSON_HEADERS = [(b"content-type", b"application/json")]


class ClassifyEndpoint:
    def __init__(self, state: ServiceState) -> None:
        self.state = state
        runtime = state.runtime
        self.labels = runtime.labels
        self.limits = Limits(state.settings.max_text_chars, state.settings.max_texts, len(runtime.labels))
        self.max_body = state.settings.max_body_bytes
        self.default_top_k = min(state.settings.default_top_k, len(runtime.labels))
        self.header = {"model": runtime.artifact.name, "version": runtime.artifact.version}

    async def __call__(self, scope, receive, send) -> None:
        try:
            body = await self._classify(scope, receive)
            status, headers = 200, JSON_HEADERS
        except errors.ServiceError as error:
            status, body = error.status, error.body()
            headers = JSON_HEADERS + [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        except _ClientGone:
            return
        except Exception:
            error_id = errors.new_error_id()
            log.exception("unhandled error in /classify", extra={"fields": {"error_id": error_id}})
            status, body = 500, errors.error_body("internal_error", "unexpected server error", {"error_id": error_id})
            headers = JSON_HEADERS
        await send({"type": "http.response.start", "status": status,
                    "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _classify(self, scope, receive) -> bytes:
        state = self.state
        if not state.ready:  # while draining, requests are still served until uvicorn stops accepting
            state.metrics.reject("not_ready")
            raise errors.not_ready(False)
        raw = await self._read_body(scope, receive)
        try:
            request = ClassifyRequest.model_validate_json(raw, context=self.limits)
        except ValidationError as error:
            raise _invalid(raw, error.errors(include_url=False)) from None
        texts = [request.text] if request.texts is None else request.texts
        encoded = state.runtime.encode(texts)
        try:
            job = state.batcher.submit([e.ids for e in encoded], request_id.get())
        except QueueFull:
            raise errors.queue_full() from None
        except Closed:
            raise errors.not_ready(True) from None
        notice = scope.get("extensions", {}).get(DISCONNECT_NOTICE)
        if notice is not None:  # the server tells us when the client leaves: no watcher task needed
            notice(job.disconnect)
            watcher = None
        else:
            watcher = asyncio.ensure_future(_watch_disconnect(receive, job))
        try:
            outputs = await job.future
        except DeadlineExceeded:
            raise errors.deadline_exceeded(state.settings.request_timeout_s) from None
        except BatchFailed as error:
            raise errors.batch_failed(error.error_id) from None
        except Disconnected:
            state.metrics.reject("client_disconnected")
            raise _ClientGone() from None
        finally:
            if watcher is not None:
                watcher.cancel()
        labels = self.labels
        top_k = request.top_k or self.default_top_k
        predictions = []
        for (probabilities, order), item in zip(outputs, encoded):
            best = order[0]
            predictions.append({
                "label": labels[best],
                "score": probabilities[best],
                "probabilities": {labels[i]: probabilities[i] for i in order[:top_k]},
                "truncated": item.truncated,
            })
        return orjson.dumps(self.header | {"predictions": predictions})

    async def _read_body(self, scope, receive) -> bytes:
        """The whole body, refused with 413 as soon as it is known to pass the limit (never parsed)."""
        limit = self.max_body
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > limit:
                    raise _too_large(limit)
                break
        message = await receive()
        body = message.get("body", b"")
        if not message.get("more_body", False):
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            if len(body) > limit:
                raise _too_large(limit)
            return body
        chunks, size = [body], len(body)
        while message.get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)


class _ClientGone(Exception):
    """The client disconnected: there is no one to answer."""


async def _watch_disconnect(receive, job) -> None:
    """Fail the job as soon as the client goes away, so its queued sentences never run."""
    message = await receive()
    if message["type"] == "http.disconnect":
        job.disconnect()


def _too_large(limit: int) -> errors.ServiceError:
    return errors.ServiceError(413, "body_too_large", f"request body is larger than {limit} bytes",
                               {"limit_bytes": limit})


def _invalid(raw: bytes, problems: list[dict]) -> errors.ServiceError:
    if problems and problems[0]["type"] == "json_invalid":
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as error:
            return errors.ServiceError(400, "invalid_utf8", f"request body is not valid UTF-8 (byte {error.start})")
        return errors.ServiceError(400, "malformed_json", f"request body is not valid JSON: {problems[0]['msg']}")
    return errors.ServiceError(422, "invalid_request", "the request does not match the schema",
                               error_details(problems))
