"""What the tests share: the test artifact and copies of it to break, real services on 127.0.0.1 (a process, or
uvicorn in a thread), the error-shape assertion, metrics reading, sample texts, and running a CLI."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

import contract

from loadtest.data import metric as metric_sum, read_sentences, scrape
from loadtest.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
TEST_ARTIFACT = ROOT / "artifacts" / "test-model" / "1"
SHIPPED = ROOT / "models" / "banking77" / "1"
TEST_CSV = ROOT / "data" / "banking77" / "test.csv"
TEXT = "I still have not received my new card, I ordered over a week ago."


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that need a virtualenv besides .venv (marked ``venv``) run last: `make test` makes those virtualenvs
    in the background (tests/venvs.py) while the others run. (With pytest-xdist every worker collects and orders
    the same way, and the scheduler hands tests out in this order.)"""
    items.sort(key=lambda item: item.get_closest_marker("venv") is not None)


def sentences() -> list[str]:
    """The 3,080 Banking77 test sentences."""
    return read_sentences(TEST_CSV)


def alone(folder: Path, texts: list[str]) -> np.ndarray:
    """Reference: each sentence run by itself (batch of one, no padding) in a plain onnxruntime session."""
    artifact = contract.check(folder)
    manifest = artifact.manifest
    ids = artifact.encoder.encode(texts)[0]
    return np.concatenate([artifact.session.run(None, contract.inputs([s], manifest.pad_id, manifest.input_names))[0]
                           for s in ids])


@pytest.fixture(scope="session")
def test_artifact() -> Path:
    """The small artifact built by ``make test-artifact``; fails (never skips) when it is missing."""
    if not (TEST_ARTIFACT / "manifest.json").is_file():
        pytest.fail(f"{TEST_ARTIFACT.relative_to(ROOT)} is missing: run `make test-artifact` first")
    return TEST_ARTIFACT


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory: pytest.TempPathFactory):
    """``hf_folder(kind)``: a tiny fine-tuned-looking Hugging Face classifier folder of that kind
    (``tests/hf_models.py``: bert, distilbert, roberta, xlm-roberta, bert-multilabel, bert-slow), built on first
    use, once per session; never downloaded."""
    from hf_models import build

    root, built = tmp_path_factory.mktemp("hf-models"), {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = build(kind, root / kind)
        return built[kind]

    return get


@pytest.fixture(scope="session")
def imported_encoder(hf_folder, tmp_path_factory: pytest.TempPathFactory):
    """``imported_encoder(kind)``: ``hf_folder(kind)`` imported by ``python -m model_export import`` (run in this
    process) as the version folder ``<tmp>/<kind>/1``, once per session."""
    from model_export.cli import main

    root, done = tmp_path_factory.mktemp("imported"), {}

    def get(kind: str) -> Path:
        if kind not in done:
            out = root / kind / "1"
            assert main(["import", str(hf_folder(kind)), "--out", str(out)]) == 0, kind
            done[kind] = out
        return done[kind]

    return get


@pytest.fixture
def artifact_copy(test_artifact: Path, tmp_path: Path) -> Path:
    """A copy of the test artifact as ``<tmp>/model/1``, to break."""
    folder = tmp_path / "model" / "1"
    shutil.copytree(test_artifact, folder)
    return folder


def edit_manifest(folder: Path, **changes: object) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def rehash(folder: Path, name: str) -> None:
    """Record ``name``'s current sha256 in the manifest (a change the hash check alone cannot catch)."""
    edit_manifest(folder, files=json.loads((folder / "manifest.json").read_text())["files"] | {
        name: {"sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest(), "bytes": (folder / name).stat().st_size}})


def _truncate(folder: Path, rehashed: bool) -> None:
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])
    if rehashed:
        rehash(folder, "model.onnx")


def _replace(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text)
    rehash(folder, name)


def _drop_key(folder: Path, key: str) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest[key]
    (folder / "manifest.json").write_text(json.dumps(manifest))


# Every way the tests break a copy of the test artifact, and what the refusal must say (one line, naming the file).
# contract.check, `python -m model_export check` and `python -m service` are each tried on all of them.
BROKEN_ARTIFACTS = {
    "model.onnx missing": (lambda f: (f / "model.onnx").unlink(), "model.onnx: missing"),
    "model.onnx truncated": (lambda f: _truncate(f, False), "model.onnx: sha256 differs"),
    "model.onnx truncated, hash fixed": (lambda f: _truncate(f, True), "model.onnx"),
    "model.onnx not ONNX": (lambda f: _replace(f, "model.onnx", "\xff not onnx"), "model.onnx"),
    "labels.json not a list": (lambda f: _replace(f, "labels.json", '{"a": 1}'), "labels.json: expected a list"),
    "labels.json one short": (lambda f: _replace(f, "labels.json", json.dumps([f"c{i}" for i in range(76)])),
                              "num_classes=77"),
    "tokenizer.json not a tokenizer": (lambda f: _replace(f, "tokenizer.json", '{"not": "a tokenizer"}'),
                                       "tokenizer.json: cannot load"),
    "tokenizer size disagrees": (lambda f: edit_manifest(f, vocab_size=json.loads(
        (f / "manifest.json").read_text())["vocab_size"] + 5), "vocab_size"),
    "unk_id outside the tokenizer": (lambda f: edit_manifest(f, unk_id=10**6), "unk_id=1000000 outside the tokenizer"),
    "manifest key missing": (lambda f: _drop_key(f, "pad_id"), "manifest.json: missing 'pad_id'"),
    "manifest value of the wrong type": (lambda f: edit_manifest(f, max_length=True), "manifest.json: max_length"),
    "manifest not JSON": (lambda f: (f / "manifest.json").write_text("{not json"), "manifest.json: not valid JSON"),
    "opset disagrees with the graph": (lambda f: edit_manifest(f, opset=99), "graph opset 17, manifest says 99"),
}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """The service's one error shape: ``{"error": {"code", "message", "details"}}``, JSON, the given status."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def burst_in_background(url: str, requests: int, text: str, texts: int = 64) -> tuple[threading.Thread, list]:
    """``requests`` concurrent /classify requests of ``texts`` sentences each, sent from a thread (one connection
    each); the thread and the list their responses (or exceptions) land in, in order, once it ends."""
    results: list = []

    async def burst() -> list:
        limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
            bodies = [{"texts": [f"{text} {i} {j}" for j in range(texts)]} for i in range(requests)]
            return await asyncio.gather(*(client.post("/classify", json=body) for body in bodies),
                                        return_exceptions=True)

    sender = threading.Thread(target=lambda: results.extend(asyncio.run(burst())))
    sender.start()
    return sender, results


def wait_for(condition, seconds: float = 30) -> bool:
    """Whether ``condition()`` became true within ``seconds`` (polled every 50 ms)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def read_metric(url: str, name: str, **labels: str) -> float:
    """Sum of the /metrics samples named ``name`` whose labels include these (0 when none)."""
    return metric_sum(scrape(url), name, **labels)


@pytest.fixture
def metric():
    """``metric(url, name, **labels)``: read one Prometheus sample sum from a running service."""
    return read_metric


def run_cli(module: str, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``python -m <module> args...`` from the repository root; its exit code and output."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=os.environ | env)


def assert_one_line_error(result: subprocess.CompletedProcess, says: str, code: int = 2) -> str:
    """A user error: the given exit code, a last stderr line ``error: ...`` containing ``says``, no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and says in last, result.stderr[-2000:]
    return last


@dataclass
class ServiceProcess:
    process: subprocess.Popen
    url: str
    log: Path
    grpc: str = ""  # host:port of its gRPC service ("" when off)

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


def start_service(model_dir: Path, log: Path, ready_timeout: float = 60, argv: list[str] | None = None,
                  **env: object) -> ServiceProcess:
    """``python -m service`` on a free 127.0.0.1 port (and gRPC on another, unless ``GRPC_PORT=0``) with
    ``SCS_<KEY>`` settings; returns once /readyz is 200. ``argv`` replaces ``-m service`` (for a real server started
    with a fault injected first)."""
    port = free_port()
    # one process unless a test asks for more (the default follows the CPUs); gRPC never on its shared default port
    env = {"WORKERS": 1, "GRPC_PORT": free_port()} | env
    environment = os.environ | {f"SCS_{k.upper()}": str(v) for k, v in env.items()} | {"PYTHONUNBUFFERED": "1"}
    handle = log.open("wb")
    command = [sys.executable, *(argv or ["-m", "service"]), "--model-dir", str(model_dir), "--host", "127.0.0.1",
               "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=handle, stderr=handle)
    service = ServiceProcess(process, f"http://127.0.0.1:{port}", log,
                             f"127.0.0.1:{env['GRPC_PORT']}" if int(env["GRPC_PORT"]) else "")
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
def kserve_python() -> Path:
    """A virtualenv with the kserve package (its own pins: psutil<6 clashes with the project's), for its REST and
    gRPC clients (tests/test_service_v2.py, tests/test_service_grpc.py), from tests/venvs.py: made once, or by
    `make test` while the tests before these ran."""
    import venvs

    made = venvs.ensure("kserve")
    assert made.returncode == 0, made.stderr[-3000:]
    return made.python


def kserve_client(python: Path, script: str, target: str, texts: list[str]) -> dict:
    """Run a kserve client ``script`` (argv: target, texts as JSON; prints one JSON line) against a service; what it
    saw, once it said the server is live and ready and the test model ready."""
    result = subprocess.run([str(python), "-c", script, target, json.dumps(texts)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["live"] is True and seen["ready"] is True and seen["model_ready"] is True
    return seen


@pytest.fixture(scope="session")
def service(test_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One service on the test artifact, default settings, shared by the tests of a session."""
    service = start_service(test_artifact, tmp_path_factory.mktemp("service") / "service.log")
    yield service
    service.stop()


@dataclass
class Served:
    url: str
    app: object  # service.app.App
    grpc: str = ""  # host:port of its gRPC service ("" when off)


@contextmanager
def in_process(runtime, plain_uvicorn: bool = False, **settings) -> Iterator[Served]:
    """The real app on a real uvicorn in a thread, 127.0.0.1, served as ``python -m service`` serves it
    (``uvicorn_config``: our protocol) or, with ``plain_uvicorn``, with uvicorn's defaults (no server extension).
    Yields the base URL and the app once /readyz is 200; ``runtime`` may carry an injected fault."""
    import uvicorn

    from service.server import uvicorn_config
    from service.app import create_app
    from service.settings import Settings

    port = free_port()
    # gRPC off unless asked for (grpc_port=free_port()); the response cache too: these tests watch the model path
    settings = {"grpc_port": 0, "cache_max_bytes": 0} | settings
    config = Settings(model_dir=runtime.artifact.folder, host="127.0.0.1", port=port, **settings)
    app = create_app(config, runtime)
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
        yield Served(url, app, f"127.0.0.1:{config.grpc_port}" if config.grpc_port else "")
    finally:
        server.should_exit = True
        thread.join(30)
