"""Load a labelled sentence dataset (CSV, TSV or JSONL) into train/test splits, with clear errors."""

from __future__ import annotations

import csv
import io
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


@dataclass
class Split:
    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    skipped_empty: int = 0
    source: dict = field(default_factory=dict)


def _read_rows(path: Path, text_column: str, label_column: str) -> tuple[list[tuple[str, str]], int]:
    """Rows of (text, label) and the count of empty texts skipped."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{path}: unsupported file type {path.suffix!r} (use .csv, .tsv or .jsonl)")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line} is not valid UTF-8 (byte 0x{raw[error.start]:02x})") from None
    if "\x00" in content:
        line = content[: content.index("\x00")].count("\n") + 1
        raise UserError(f"{path}: line {line} contains a NUL byte (binary file?)")

    records: list[tuple[int, dict]] = []
    if kind == "jsonl":
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}: line {number} is not a JSON object")
            records.append((number, record))
        columns = sorted({key for _, record in records for key in record})
    else:
        reader = csv.DictReader(io.StringIO(content, newline=""), delimiter="," if kind == "csv" else "\t")
        try:
            columns = list(reader.fieldnames or [])
            records = [(reader.line_num, row) for row in reader]
        except csv.Error as error:
            raise UserError(f"{path}: malformed {kind.upper()} near line {reader.line_num} ({error})") from None
    for column in (text_column, label_column):
        if column not in columns:
            raise UserError(f"{path}: no column {column!r}; columns are: {', '.join(map(repr, columns)) or 'none'}")

    rows: list[tuple[str, str]] = []
    skipped = 0
    for number, record in records:
        text, label = record.get(text_column), record.get(label_column)
        if text is None or label is None:
            raise UserError(f"{path}: line {number} is missing {text_column!r} or {label_column!r}")
        if not isinstance(text, str):
            raise UserError(f"{path}: line {number}: {text_column!r} is not a string")
        label = str(label).strip()
        if not text.strip():
            skipped += 1
            continue
        if not label:
            raise UserError(f"{path}: line {number} has an empty label")
        rows.append((text.strip(), label))
    if not rows:
        raise UserError(f"{path}: no rows with text")
    return rows, skipped


def _find_split(folder: Path, split: str) -> Path:
    found = sorted(p for p in folder.iterdir() if p.stem == split and p.suffix.lower() in SUFFIXES)
    if not found:
        raise UserError(f"{folder}: no {split}.csv, {split}.tsv or {split}.jsonl")
    return found[0]


def stratified_split(texts: list[str], labels: list[str], fraction: float, seed: int, what: str) -> tuple[Split, Split]:
    """Split into (kept, held out) keeping each class's share; every class keeps >= 1 row on both sides."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_label[label].append(index)
    rng = random.Random(seed)
    kept: list[int] = []
    held: list[int] = []
    for label in sorted(by_label):
        indices = by_label[label]
        if len(indices) < 2:
            raise UserError(f"class {label!r} has {len(indices)} row(s): too few to hold out a {what} split (need >= 2)")
        rng.shuffle(indices)
        count = min(len(indices) - 1, max(1, round(len(indices) * fraction)))
        held += indices[:count]
        kept += indices[count:]
    kept.sort()
    held.sort()
    pick = lambda idx: Split([texts[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
    return pick(kept), pick(held)


def load_dataset(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    test_fraction: float | None = None,
    seed: int = 0,
) -> Dataset:
    """A folder with train/test files, or one file split with ``test_fraction``."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        if test_fraction is not None:
            raise UserError("--test-fraction applies to a single file, not a folder with train/test files")
        train_rows, skipped_train = _read_rows(_find_split(path, "train"), text_column, label_column)
        test_rows, skipped_test = _read_rows(_find_split(path, "test"), text_column, label_column)
        train = Split([t for t, _ in train_rows], [label for _, label in train_rows])
        test = Split([t for t, _ in test_rows], [label for _, label in test_rows])
        skipped = skipped_train + skipped_test
        unknown = sorted(set(test.labels) - set(train.labels))
        if unknown:
            raise UserError(f"test split has labels not in train: {', '.join(unknown[:5])}")
    else:
        if test_fraction is None:
            raise UserError(f"{path} is one file: pass --test-fraction (e.g. 0.2) to hold out a test split")
        if not 0 < test_fraction < 1:
            raise UserError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
        rows, skipped = _read_rows(path, text_column, label_column)
        texts, labels = [t for t, _ in rows], [label for _, label in rows]
        _check_classes(labels)
        train, test = stratified_split(texts, labels, test_fraction, seed, "test")
    _check_classes(train.labels)
    counts = Counter(train.labels)
    return Dataset(
        name=path.stem if path.is_file() else path.name,
        train=train,
        test=test,
        skipped_empty=skipped,
        source={"path": path.name, "train_rows": len(train), "test_rows": len(test), "classes": len(counts)},
    )


def _check_classes(labels: list[str]) -> None:
    classes = set(labels)
    if len(classes) < 2:
        raise UserError(f"need at least two classes, found {len(classes)}: {', '.join(sorted(classes))}")
