"""The ASGI application: the lifespan that runs the engine, and for every HTTP request one stack (request id,
metrics, in-flight count, then auth and CORS) in front of the routes: the hot route ``POST /classify`` as a raw
ASGI handler, everything else through FastAPI (``service.api``).

    uvicorn --factory service.app:create_app     # works; ``python -m service`` adds signals, drain and our protocol
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time

from contract import version_folder

from . import logs
from .api import create_api
from .asgi import respond
from .classify import ClassifyRoute
from .engine import Engine
from .errors import ServiceError
from .metrics import Metrics
from .runtime import Runtime, load_runtime
from .security import secure
from .settings import Settings
from .state import ServiceState

log = logging.getLogger("service.app")


class App:
    _ids = itertools.count(1)
    _prefix = os.urandom(4).hex()

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self.api = create_api(state)
        self.classify = ClassifyRoute(state)
        self.routes = secure(self._route, state.settings)
        self.access_log = logging.getLogger("service.access") if state.settings.access_log else None
        self.in_flight = 0
        state.metrics.bind(lambda: state.engine.queue_depth, lambda: self.in_flight)
        self._warmup: asyncio.Task | None = None

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.api(scope, receive, send)

    async def _route(self, scope, receive, send) -> None:
        if scope["path"] == "/classify":
            if scope["method"] == "POST":
                await self.classify(scope, receive, send)
            else:
                error = ServiceError(405, "method_not_allowed", "Method Not Allowed", headers={"Allow": "POST"})
                await respond(send, error.status, error.body(), headers=error.headers)
        else:
            await self.api(scope, receive, send)

    async def _http(self, scope, receive, send) -> None:
        """X-Request-ID in (if sane) or made, and out; per-request metrics; the optional access log."""
        rid = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                if 0 < len(value) <= 128 and value.isascii() and value.decode().isprintable():
                    rid = value.decode()
                break
        if rid is None:
            rid = f"{self._prefix}-{next(self._ids):x}"
        header = (b"x-request-id", rid.encode())
        token = logs.request_id.set(rid)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        self.in_flight += 1
        try:
            await self.routes(scope, receive, send_with_id)
        finally:
            self.in_flight -= 1
            seconds = time.perf_counter() - started
            self.state.metrics.observe_request(scope["path"], status, seconds)
            if self.access_log is not None:
                self.access_log.info("%s %s %d", scope["method"], scope["path"], status, extra={"fields": {
                    "method": scope["method"], "path": scope["path"], "status": status,
                    "duration_ms": round(seconds * 1000, 3)}})
            logs.request_id.reset(token)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _start(self) -> None:
        state = self.state
        state.engine.start(on_failure=lambda error: state.fail(f"the batcher task died ({error!r})"))
        self._warmup = asyncio.get_running_loop().create_task(self._warm_up(), name="warm-up")

    async def _warm_up(self) -> None:
        state = self.state
        try:
            milliseconds = await state.engine.warm_up()
        except Exception as error:
            log.exception("warm-up failed")
            state.fail(f"warm-up failed ({error!r})")
            return
        state.mark_ready()
        log.info("ready", extra={"fields": {"warmup_ms": round(milliseconds, 1), "provider": state.engine.provider}})

    async def _stop(self) -> None:
        """Queued and running sentences finish within what is left of the one shutdown deadline."""
        state = self.state
        state.start_draining()
        if self._warmup is not None and not self._warmup.done():
            self._warmup.cancel()
        if await state.engine.close(state.time_left()):
            log.info("stopped: queue drained")
        else:
            state.unfinished = True
            log.error("stopped with work still queued: it did not finish within graceful_timeout_s")


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> App:
    """The app for ``settings``; loads and checks the model unless ``runtime`` is given (``ArtifactError``)."""
    settings = settings or Settings()
    if runtime is None:
        runtime = load_runtime(version_folder(settings.model_dir, settings.model_version), settings.provider,
                               settings.intra_op_threads, settings.inter_op_threads)
    metrics = Metrics()
    metrics.model_info.labels(runtime.artifact.name, runtime.artifact.version, runtime.provider).set(1)
    engine = Engine(runtime, settings.batch_limits(), metrics)
    return App(ServiceState(settings, engine, metrics))
