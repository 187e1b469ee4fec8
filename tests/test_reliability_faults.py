"""Fault injection the service tests do not already cover (see RELIABILITY.md for the full map).

Covered elsewhere: a model run that raises (test_service_api), a client that leaves mid-queue
(test_service_api, measured by the model-run counter), hash mismatch and missing tokenizer at load time
(test_service_runtime). Here: a slow model on a real uvicorn (deadlines honoured, queue bounded, nothing
hangs) and every broken-artifact case through the real CLI (exits non-zero, names the file, no traceback).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conftest import in_process, read_metric

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_slow_model_keeps_deadlines_and_a_bounded_queue(test_artifact):
    """Every model run takes 0.2 s; 40 requests of 4 sentences arrive at once into a 32-sentence queue
    with a 1 s deadline: each is answered 200, refused 503 (Retry-After) or 504; none hangs or fails."""
    from service.runtime import load_runtime

    runtime = load_runtime(test_artifact)
    real_run = runtime.run
    runtime.run = lambda sequences: (time.sleep(0.2), real_run(sequences))[1]
    with in_process(runtime, max_batch_size=4, max_queue_size=32, max_texts=4, request_timeout_s=1.0) as url:
        depths: list[float] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                depths.append(read_metric(url, "scs_queue_depth"))

        watcher = threading.Thread(target=watch)
        watcher.start()

        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=30,
                                         limits=httpx.Limits(max_connections=40)) as client:
                return await asyncio.gather(*(client.post("/classify", json={"texts": [f"card {i} {j}" for j in
                                                                                         range(4)]})
                                              for i in range(40)))

        try:
            responses = asyncio.run(burst())
        finally:
            stop.set()
            watcher.join(10)
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503, 504} and {200, 503, 504} <= set(statuses), statuses
        assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)
        assert all(r.json()["error"]["code"] == "deadline_exceeded" for r in responses if r.status_code == 504)
        assert max(depths) <= 32
        ran = read_metric(url, "scs_batch_size_sentences_sum")
        assert ran < 4 * statuses.count(200) + 4 * statuses.count(504)  # some expired sentences never ran
        assert httpx.post(f"{url}/classify", json={"text": "card"}, timeout=30).status_code == 200


def rehash(folder: Path, name: str) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name]["sha256"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def edit_manifest(folder: Path, **changes) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def missing_model(folder: Path) -> None:
    (folder / "model.onnx").unlink()


def truncated_model(folder: Path) -> None:
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])


def truncated_model_rehashed(folder: Path) -> None:
    truncated_model(folder)
    rehash(folder, "model.onnx")


def tokenizer_vocab_disagrees(folder: Path) -> None:
    edit_manifest(folder, vocab_size=json.loads((folder / "manifest.json").read_text())["vocab_size"] + 5)


def unk_id_outside_tokenizer(folder: Path) -> None:
    edit_manifest(folder, unk_id=10**6)


def tokenizer_garbage(folder: Path) -> None:
    (folder / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    rehash(folder, "tokenizer.json")


FAULTS = [
    (missing_model, "model.onnx: missing"),
    (truncated_model, "model.onnx: sha256 differs"),
    (truncated_model_rehashed, "model.onnx"),
    (tokenizer_vocab_disagrees, "vocab_size"),
    (unk_id_outside_tokenizer, "unk_id=1000000 outside the tokenizer"),
    (tokenizer_garbage, "tokenizer.json: cannot load"),
]


@pytest.mark.slow
@pytest.mark.parametrize("break_it, says", FAULTS, ids=[f.__name__ for f, _ in FAULTS])
def test_broken_artifact_refuses_to_start_naming_the_file(test_artifact, tmp_path, break_it, says):
    folder = tmp_path / "model" / "1"
    shutil.copytree(test_artifact, folder)
    break_it(folder)
    result = subprocess.run([sys.executable, "-m", "service", "--model-dir", str(folder), "--port", "9"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=os.environ | {"SCS_LOG_LEVEL": "error"})
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: refusing to start:") and says in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
