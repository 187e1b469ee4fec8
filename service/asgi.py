"""Raw ASGI plumbing for the hot routes: read a body within a limit, send an answer, notice a client leaving."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .errors import too_large
from .http_protocol import DISCONNECT_NOTICE

JSON = b"application/json"


class ClientGone(Exception):
    """The client disconnected: there is no one to answer."""


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
