"""One server process: uvicorn with the service's HTTP protocol, signals, drain and exit codes.

Exit codes (README, "Exit codes"): 0 after a clean stop (SIGTERM or Ctrl-C, everything accepted answered); 1 when
shutdown gave up on queued work (``SCS_GRACEFUL_TIMEOUT_S``) or a port (HTTP or gRPC) could not be opened; 2 for bad settings or
a model that breaks the contract (one line on stderr); 3 when the service failed while running (a batcher task
died, warm-up failed: a supervisor should restart it); 128 + the signal number when a second signal cut the drain
short.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from contract import ArtifactError

from . import logs
from .app import App, create_app
from .errors import StartupError
from .http_protocol import http_protocol
from .lifecycle import ServiceState
from .settings import Settings

log = logging.getLogger("service")
FAILED = 3


class Server(uvicorn.Server):
    """uvicorn's server with the service's shutdown.

    First SIGTERM or SIGINT: readiness turns 503 at once; after ``drain_seconds`` the port closes, and every
    accepted request (queued and running sentences included) gets what is left of one ``graceful_timeout_s``
    deadline. Nothing accepted is dropped on the way: connections the kernel completed but nobody accepted yet are
    accepted and served, and every connection, idle or busy, is answered before it closes (the protocol's drain,
    ``service.http_protocol``). The gRPC port closes at the same moment: gRPC sends GOAWAY (a client retries a call
    the server never took on a new connection) and answers the calls in flight within the same deadline. A second signal exits at once. Unlike plain uvicorn, a clean stop exits 0 rather
    than re-raising the signal it caught.
    """

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self.state = state
        self.exit_code = 0
        self.signalled = False
        state.on_failure = self.fail

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        name = signal.Signals(sig).name
        if self.signalled:
            log.warning("second signal (%s): exiting now, without waiting for queued work", name)
            logging.shutdown()
            os._exit(128 + sig)
        self.signalled = True
        delay = self.state.settings.drain_seconds
        log.info("draining", extra={"fields": {"signal": name, "drain_seconds": delay}})
        self.state.start_draining()
        if delay > 0:
            timer = threading.Timer(delay, self._close)
            timer.daemon = True
            timer.start()
        else:
            self._close()

    def fail(self, reason: str) -> None:
        """A core task died: stop (answering what can be answered) and exit ``FAILED`` for the supervisor."""
        self.exit_code = FAILED
        self._close()

    def _close(self) -> None:
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.state.begin_shutdown()
        protocol = self.config.http_protocol_class
        protocol.draining = True  # every connection from now on answers once more, with Connection: close
        self._serve_backlog(sockets or [])
        # gRPC closes its port with HTTP's: no new call from now on, the calls in flight finish within the deadline.
        grpc_stopped = self.config.app.stop_grpc(self.state.time_left())
        await super().shutdown(sockets)
        await grpc_stopped
        self.config.app.release_grpc()

    def _serve_backlog(self, sockets: list[socket.socket]) -> None:
        """Accept what the kernel already queued on the listening sockets, so closing them resets no client that
        connected and sent its request (with several workers the last to close leaves nothing queued)."""
        loop = asyncio.get_running_loop()
        factory = functools.partial(self.config.http_protocol_class, config=self.config,
                                    server_state=self.server_state, app_state=self.lifespan.state)
        for listener in sockets:
            while True:
                try:
                    connection, _ = listener.accept()
                except (BlockingIOError, InterruptedError, OSError):
                    break
                connection.setblocking(False)
                loop.create_task(loop.connect_accepted_socket(factory, connection))


def uvicorn_config(app: App, settings: Settings) -> uvicorn.Config:
    """How the service is served: our HTTP protocol (read deadline, disconnect notice, drain), no access log from
    uvicorn, and uvicorn's wait for running requests bounded by the one shutdown deadline."""
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                          log_level=settings.log_level, timeout_graceful_shutdown=settings.graceful_timeout_s,
                          server_header=False, proxy_headers=False, lifespan="on",
                          http=http_protocol(settings.read_timeout_s))


def listen(settings: Settings, count: int = 1) -> list[socket.socket]:
    """Listening sockets on ``host:port`` (``OSError`` if the port cannot be had): one, or for ``count`` workers a
    ``SO_REUSEPORT`` group of as many, one each, over which the kernel spreads new connections evenly. (With one
    shared socket, uvloop accepts every pending connection at each wake-up: a pool of keep-alive clients that
    connects at once lands on one worker, and the other cores idle.)"""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET

    def bound(port: int, group: bool) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if group:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((settings.host, port))
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
        return sock

    first = bound(settings.port, False)  # a port someone holds is refused, even by a group of their own
    if count == 1:
        return [first]
    port = first.getsockname()[1]
    first.close()
    group: list[socket.socket] = []
    try:
        for _ in range(count):
            group.append(bound(port, True))
    except OSError:
        for sock in group:
            sock.close()
        raise
    return group


def cannot_listen(settings: Settings, error: OSError, grpc: bool = False) -> int:
    where = f"{settings.grpc_host or settings.host}:{settings.grpc_port} for gRPC" if grpc else \
        f"{settings.host}:{settings.port}"
    print(f"error: cannot listen on {where} ({error.strerror})", flush=True, file=sys.stderr)
    return 1


def check_grpc_port(settings: Settings) -> None:
    """``OSError`` unless the gRPC port is free (the workers then bind it in a SO_REUSEPORT group of their own; a
    port another process holds is refused, even one it holds in a group)."""
    if settings.grpc_port:
        host = settings.grpc_host or settings.host
        probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, settings.grpc_port))
        finally:
            probe.close()


def stop_cleanly_until_serving() -> None:
    """Until the server takes the signals over, SIGTERM (the models are still loading) exits 0: nothing was
    accepted yet, so nothing is lost."""
    signal.signal(signal.SIGTERM, _exit_cleanly)


def _exit_cleanly(sig: int, frame) -> None:
    raise SystemExit(0)


def serve(settings: Settings, listener: socket.socket | None = None, worker: int | None = None,
          replacing: str | None = None) -> int:
    """One server process: load and check the models, serve until stopped; its exit code. ``listener``: this
    worker's socket from the supervisor (one is opened here otherwise); ``worker``: this worker's index, whose models warm
    up before it takes a connection (the socket is shared: others serve meanwhile); ``replacing``: why the worker
    this one replaces died (counted in ``scs_worker_replacements_total``)."""
    if worker is not None:
        logs.configure(settings.log_level, settings.log_format, worker=worker)
    try:
        app = create_app(settings, warm_before_serving=worker is not None)
    except (ArtifactError, StartupError) as error:
        log.error("refusing to start: %s", error)
        print(f"error: refusing to start: {error}", file=sys.stderr)
        return 2
    if replacing is not None:
        app.state.metrics.worker_replaced(replacing)
    if listener is None:
        try:
            [listener] = listen(settings)
        except OSError as error:
            return cannot_listen(settings, error)
    server = Server(uvicorn_config(app, settings), app.state)
    server.run(sockets=[listener])
    if not server.started:
        if app.grpc_failure:
            print(f"error: {app.grpc_failure}", flush=True, file=sys.stderr)
        return FAILED if app.state.failure else 1
    if app.state.unfinished:  # a model run outlived the deadline: do not wait for its thread at interpreter exit
        logging.shutdown()
        os._exit(1)
    return server.exit_code
