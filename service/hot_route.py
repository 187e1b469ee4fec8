"""The hot routes' one path, as raw ASGI: read the body, parse it (the protocol's job), make the one engine call,
render the answer (the protocol's job), write it. ``POST /classify`` (``service.classify``) and the V2 infer route
(``service.v2``) are this path with two protocols.

Why raw ASGI: measured per request, FastAPI's machinery (dependency solving, response validation, JSONResponse)
cost more than the model's share of a batch. The body is read here within its limit (413 before any parsing), and
a client that leaves while its sentences wait takes them out of the queue (the server's disconnect notice).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .calls import WireProtocol, infer
from .errors import ServiceError, internal_error, new_error_id, too_large
from .http_protocol import DISCONNECT_NOTICE
from .lifecycle import ServiceState

log = logging.getLogger("service.hot_route")
JSON = b"application/json"


class ClientGone(Exception):
    """The client disconnected: there is no one to answer."""


class HotRoute:
    def __init__(self, state: ServiceState, protocol: WireProtocol) -> None:
        self.state, self.protocol = state, protocol
        self.max_body = state.settings.max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        protocol = self.protocol
        try:
            self.state.serving()
            call = protocol.parse(scope, await read_body(scope, receive, self.max_body))
            stop_watching = cancel_if_client_leaves(scope, receive)
            try:
                answer = await infer(self.state.repository, protocol, call)
            finally:
                stop_watching()
            reply = protocol.render(call, answer)
        except ServiceError as error:
            reply = protocol.error(error)
        except (ClientGone, asyncio.CancelledError):
            self.state.metrics.reject("client_disconnected")
            return
        except Exception:
            error_id = new_error_id()
            log.exception("unhandled error", extra={"fields": {"path": scope["path"], "error_id": error_id}})
            reply = protocol.error(internal_error(error_id))
        await respond(send, *reply)


def no_cache(scope) -> bool:
    """The request says ``Cache-Control: no-cache`` (or ``no-store``): it bypasses the response cache."""
    for name, value in scope["headers"]:
        if name == b"cache-control":
            value = value.lower()
            return b"no-cache" in value or b"no-store" in value
    return False


async def read_body(scope, receive, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to pass ``limit`` (never parsed)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if not value.isdigit() or len(value) > 18 or int(value) > limit:
                raise too_large(limit)
            break
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def respond(send, status: int, body: bytes, content_type: bytes = JSON,
                  headers: dict[str, str] | None = None) -> None:
    fields = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if headers:
        fields += [(key.lower().encode(), value.encode()) for key, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": body})


def cancel_if_client_leaves(scope, receive) -> Callable[[], None]:
    """Until the returned function is called, a client that disconnects cancels the current task (so what it
    queued is dropped). The caller catches ``asyncio.CancelledError``.

    ``python -m service`` runs uvicorn with our protocol, which calls us back when the connection is lost
    (``DISCONNECT_NOTICE``): no extra task per request. Under another ASGI server a watcher task awaits
    ``http.disconnect`` instead. (A plain function rather than a context manager: this is the hot path.)
    """
    task = asyncio.current_task()
    notice = scope.get("extensions", {}).get(DISCONNECT_NOTICE)
    if notice is not None:
        notice(task.cancel)
        return lambda: notice(None)

    async def watch() -> None:
        if (await receive())["type"] == "http.disconnect":
            task.cancel()

    return asyncio.ensure_future(watch()).cancel
