"""Write and check the artifact folder: model.onnx, tokenizer.json, labels.json, manifest.json."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

SERVING_FILES = ("model.onnx", "tokenizer.json", "labels.json")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path) -> dict:
    return {name: {"sha256": sha256(folder / name), "bytes": (folder / name).stat().st_size} for name in SERVING_FILES}


def write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check_hashes(folder: Path) -> list[str]:
    """Problems found comparing the manifest's hashes with the files (empty when all match)."""
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    problems = []
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256(path) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from manifest")
    return problems
