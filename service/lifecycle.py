"""The service's state: its settings, metrics and model repository, and where the process is in its life (starting,
ready, draining, failed).

Only the lifespan (``service.app``) and the server's signal handler (``service.server``) move it along, through
the methods below; routes only read it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import Enum

from .errors import NotReady, Unhealthy
from .metrics import Metrics
from .repository import Repository
from .settings import Settings

log = logging.getLogger("service")


class Phase(Enum):
    STARTING = "starting"  # listening, warming up: /readyz 503
    READY = "ready"
    DRAINING = "draining"  # after SIGTERM: /readyz 503, accepted work still served
    FAILED = "failed"  # a core task died or warm-up failed: /healthz 503, the process is stopping


class ServiceState:
    def __init__(self, settings: Settings, repository: Repository, metrics: Metrics, tracing=None) -> None:
        self.settings, self.repository, self.metrics = settings, repository, metrics
        self.tracing = tracing  # service.tracing.Tracing, or None: tracing off
        repository.on_failure = lambda error: self.fail(f"a batcher task died ({error!r})")
        self.phase = Phase.STARTING
        self.failure: str | None = None
        self.shutdown_deadline: float | None = None  # monotonic; set when the server starts shutting down
        self.unfinished = False  # shutdown gave up on queued work (the process then exits non-zero)
        self.on_failure: Callable[[str], None] | None = None  # set by the server: stop the process non-zero

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    def serving(self) -> None:
        """Raise unless requests may be queued now (warm, or draining: accepted work is still served)."""
        if self.phase is Phase.READY or self.phase is Phase.DRAINING:
            return
        if self.phase is Phase.FAILED:
            raise Unhealthy(self.failure or "failed")
        self.metrics.reject("not_ready")
        raise NotReady()

    def mark_ready(self) -> None:
        if self.phase is Phase.STARTING:
            self.phase = Phase.READY

    def start_draining(self) -> None:
        if self.phase is not Phase.FAILED:
            self.phase = Phase.DRAINING

    def begin_shutdown(self) -> None:
        """The port is closing: from now on, everything accepted has ``graceful_timeout_s`` in all to finish."""
        if self.shutdown_deadline is None:
            self.shutdown_deadline = time.monotonic() + self.settings.graceful_timeout_s

    def time_left(self) -> float:
        if self.shutdown_deadline is None:
            return self.settings.graceful_timeout_s
        return max(0.0, self.shutdown_deadline - time.monotonic())

    def fail(self, reason: str) -> None:
        """Something the service cannot serve without broke: report unhealthy and have the process stop."""
        if self.phase is Phase.FAILED:
            return
        self.phase, self.failure = Phase.FAILED, reason
        log.critical("service failed: %s", reason)
        if self.on_failure is not None:
            self.on_failure(reason)
