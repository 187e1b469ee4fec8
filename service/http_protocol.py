"""The HTTP protocol ``python -m service`` gives uvicorn: httptools, plus a read deadline, a disconnect notice and a
drain that answers every request a client sent.

- Read deadline: a connection must deliver a whole request (head and body) within ``read_timeout_s`` of
  opening or of its previous answer, or it is closed. uvicorn alone waits forever for a first request or
  for the rest of a partial one (slowloris); its keep-alive timeout only covers idle time after an answer. Each
  connection only notes when its deadline falls; one sweep a server checks them all every ``SWEEP_S`` (at most a
  quarter of the timeout), rather than a timer set and cancelled per request (README, "Hot path").
- Disconnect notice: ASGI tells an app that its client left only through a pending ``receive()``, which
  costs the app a watcher task per request. This protocol offers the ASGI server extension
  ``scope["extensions"][DISCONNECT_NOTICE]``: call it with a callback, and the callback runs if the
  connection is lost before the response is complete. ``/classify`` uses it when present (a watcher task
  otherwise), so a client that leaves still costs no model run.
- Drain: on shutdown uvicorn closes every idle keep-alive connection at once. A client may have sent its next
  request on one an instant before: closing a socket with unread data resets it, and that request is lost. Here a
  draining connection is never closed under a request: a busy one finishes its answer, which says
  ``Connection: close``; an idle one stays open ``IDLE_GRACE_S`` for a request already on its way (answered the same
  way), then closes. Connections accepted while draining are treated alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DISCONNECT_NOTICE = "scs.on_disconnect"
IDLE_GRACE_S = 1.0  # while draining, an idle keep-alive connection waits this long for a request already sent
SWEEP_S = 1.0  # read deadlines are checked this often (or four times per timeout, if shorter)


def http_protocol(read_timeout_s: float) -> type[HttpToolsProtocol]:
    period = min(SWEEP_S, read_timeout_s / 4)

    class ServiceHttpProtocol(HttpToolsProtocol):
        draining = False  # set on the class when the server starts shutting down (``service.server.Server``)
        sweeper: asyncio.Task | None = None  # one per server (this class is made per server), started on demand
        _read_by: float | None = None  # loop time by which the request being read must be complete
        _idle_close = None
        _reading = False  # between a request's first byte and its last
        _closing = False  # this connection answers its next request with Connection: close, then closes
        _on_disconnect: Callable[[], None] | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            cls = type(self)
            if cls.sweeper is None or cls.sweeper.done():
                cls.sweeper = self.loop.create_task(sweep(self.connections), name="read-deadlines")
            self._arm()
            if self.draining:
                self.shutdown()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._reading = True
            self._on_disconnect = None
            self.scope.setdefault("extensions", {})[DISCONNECT_NOTICE] = self._notify_on_disconnect

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            if self._closing and self.cycle is not None:
                self.cycle.keep_alive = False
                self._cancel_idle_close()

        def on_message_complete(self) -> None:
            self._reading = False
            self._disarm()
            super().on_message_complete()

        def on_response_complete(self) -> None:
            self._on_disconnect = None
            super().on_response_complete()
            if self.timeout_keep_alive_task is not None:  # idle now (not a pipelined request starting)
                self._arm()

        def shutdown(self) -> None:
            """Called by uvicorn on every connection when the server shuts down: drain (module docstring)."""
            if self._closing:
                return
            self._closing = True
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.keep_alive = False  # busy: answer, then close
            elif not self.transport.is_closing():
                self._idle_close = self.loop.call_later(IDLE_GRACE_S, self._close_if_idle)

        def _close_if_idle(self) -> None:
            self._idle_close = None
            idle = self.cycle is None or self.cycle.response_complete
            if idle and not self._reading and not self.transport.is_closing():
                self.transport.close()

        def _cancel_idle_close(self) -> None:
            if self._idle_close is not None:
                self._idle_close.cancel()
                self._idle_close = None

        def connection_lost(self, exc) -> None:
            self._disarm()
            self._cancel_idle_close()
            callback, self._on_disconnect = self._on_disconnect, None
            if callback is not None and self.cycle is not None and not self.cycle.response_complete:
                callback()
            super().connection_lost(exc)

        def _notify_on_disconnect(self, callback: Callable[[], None]) -> None:
            self._on_disconnect = callback

        def _arm(self) -> None:
            self._read_by = self.loop.time() + read_timeout_s

        def _disarm(self) -> None:
            self._read_by = None

    async def sweep(connections: set) -> None:
        """Close the connections past their read deadline, every ``period``, for as long as any is open."""
        loop = asyncio.get_running_loop()
        while connections:
            await asyncio.sleep(period)
            now = loop.time()
            for connection in list(connections):
                read_by = getattr(connection, "_read_by", None)
                if read_by is not None and read_by <= now and not connection.transport.is_closing():
                    connection._read_by = None
                    connection.transport.close()

    return ServiceHttpProtocol
