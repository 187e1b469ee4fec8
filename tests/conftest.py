"""Shared fixtures: the test artifact, free ports, and real service processes on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_ARTIFACT = ROOT / "artifacts" / "test-model" / "1"


@pytest.fixture(scope="session")
def test_artifact() -> Path:
    """The small artifact built by ``make test-artifact``; fails (not skips) when it is missing."""
    if not (TEST_ARTIFACT / "manifest.json").is_file():
        pytest.fail(f"{TEST_ARTIFACT.relative_to(ROOT)} is missing: run `make test-artifact` first")
    return TEST_ARTIFACT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_metric(url: str, name: str, **labels: str) -> float:
    """Sum of the /metrics samples named ``name`` with exactly these labels (0 when absent)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(wanted + " "))


@pytest.fixture
def metric():
    """``metric(url, name, **labels)``: read one Prometheus sample sum from a running service."""
    return read_metric


@dataclass
class ServiceProcess:
    process: subprocess.Popen
    url: str
    log: Path

    def metric(self, name: str, **labels: str) -> float:
        return read_metric(self.url, name, **labels)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start_service(model_dir: Path, log: Path, ready_timeout: float = 60, **env: object) -> ServiceProcess:
    """``python -m service`` on a free 127.0.0.1 port with ``SCS_<KEY>`` settings; returns once /readyz is 200."""
    port = free_port()
    environment = os.environ | {f"SCS_{k.upper()}": str(v) for k, v in env.items()} | {"PYTHONUNBUFFERED": "1"}
    handle = log.open("wb")
    process = subprocess.Popen([sys.executable, "-m", "service", "--model-dir", str(model_dir), "--host", "127.0.0.1",
                                "--port", str(port)], cwd=ROOT, env=environment, stdout=handle, stderr=handle)
    service = ServiceProcess(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"service exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{service.url}/readyz", timeout=1).status_code == 200:
                return service
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    service.stop(signal.SIGKILL)
    raise RuntimeError(f"service not ready within {ready_timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator:
    """Start services with custom settings: ``service_factory(model_dir, MAX_BATCH_SIZE=1)``; all stop at teardown."""
    started: list[ServiceProcess] = []

    def factory(model_dir: Path, **env: object) -> ServiceProcess:
        service = start_service(model_dir, tmp_path / f"service-{len(started)}.log", **env)
        started.append(service)
        return service

    yield factory
    for service in started:
        service.stop()


@pytest.fixture(scope="session")
def service(test_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One service on the test artifact, default settings, shared by the tests of a session."""
    service = start_service(test_artifact, tmp_path_factory.mktemp("service") / "service.log")
    yield service
    service.stop()


@contextmanager
def in_process(runtime, plain_uvicorn: bool = False, **settings):
    """The real app (FastLane) on a real uvicorn in a thread, 127.0.0.1, served as ``python -m service`` serves
    it (``uvicorn_config``) or, with ``plain_uvicorn``, with uvicorn's own defaults (no server extensions)."""
    import uvicorn

    from service.__main__ import uvicorn_config
    from service.app import FastLane, create_app
    from service.settings import Settings

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = Settings(model_dir=runtime.artifact.folder, host="127.0.0.1", port=port, **settings)
    app = FastLane(create_app(config, runtime))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
                            if plain_uvicorn else uvicorn_config(app, config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
