"""Child processes the harness starts: pinned to a core, in their own process group, always stopped.

Every child gets its own session (so Ctrl-C on the terminal reaches only the harness, which then stops the
children in order) and asks the kernel for SIGTERM if the harness dies without cleaning up (PDEATHSIG).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

TASKSET = shutil.which("taskset")
LIVE: dict[int, subprocess.Popen] = {}  # every child still running, by pid: what stop_all() stops
STARTED: dict[int, float] = {}  # monotonic start time of each child, for CPU per second in finish()
CAPTURED: dict[int, "tempfile._TemporaryFileWrapper"] = {}  # output files of children started with capture


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the harness exits (Linux; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def pinned(argv: list[str], cores: int | str | None) -> list[str]:
    """``argv`` run on CPU ``cores`` (one core, or a taskset list such as "0,1") with taskset, or unchanged when
    taskset is missing or the machine lacks one of those cores."""
    if cores is None or TASKSET is None:
        return argv
    wanted = [int(part) for part in str(cores).split(",")]
    if max(wanted) >= (os.cpu_count() or 1):
        return argv
    return [TASKSET, "-c", str(cores), *argv]


def spawn(argv: list[str], core: int | str | None, env: dict[str, str] | None = None, log: Path | None = None,
          capture: bool = False, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``argv`` pinned to ``core`` in a new session; stdout+stderr to ``log``, or kept for ``finish``.

    Captured output goes to an unnamed temporary file, not a pipe, so a chatty child never blocks.
    """
    if capture:
        out = tempfile.TemporaryFile()
    else:
        out = log.open("ab") if log else subprocess.DEVNULL
    try:
        process = subprocess.Popen(pinned(argv, core), env={**os.environ, **(env or {})}, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
                                   cwd=cwd)
    except BaseException:
        if out is not subprocess.DEVNULL:
            out.close()
        raise
    if capture:
        CAPTURED[process.pid] = out
    elif out is not subprocess.DEVNULL:
        out.close()
    LIVE[process.pid] = process
    STARTED[process.pid] = time.monotonic()
    return process


def stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the child's whole process group, SIGKILL it after ``grace`` seconds, reap it."""
    try:
        if process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout=5)
    finally:
        LIVE.pop(process.pid, None)
        STARTED.pop(process.pid, None)
        handle = CAPTURED.pop(process.pid, None)
        if handle is not None:
            handle.close()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error printed as one line (``error: ...``) rather than the usage text plus a line."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def interrupt_on_signals() -> None:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt``, so a run stops its children on either. SIGINT too: a
    process started in the background by a non-interactive shell inherits SIGINT ignored, and Python then
    installs no KeyboardInterrupt handler (measured: a CI run with `&` left Ctrl-C without effect)."""

    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def stop_all() -> None:
    for process in list(LIVE.values()):
        stop(process, grace=5.0)


def on_the_load_core() -> None:
    """A script's own process: Ctrl-C and SIGTERM stop its children (``interrupt_on_signals``), and it runs on
    core 1, away from the server pinned to core 0."""
    interrupt_on_signals()
    try:
        os.sched_setaffinity(0, {1})
    except (AttributeError, OSError):
        pass


def guarded(measure: Callable[[], int], errors: tuple[type[Exception], ...] = ()) -> int:
    """A script's measuring part: its exit code, 1 with a one-line error for a RuntimeError, a ValueError or one
    of ``errors``, 130 when interrupted; every child process is stopped whatever happens."""
    try:
        return measure()
    except (RuntimeError, ValueError, *errors) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: stopping every process started", file=sys.stderr)
        return 130
    finally:
        stop_all()


def verdict(problems: list[str]) -> int:
    """Print PASS or what failed; the exit code."""
    print("PASS" if not problems else "FAIL: " + "; ".join(problems))
    return 1 if problems else 0


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    """Wait for a child that ends by itself: (exit code, its output, CPU seconds per second it was alive).

    CPU time comes from the kernel's rusage of the reaped child (``os.wait4``), so it counts the load generator's
    own work whatever it is (wrk, Locust) up to its last instruction. This is the one CPU figure not read with
    psutil: psutil reads a process while it lives, and a child that has exited can only be read through the
    rusage its parent gets when reaping it. The wall time is from its start (``spawn``) to its exit.
    """
    deadline = time.monotonic() + timeout
    output = b""
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            stop(process, grace=2.0)
            raise TimeoutError(f"{process.args[0]} did not finish within {timeout:.0f}s")
        time.sleep(0.05)
    handle = CAPTURED.pop(process.pid, None)
    if handle is not None:
        handle.seek(0)
        output = handle.read()
        handle.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    LIVE.pop(process.pid, None)
    alive = max(1e-3, time.monotonic() - STARTED.pop(process.pid, time.monotonic()))
    return process.returncode, output.decode(errors="replace"), (usage.ru_utime + usage.ru_stime) / alive


@dataclass
class Server:
    """A server under test: the command that starts it, and the URL that answers 200 once it is ready."""

    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str = "/readyz"
    cwd: Path | None = None
    pausable: bool = True  # False: ``pause`` leaves it running (frozen, it would crash)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, core: int | str | None, log: Path, timeout: float = 180.0) -> None:
        """Start it and wait until ready; raise with the log's tail if it exits or never gets ready."""
        self.process = spawn(self.argv, core, self.env, log, cwd=self.cwd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.process.returncode}: {_tail(log)}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s: {_tail(log)}")

    def _tree(self) -> list[psutil.Process]:
        """The server's process and everything it started ([] once it is gone)."""
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except (psutil.Error, AttributeError):
            return []

    def cpu_seconds(self) -> float:
        """CPU time used so far by the server and its children (user + system), from psutil."""
        try:
            return sum(sum(proc.cpu_times()[:2]) for proc in self._tree())
        except psutil.Error:
            return 0.0

    def rss_bytes(self) -> int:
        """Resident memory of the server and its children (worker processes) now; 0 once it is gone."""
        try:
            return sum(proc.memory_info().rss for proc in self._tree())
        except psutil.Error:
            return 0

    def thread_cpu_seconds(self) -> dict[str, float]:
        """CPU seconds by thread role over the whole process tree: each process's main thread runs its event loop,
        its other threads run the model (onnxruntime and the batch's numpy work). The other threads' share is the
        process's time less the main thread's, so threads that ended (a thread pool's) still count."""
        split = {"event_loop": 0.0, "model": 0.0}
        try:
            for proc in self._tree():
                main = next((t.user_time + t.system_time for t in proc.threads() if t.id == proc.pid), 0.0)
                split["event_loop"] += main
                split["model"] += max(0.0, sum(proc.cpu_times()[:2]) - main)
        except psutil.Error:
            pass
        return split

    def pause(self) -> None:
        """Freeze the server and every process it started (SIGSTOP): an idle server must not take CPU from the one
        being measured (some frameworks poll their queues while idle; Triton's processes leave its group)."""
        if not self.pausable:
            return
        for proc in self._tree():
            try:
                proc.suspend()
            except psutil.Error:
                pass

    def resume(self) -> None:
        for proc in self._tree():
            try:
                proc.resume()
            except psutil.Error:
                pass

    def stop(self) -> None:
        if self.process is not None:
            self.resume()
            stop(self.process)


def core_busy_seconds(core: int | None) -> float | None:
    """CPU seconds core ``core`` has spent busy since boot, whoever ran (psutil's per-CPU times: everything but
    idle and iowait); None if unknown.

    Minus the server's own CPU time over a point, it tells how much other work shared the server's core:
    this machine is shared, and a point measured beside someone else's job is not the server's figure.
    """
    if core is None:
        return None
    try:
        times = psutil.cpu_times(percpu=True)[core]
    except (psutil.Error, OSError, IndexError):
        return None
    # guest and guest_nice are already counted in user and nice (Linux)
    idle = times.idle + sum(getattr(times, field, 0.0) for field in ("iowait", "guest", "guest_nice"))
    return sum(times) - idle


def _tail(log: Path, lines: int = 5) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:]) or "(no output)"
    except OSError:
        return "(no log)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
