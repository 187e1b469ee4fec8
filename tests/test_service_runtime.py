"""The runtime refuses a model folder that disagrees with its manifest, with a clear one-line message."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.artifact import onnx_opset, resolve_version_dir
from service.errors import ArtifactError
from service.runtime import load_runtime

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def copy(test_artifact, tmp_path) -> Path:
    folder = tmp_path / "model" / "1"
    shutil.copytree(test_artifact, folder)
    return folder


def edit_manifest(folder: Path, **changes) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def rehash(folder: Path, name: str) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name]["sha256"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def refuses(folder: Path, match: str, **kwargs) -> None:
    with pytest.raises(ArtifactError, match=match):
        load_runtime(folder, **kwargs)


def test_loads_and_encodes_like_the_trainer(copy):
    from tokenizers import Tokenizer

    from model_export.tokenizer import encode

    runtime = load_runtime(copy)
    texts = ["Where is my card?", "", "   ", "card " * 100, "💳 我的卡"]
    expected = encode(Tokenizer.from_file(str(copy / "tokenizer.json")), texts, runtime.max_length)
    assert [e.ids for e in runtime.encode(texts)] == expected
    assert [e.truncated for e in runtime.encode(texts)] == [False, False, False, True, False]
    assert runtime.provider == "CPUExecutionProvider"


def test_hash_mismatch(copy):
    with (copy / "labels.json").open("a") as handle:
        handle.write(" ")
    refuses(copy, "labels.json: sha256 differs")


def test_missing_file(copy):
    (copy / "tokenizer.json").unlink()
    refuses(copy, "tokenizer.json: missing")


def test_missing_manifest_key(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["pad_id"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    refuses(copy, "missing 'pad_id'")


def test_class_count_disagrees_with_model_output(copy):
    labels = json.loads((copy / "labels.json").read_text())[:-1]
    (copy / "labels.json").write_text(json.dumps(labels))
    rehash(copy, "labels.json")
    edit_manifest(copy, num_classes=len(labels))
    refuses(copy, "shape")


def test_labels_disagree_with_manifest(copy):
    edit_manifest(copy, num_classes=12)
    refuses(copy, "num_classes=12")


def test_opset_disagrees_with_graph(copy):
    assert onnx_opset((copy / "model.onnx").read_bytes()) == 17
    edit_manifest(copy, opset=99)
    refuses(copy, "graph opset 17, manifest says 99")


def test_not_an_onnx_file(copy):
    (copy / "model.onnx").write_bytes(b"\xff\xff\xff\xff not onnx")
    rehash(copy, "model.onnx")
    refuses(copy, "model.onnx")


def test_cuda_asked_on_a_cpu_only_onnxruntime(copy):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    refuses(copy, "provider 'cuda'", provider="cuda")


def test_version_resolution(copy):
    models = copy.parent
    for version in ("2", "10"):
        shutil.copytree(copy, models / version)
    (models / "notes").mkdir()
    assert resolve_version_dir(models) == models / "10"  # integer order, not string order
    assert resolve_version_dir(models, 2) == models / "2"
    assert resolve_version_dir(models / "2") == models / "2"
    with pytest.raises(ArtifactError, match="no version 7"):
        resolve_version_dir(models, 7)
    with pytest.raises(ArtifactError, match="pinned"):
        resolve_version_dir(models / "2", 3)
    with pytest.raises(ArtifactError, match="no integer version folders"):
        resolve_version_dir(models / "notes")
    with pytest.raises(ArtifactError, match="no such model folder"):
        resolve_version_dir(models / "absent")


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=os.environ | env)


def test_cli_refuses_to_start_with_one_clear_line(copy):
    (copy / "model.onnx").write_bytes((copy / "model.onnx").read_bytes() + b"\0")
    result = cli("--model-dir", str(copy.parent), "--port", "9")
    assert result.returncode == 2
    assert "error: refusing to start:" in result.stderr and "model.onnx: sha256 differs" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_rejects_bad_settings(test_artifact):
    result = cli("--model-dir", str(test_artifact), SCS_MAX_BATCH_SIZE="0")
    assert result.returncode == 2
    assert "error: invalid settings: max_batch_size" in result.stderr and "Traceback" not in result.stderr
