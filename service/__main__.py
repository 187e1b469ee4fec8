"""``python -m service``: check the model, then serve it with uvicorn.

Exit codes: 0 after a clean stop (SIGTERM or Ctrl-C, everything accepted answered); 1 when shutdown gave up on
queued work (``SCS_GRACEFUL_TIMEOUT_S``) or the port could not be opened; 2 for bad settings or a model that
breaks the contract (one line on stderr); 3 when the service failed while running (the batcher task died or
warm-up failed: a supervisor should restart it); 128 + the signal number when a second signal cut the drain short.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from contract import ArtifactError

from . import logs
from .app import App, create_app
from .errors import StartupError
from .protocol import http_protocol
from .settings import Settings
from .state import ServiceState
from .workers import cpus_allowed, supervise

log = logging.getLogger("service")
FAILED = 3


class Server(uvicorn.Server):
    """uvicorn's server with the service's shutdown.

    First SIGTERM or SIGINT: readiness turns 503 at once; after ``drain_seconds`` the port closes, and every
    accepted request (queued and running sentences included) gets what is left of one ``graceful_timeout_s``
    deadline. A second signal exits at once. Unlike plain uvicorn, a clean stop exits 0 rather than re-raising
    the signal it caught.
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

    async def shutdown(self, sockets=None) -> None:
        self.state.begin_shutdown()
        await super().shutdown(sockets)


def uvicorn_config(app: App, settings: Settings) -> uvicorn.Config:
    """How the service is served: our HTTP protocol (read deadline, disconnect notice), no access log from uvicorn,
    and uvicorn's wait for running requests bounded by the one shutdown deadline."""
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                          log_level=settings.log_level, timeout_graceful_shutdown=settings.graceful_timeout_s,
                          server_header=False, proxy_headers=False, lifespan="on",
                          http=http_protocol(settings.read_timeout_s))


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other error of this command
        self.exit(2, f"error: {message} (see python -m service --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="python -m service", description=__doc__.splitlines()[0],
                                     epilog="Every setting is also an environment variable: SCS_<NAME> (see README).")
    parser.add_argument("--model-dir", type=Path, help="models/<name> (newest version) or a version folder")
    parser.add_argument("--model-version", type=int, help="pin a version under --model-dir")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], help="onnxruntime execution provider")
    parser.add_argument("--max-batch-size", type=int, help="sentences per model run (1: batching off)")
    parser.add_argument("--workers", type=int, help="server processes (default: the CPUs this process may use)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {key: value for key, value in vars(args).items() if value is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors())
        print(f"error: invalid settings: {problems}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    workers = settings.workers or cpus_allowed()
    if workers > 1:
        return supervise(settings, workers)
    return serve(settings)


def serve(settings: Settings, sockets: list | None = None, worker: int | None = None) -> int:
    """One server process: load and check the models, serve until stopped; its exit code."""
    if worker is not None:
        logs.configure(settings.log_level, settings.log_format, worker=worker)
    try:
        app = create_app(settings)
    except (ArtifactError, StartupError) as error:
        log.error("refusing to start: %s", error)
        print(f"error: refusing to start: {error}", file=sys.stderr)
        return 2
    server = Server(uvicorn_config(app, settings), app.state)
    server.run(sockets=sockets)
    if not server.started:
        return 1  # uvicorn logged why (port in use, address not available)
    if app.state.unfinished:  # a model run outlived the deadline: do not wait for its thread at interpreter exit
        logging.shutdown()
        os._exit(1)
    return server.exit_code


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before the server took over the signals (while the model loads)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
