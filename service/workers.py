"""``SCS_WORKERS`` > 1: one supervisor and that many server processes sharing one listening socket.

Why processes: a request's Python work (HTTP, validation, tokenizing, queueing) runs on one event loop, which
one core bounds however many model threads it feeds; each worker is a whole service (its own event loop,
batcher and onnxruntime session, one model thread), so N of them use N cores. Measured on this project's 2-core
machine with 64-text requests: README, "Every core".

The supervisor checks the models once before the port opens (a broken artifact exits 2 with one line, as with
one process), binds the socket, starts the workers (spawned, in their own process group so a terminal's Ctrl-C
reaches only the supervisor, and told to stop if it dies), and passes each SIGTERM or SIGINT on: the first
drains every worker, a second makes them stop at once. If a worker exits on its own (it failed: exit 3), the
supervisor stops the others and exits with that code, so the orchestrator restarts the whole service. Metrics
are prometheus-client's multiprocess mode: any worker's ``/metrics`` sums what every worker counted.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

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


def supervise(settings, workers: int) -> int:
    """Run ``workers`` server processes on one socket until they stop; the exit code ``python -m service`` gives."""
    from contract import ArtifactError

    from .metrics import Metrics
    from .repository import Repository

    try:  # the same checks each worker repeats, once, before anything listens
        check = Repository(settings, Metrics())
        check.load_at_start()
        check.executor.shutdown(wait=False)
        del check
    except ArtifactError as error:
        log.error("refusing to start: %s", error)
        print(f"error: refusing to start: {error}", flush=True, file=sys.stderr)
        return 2
    metrics_dir = tempfile.mkdtemp(prefix="scs-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # the workers inherit it before importing the client
    listener = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((settings.host, settings.port))
    except OSError as error:
        print(f"error: cannot listen on {settings.host}:{settings.port} ({error.strerror})", flush=True,
              file=sys.stderr)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        return 1
    listener.listen(2048)
    listener.set_inheritable(True)
    context = multiprocessing.get_context("spawn")
    dump = settings.model_dump()
    processes = [context.Process(target=_worker, args=(dump, listener, index), name=f"worker-{index}")
                 for index in range(workers)]
    for process in processes:
        process.start()
    log.info("workers started", extra={"fields": {"workers": workers, "pids": [p.pid for p in processes]}})
    signals: list[int] = []

    def forward(sig: int, frame) -> None:
        signals.append(sig)
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, sig)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        while any(process.is_alive() for process in processes):
            for process in processes:
                if process.exitcode is not None and not signals and code == 0:
                    # a worker stopped without being asked: take the service down with its code (a signal N:
                    # 128 + N; a clean exit nobody asked the supervisor for: 3, "failed while running")
                    code = (process.exitcode if process.exitcode > 0 else 128 - process.exitcode if process.exitcode
                            else 3)
                    log.error("worker %s exited with %s: stopping the others", process.name, process.exitcode)
                    forward(signal.SIGTERM, None)
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        listener.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    codes = [p.exitcode if p.exitcode >= 0 else 128 - p.exitcode for p in processes]
    return code or max(codes)


def _worker(dump: dict, listener: socket.socket, index: int) -> None:
    """One server process: the service as ``python -m service`` runs it, on the supervisor's socket."""
    os.setpgrp()  # a terminal's Ctrl-C reaches the supervisor only; it passes the signal on
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: stop with it
    except (OSError, AttributeError):
        pass
    from .__main__ import serve
    from .settings import Settings

    raise SystemExit(serve(Settings(**dump), [listener], worker=index))
