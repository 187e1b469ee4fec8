"""The HTTP protocol ``python -m service`` gives uvicorn: httptools, plus a read deadline and a disconnect notice.

- Read deadline: a connection must deliver a whole request (head and body) within ``read_timeout_s`` of
  opening or of its previous answer, or it is closed. uvicorn alone waits forever for a first request or
  for the rest of a partial one (slowloris); its keep-alive timeout only covers idle time after an answer.
- Disconnect notice: ASGI tells an app that its client left only through a pending ``receive()``, which
  costs the app a watcher task per request. This protocol offers the ASGI server extension
  ``scope["extensions"][DISCONNECT_NOTICE]``: call it with a callback, and the callback runs if the
  connection is lost before the response is complete. ``/classify`` uses it when present (a watcher task
  otherwise), so a client that leaves still costs no model run.
"""

from __future__ import annotations

from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DISCONNECT_NOTICE = "scs.on_disconnect"


def http_protocol(read_timeout_s: float) -> type[HttpToolsProtocol]:
    class ServiceHttpProtocol(HttpToolsProtocol):
        _read_deadline = None
        _on_disconnect: Callable[[], None] | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._on_disconnect = None
            self.scope.setdefault("extensions", {})[DISCONNECT_NOTICE] = self._notify_on_disconnect

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def on_response_complete(self) -> None:
            self._on_disconnect = None
            super().on_response_complete()
            if self.timeout_keep_alive_task is not None:  # idle now (not a pipelined request starting)
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            callback, self._on_disconnect = self._on_disconnect, None
            if callback is not None and self.cycle is not None and not self.cycle.response_complete:
                callback()
            super().connection_lost(exc)

        def _notify_on_disconnect(self, callback: Callable[[], None]) -> None:
            self._on_disconnect = callback

        def _arm(self) -> None:
            self._disarm()
            self._read_deadline = self.loop.call_later(read_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _too_slow(self) -> None:
            self._read_deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return ServiceHttpProtocol
