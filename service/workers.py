"""``SCS_WORKERS`` > 1: one supervisor and that many server processes on one port.

Why processes: a request's Python work (HTTP, validation, tokenizing, queueing) runs on one event loop, which
one core bounds however many model threads it feeds; each worker is a whole service (its own event loop,
batcher and onnxruntime session, one model thread), so N of them use N cores. Measured on this project's 2-core
machine with 64-text requests: README, "Every core".

The supervisor checks the models once before the port opens (a broken artifact exits 2 with one line, as with one
process), opens one socket per worker on the port (a ``SO_REUSEPORT`` group: the kernel spreads new connections
evenly) and starts the workers (spawned, in their own process group so a terminal's Ctrl-C reaches only the
supervisor, and told to stop if it dies). A worker takes connections only once its models are warm. SIGTERM or
SIGINT: the supervisor closes its own copies of the sockets and passes the signal on; each worker drains
(``service.server``), and the supervisor exits 0 once every one of them drained cleanly; a second signal makes
them stop at once. A worker that dies unasked (any signal, any exit) is logged and replaced by a fresh one on its
socket, while the others keep serving; only ``worker_crash_limit`` deaths within ``worker_crash_window_s`` (a
crash loop) stop the service, with exit code 3. Metrics are prometheus-client's multiprocess mode: any worker's
``/metrics`` sums what every worker counted, the dead ones' counters included.

gRPC (``SCS_GRPC_PORT``): grpcio's Python API binds an address and cannot adopt a socket the supervisor holds, so
each worker binds the gRPC port itself, once warm, in a SO_REUSEPORT group with the others (the supervisor first
checks that no other process holds the port). A replacement joins the group; a dead worker's unaccepted gRPC
connections are reset with it (its HTTP ones wait on the socket the supervisor keeps).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from multiprocessing.process import BaseProcess
from pathlib import Path

from prometheus_client import multiprocess

from contract import ArtifactError

from .metrics import Metrics
from .repository import Repository
from .server import FAILED, cannot_listen, check_grpc_port, listen, serve, stop_cleanly_until_serving
from .settings import Settings

log = logging.getLogger("service.workers")


def cpus_allowed() -> int:
    """The CPUs this process may use: its affinity, bounded by a cgroup CPU quota (containers, Kubernetes)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = None
    try:  # cgroup v2: "max 100000" or "200000 100000"
        limit, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if limit != "max":
            quota = int(limit) / int(period)
    except (OSError, ValueError):
        try:  # cgroup v1
            limit = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            if limit > 0:
                quota = limit / period
        except (OSError, ValueError):
            pass
    if quota is not None:
        count = min(count, max(1, int(quota)))
    return max(1, count)


def exit_code(process: BaseProcess) -> int:
    """A process's exit status as a shell reports it: killed by signal N is 128 + N."""
    code = process.exitcode or 0
    return 128 - code if code < 0 else code


def cause(process: BaseProcess) -> str:
    """Why a process ended, as a metric label: the signal that killed it (``SIGKILL``) or ``exit_<code>``."""
    code = process.exitcode or 0
    if code >= 0:
        return f"exit_{code}"
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal_{-code}"


class Supervisor:
    """Keeps a worker serving on each of ``listeners`` until a signal stops them or they crash in a loop. The
    supervisor keeps its own copy of each worker's socket, so a replacement takes over the socket of the worker it
    replaces, with the connections queued on it: they wait for it rather than being reset."""

    def __init__(self, settings: Settings, listeners: list[socket.socket]) -> None:
        self.settings, self.listeners = settings, listeners
        self.dump = settings.model_dump()
        self.context = multiprocessing.get_context("spawn")
        self.workers: dict[int, BaseProcess] = {}
        self.stopping = False
        self.crash_loop: str | None = None
        self.deaths: deque[float] = deque()  # monotonic times of the recent deaths
        self.codes: list[int] = []  # the exit codes of the workers that were asked to stop

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        for index in range(len(self.listeners)):
            self.start(index)
        log.info("workers started", extra={"fields": {"workers": len(self.listeners),
                                                      "pids": [p.pid for p in self.workers.values()]}})
        try:
            while self.workers:
                multiprocessing.connection.wait([p.sentinel for p in self.workers.values()], timeout=1.0)
                for index, process in list(self.workers.items()):
                    if process.exitcode is not None:
                        del self.workers[index]
                        self.ended(index, process)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for listener in self.listeners:
                listener.close()
        if self.crash_loop is not None:
            print(f"error: {self.crash_loop}", flush=True, file=sys.stderr)
            return FAILED
        return max(self.codes, default=0)

    def start(self, index: int, replacing: str | None = None) -> None:
        process = self.context.Process(target=_worker, args=(self.dump, self.listeners[index], index, replacing),
                                       name=f"worker-{index}")
        process.start()
        self.workers[index] = process

    def stop(self, sig: int, frame=None) -> None:
        """Signal handler: the first signal drains every worker, a second stops them at once."""
        if not self.stopping:
            self.stopping = True
            for listener in self.listeners:  # the workers' copies keep them, and their queues, until drained
                listener.close()
        for process in self.workers.values():
            if process.is_alive():
                os.kill(process.pid, sig)

    def ended(self, index: int, process: BaseProcess) -> None:
        _mark_dead(process.pid)
        if self.stopping:
            self.codes.append(exit_code(process))
            return
        why = cause(process)
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - self.settings.worker_crash_window_s:
            self.deaths.popleft()
        if len(self.deaths) >= self.settings.worker_crash_limit:
            self.crash_loop = (f"{len(self.deaths)} workers died within {self.settings.worker_crash_window_s:g} s "
                               f"(the last: worker {index}, {why}): a crash loop, stopping the service "
                               f"(SCS_WORKER_CRASH_LIMIT={self.settings.worker_crash_limit})")
            log.error(self.crash_loop)
            self.stop(signal.SIGTERM)
            return
        log.error("worker died: replacing it", extra={"fields": {"index": index, "pid": process.pid, "cause": why}})
        self.start(index, replacing=why)


def _mark_dead(pid: int) -> None:
    """Drop a finished worker's live gauges from the shared metrics (its counters stay: they still count)."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        multiprocess.mark_process_dead(pid)


def supervise(settings: Settings, workers: int) -> int:
    """Run ``workers`` server processes on one socket until they stop; the exit code ``python -m service`` gives."""
    try:  # the same checks each worker repeats, once, before anything listens
        check = Repository(settings, Metrics())
        check.load_at_start()
        check.executor.shutdown(wait=False)
        del check
    except ArtifactError as error:
        log.error("refusing to start: %s", error)
        print(f"error: refusing to start: {error}", flush=True, file=sys.stderr)
        return 2
    try:
        listeners = listen(settings, workers)
    except OSError as error:
        return cannot_listen(settings, error)
    try:
        check_grpc_port(settings)
    except OSError as error:
        for listener in listeners:
            listener.close()
        return cannot_listen(settings, error, grpc=True)
    metrics_dir = tempfile.mkdtemp(prefix="scs-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # the workers inherit it before importing the client
    try:
        return Supervisor(settings, listeners).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _worker(dump: dict, listener: socket.socket, index: int, replacing: str | None) -> None:
    """One server process: the service as ``python -m service`` runs it, on the supervisor's socket."""
    os.setpgrp()  # a terminal's Ctrl-C reaches the supervisor only; it passes the signal on
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: stop with it
    except (OSError, AttributeError):
        pass
    stop_cleanly_until_serving()
    raise SystemExit(serve(Settings(**dump), listener, worker=index, replacing=replacing))
