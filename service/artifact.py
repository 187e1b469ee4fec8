"""Find a model version folder and check it against its manifest before anything is served."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactError

SERVING_FILES = ("model.onnx", "tokenizer.json", "labels.json")
REQUIRED_KEYS = {"name": str, "version": (str, int), "files": dict, "num_classes": int, "max_length": int,
                 "pad_id": int, "unk_id": int, "opset": int}
MIN_OPSET = 11  # LSTM with dynamic batch and sequence axes as the exporter writes it


@dataclass(frozen=True)
class Artifact:
    folder: Path
    manifest: dict
    labels: list[str]

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])


def resolve_version_dir(model_dir: Path, version: int | None = None) -> Path:
    """``models/<name>`` -> its newest integer version folder (or ``version``); a version folder is returned as is."""
    if not model_dir.is_dir():
        raise ArtifactError(f"{model_dir}: no such model folder")
    if (model_dir / "manifest.json").is_file():
        if version is not None and model_dir.name != str(version):
            raise ArtifactError(f"{model_dir} is version folder {model_dir.name!r}, but version {version} was pinned")
        return model_dir
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if version is not None:
        if version not in versions:
            raise ArtifactError(f"{model_dir}: no version {version} (found: {versions or 'none'})")
        return model_dir / str(version)
    if not versions:
        raise ArtifactError(f"{model_dir}: no manifest.json and no integer version folders inside")
    return model_dir / str(versions[-1])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_artifact(folder: Path) -> Artifact:
    """Read and check manifest, file hashes, labels and the graph's opset; raise ``ArtifactError`` on any mismatch."""
    manifest = _read_json(folder / "manifest.json")
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{folder}/manifest.json: expected a JSON object")
    for key, kind in REQUIRED_KEYS.items():
        if key not in manifest:
            raise ArtifactError(f"{folder}/manifest.json: missing {key!r}")
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise ArtifactError(f"{folder}/manifest.json: {key!r} has the wrong type ({manifest[key]!r})")
    for name in SERVING_FILES:
        entry = manifest["files"].get(name)
        path = folder / name
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise ArtifactError(f"{folder}/manifest.json: no sha256 recorded for {name}")
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (the manifest lists it)")
        if sha256(path) != entry["sha256"]:
            raise ArtifactError(f"{path}: sha256 differs from the manifest (file changed or corrupt)")
    labels = _read_json(folder / "labels.json")
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ArtifactError(f"{folder}/labels.json: expected a list of class names")
    if len(labels) != manifest["num_classes"] or len(set(labels)) != len(labels):
        raise ArtifactError(f"{folder}/labels.json: {len(labels)} labels ({len(set(labels))} distinct), "
                            f"manifest says num_classes={manifest['num_classes']}")
    opset = onnx_opset((folder / "model.onnx").read_bytes())
    if opset != manifest["opset"]:
        raise ArtifactError(f"{folder}/model.onnx: graph opset {opset}, manifest says {manifest['opset']}")
    if opset < MIN_OPSET:
        raise ArtifactError(f"{folder}/model.onnx: opset {opset} is older than the supported minimum {MIN_OPSET}")
    if manifest["max_length"] < 1:
        raise ArtifactError(f"{folder}/manifest.json: max_length must be >= 1")
    return Artifact(folder, manifest, labels)


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise ArtifactError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path}: not valid JSON ({error})") from None


def onnx_opset(data: bytes) -> int:
    """The default-domain opset of a serialized ONNX ModelProto (field 8, ``opset_import``).

    A few lines of protobuf wire-format reading, so the service needs no ``onnx`` package.
    """
    opsets: dict[str, int] = {}
    try:
        for field, value in _fields(data):
            if field == 8 and isinstance(value, bytes):
                entry = dict(_fields(value))
                domain = entry.get(1, b"")
                opsets[domain.decode() if isinstance(domain, bytes) else ""] = int(entry.get(2, 0))
    except (IndexError, ValueError) as error:
        raise ArtifactError(f"model.onnx is not a readable ONNX file ({error})") from None
    for domain in ("", "ai.onnx"):
        if domain in opsets:
            return opsets[domain]
    raise ArtifactError("model.onnx declares no default-domain opset")


def _fields(data: bytes):
    """(field number, value) pairs of one protobuf message: ints for varints, bytes for length-delimited."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(data, position)
        elif wire == 2:
            size, position = _varint(data, position)
            value, position = data[position : position + size], position + size
            if position > len(data):
                raise ValueError("truncated field")
        elif wire in (1, 5):
            value, position = None, position + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield field, value


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
