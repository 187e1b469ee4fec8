"""``python -m service``: check the model, then serve it with uvicorn; SIGTERM drains before exit."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from . import logs
from .app import FastLane, ServiceState, create_app
from .errors import ArtifactError
from .protocol import http_protocol
from .settings import Settings

log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: readiness turns 503 at once; after ``drain_seconds`` uvicorn stops accepting,
    finishes the requests it has (the lifespan then drains the batch queue) and exits."""

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame) -> None:
        if self.state.draining:  # a second signal: no more waiting
            super().handle_exit(sig, frame)
            return
        self.state.draining = True
        delay = self.state.settings.drain_seconds
        log.info("draining", extra={"fields": {"signal": signal.Signals(sig).name, "drain_seconds": delay}})
        if delay > 0:
            timer = threading.Timer(delay, super().handle_exit, (sig, frame))
            timer.daemon = True
            timer.start()
        else:
            super().handle_exit(sig, frame)


def uvicorn_config(app, settings: Settings) -> uvicorn.Config:
    """How the service is served: our HTTP protocol (read deadline, disconnect notice), no access log from uvicorn."""
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                          log_level=settings.log_level, timeout_graceful_shutdown=int(settings.graceful_timeout_s),
                          server_header=False, proxy_headers=False, http=http_protocol(settings.read_timeout_s))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__,
                                     epilog="Every setting is also an environment variable: SCS_<NAME> (see README).")
    parser.add_argument("--model-dir", type=Path, help="models/<name> (newest version) or a version folder")
    parser.add_argument("--model-version", type=int, help="pin a version under --model-dir")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], help="onnxruntime execution provider")
    parser.add_argument("--max-batch-size", type=int, help="sentences per model run (1: batching off)")
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
    try:
        app = create_app(settings)
    except ArtifactError as error:
        log.error("refusing to start: %s", error)
        print(f"error: refusing to start: {error}", file=sys.stderr)
        return 2
    server = DrainingServer(uvicorn_config(FastLane(app), settings), app.state.service)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
