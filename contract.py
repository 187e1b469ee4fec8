"""The artifact contract: the one thing the training half and the serving half share, and the only place it is written.

A model repository is Triton-shaped: ``models/<name>/<version>/`` with integer version folders. A version folder
holds ``FILES`` plus ``manifest.json`` (the ``Manifest`` below, sha256 of every file included). The graph takes
``input_ids`` int64 ``[batch, seq]`` right-padded with the manifest's ``pad_id`` and the rest of its input
signature (``SIGNATURES``: ``lengths`` int64 ``[batch]`` for the trained LSTM; ``attention_mask`` and, for BERT,
``token_type_ids``, int64 ``[batch, seq]``, for an imported encoder), and returns ``probabilities`` float32
``[batch, num_classes]`` (softmax, or a sigmoid per class for a multi-label model, in the graph). Texts become ids
through ``Encoder`` and batches become tensors through ``inputs``: training, export checks, the service and the
benchmark baselines all call these, so a sentence gets the same ids and the same padding everywhere.

This module never imports torch or training code (the service imports it); ``check`` is what both
``python -m model_export check`` and the service's start-up run.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tokenizers import Tokenizer

FILES = ("model.onnx", "tokenizer.json", "labels.json")
MANIFEST = "manifest.json"
INPUT_IDS, LENGTHS, PROBABILITIES = "input_ids", "lengths", "probabilities"
ATTENTION_MASK, TOKEN_TYPE_IDS = "attention_mask", "token_type_ids"
# The graph inputs each kind of model may take (the manifest's ``inputs`` keys, in this order); all int64.
SIGNATURES = {"lstm": ((INPUT_IDS, LENGTHS),),
              "encoder": ((INPUT_IDS, ATTENTION_MASK), (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS))}
INPUT_TYPE = "tensor(int64)"
INPUT_TYPES = {INPUT_IDS: INPUT_TYPE, LENGTHS: INPUT_TYPE}  # the LSTM's
INPUT_DOCS = {INPUT_IDS: "int64 [batch, seq], right-padded with pad_id", LENGTHS: "int64 [batch]",
              ATTENTION_MASK: "int64 [batch, seq], 1 on real tokens, 0 on padding",
              TOKEN_TYPE_IDS: "int64 [batch, seq], zeros (one segment)"}
OUTPUT_TYPE = "tensor(float)"
OPSET = 17  # what the exporter writes
MIN_OPSET = 11  # LSTM with dynamic batch and sequence axes
TOLERANCE = 1e-5  # parity (ONNX vs torch) and batch invariance (alone vs in any padded batch), max abs difference
# An imported encoder's parity with transformers' own forward pass: float32 onnxruntime and float32 torch each sit
# within about 7.6e-6 of a float64 run on a base-size encoder, so their difference reaches 1.05e-5 over the 3,080
# Banking77 test sentences (measured when `import` was built); invariance stays at TOLERANCE.
ENCODER_PARITY_TOLERANCE = 1e-4
CPU = "CPUExecutionProvider"


class ArtifactError(Exception):
    """The folder breaks the contract; the message names the file and the reason, on one line."""


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Manifest(BaseModel):
    """``manifest.json``: validated when written (model_export) and when read (``check``)."""

    model_config = ConfigDict(extra="allow", strict=True, protected_namespaces=())

    name: str = Field(min_length=1)
    version: str = Field(pattern=r"^[0-9]{1,18}$")
    created_at: str
    files: dict[str, FileEntry]
    num_classes: int = Field(ge=2)
    max_length: int = Field(ge=1)
    pad_id: int = Field(ge=0)
    unk_id: int = Field(ge=0)
    vocab_size: int = Field(ge=1)
    opset: int = Field(ge=MIN_OPSET)
    # What kind of model the graph is (``SIGNATURES``), its output activation (``sigmoid``: multi-label, each class
    # scored on its own) and whether ``Encoder`` adds the tokenizer's special tokens ([CLS] x [SEP], <s> x </s>),
    # as an imported encoder was trained with. The defaults are the LSTM's, which artifacts made before these
    # fields keep.
    model_kind: Literal["lstm", "encoder"] = "lstm"
    activation: Literal["softmax", "sigmoid"] = "softmax"
    special_tokens: bool = False
    inputs: dict[str, str] = {name: INPUT_DOCS[name] for name in SIGNATURES["lstm"][0]}
    outputs: dict[str, str] = {PROBABILITIES: "float32 [batch, num_classes], softmax applied"}
    dataset: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    training: dict[str, Any] = {}
    verification: dict[str, Any] = {}
    # Temperature scaling and the selective-classification thresholds (model_export/calibration.py); empty in
    # artifacts made before them or with calibration off.
    calibration: dict[str, Any] = {}
    selective: dict[str, Any] = {}
    # With out-of-scope data (model_export/openset.py): the abstention threshold chosen on validation, which the
    # service applies by default.
    open_set: dict[str, Any] = {}
    # The input-drift reference (``drift_bins``): each signal's share per bin on the training data.
    drift: dict[str, Any] = {}
    versions: dict[str, Any] = {}

    @field_validator("files")
    @classmethod
    def _lists_every_file(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        missing = [name for name in FILES if name not in files]
        if missing:
            raise ValueError(f"no sha256 recorded for {', '.join(missing)}")
        return files

    @model_validator(mode="after")
    def _known_signature(self) -> Manifest:
        if tuple(self.inputs) not in SIGNATURES[self.model_kind]:
            allowed = " or ".join(", ".join(names) for names in SIGNATURES[self.model_kind])
            raise ValueError(f"inputs {', '.join(self.inputs) or 'none'} are not a {self.model_kind} signature "
                             f"({allowed})")
        return self

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.inputs)


@dataclass(frozen=True)
class Artifact:
    """A checked version folder: its manifest, labels, tokenizer and encoder, and (after ``check``) a session."""

    folder: Path
    manifest: Manifest
    labels: list[str]
    tokenizer: Tokenizer
    encoder: Encoder
    session: Any = None  # onnxruntime.InferenceSession

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]


# --- files and the repository layout ------------------------------------------------------------------------------

def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path) -> dict[str, FileEntry]:
    return {name: FileEntry(sha256=sha256(folder / name), bytes=(folder / name).stat().st_size) for name in FILES}


def write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_manifest(folder: Path, manifest: Manifest) -> None:
    write_json(folder / MANIFEST, manifest.model_dump(mode="json"))


VERSION = re.compile(r"[0-9]{1,18}")  # a version: ASCII digits within int64 ("²" and "١" are digits, not versions)


def parse_version(text: str) -> int | None:
    """A version folder's name or a requested version as an int, or None when it is not one."""
    return int(text) if VERSION.fullmatch(text) else None


def versions(model_dir: Path) -> list[int]:
    """The integer version folders of ``models/<name>``, oldest first (``10`` after ``9``)."""
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and VERSION.fullmatch(p.name))


def version_folder(model_dir: Path, version: int | None = None) -> Path:
    """``models/<name>`` -> its newest version folder (or ``version``); a version folder is returned as is."""
    if not model_dir.is_dir():
        raise ArtifactError(f"{model_dir}: no such model folder")
    if (model_dir / MANIFEST).is_file():
        if version is not None and model_dir.name != str(version):
            raise ArtifactError(f"{model_dir} is version folder {model_dir.name!r}, but version {version} was pinned")
        return model_dir
    found = versions(model_dir)
    if version is not None:
        if version not in found:
            raise ArtifactError(f"{model_dir}: no version {version} (found: {found or 'none'})")
        return model_dir / str(version)
    if not found:
        raise ArtifactError(f"{model_dir}: no {MANIFEST} and no integer version folders inside")
    return model_dir / str(found[-1])


# --- texts to tensors ---------------------------------------------------------------------------------------------

# The normalizer model_export writes. On printable ASCII (tab, newline and carriage return allowed) it only
# lower-cases: no accents to strip, no Chinese characters to pad, no control characters to drop, and the
# whitespace it maps to spaces is whitespace to the pre-tokenizer already. So such texts can skip it.
BERT_NORMALIZER = {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True, "strip_accents": True,
                   "lowercase": True}
PLAIN_ASCII = re.compile(r"[\t\n\r\x20-\x7e]*")


def _ascii_shortcut(spec: dict) -> bool:
    """Whether plain-ASCII texts may skip this tokenizer's normalizer (lower-cased in Python instead) and get the
    same ids: a lower-casing, text-cleaning ``BertNormalizer`` (``BERT_NORMALIZER`` or a Hugging Face BERT's, whose
    ``strip_accents`` and ``handle_chinese_chars`` do nothing to ASCII) before the BERT pre-tokenizer, which splits
    on the whitespace the normalizer would have turned into spaces. An added token with whitespace in it could
    match only after that mapping, so such a tokenizer gets no shortcut."""
    normalizer, pre_tokenizer = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    return (normalizer.get("type") == "BertNormalizer" and normalizer.get("lowercase") is True
            and normalizer.get("clean_text") is True and pre_tokenizer == {"type": "BertPreTokenizer"}
            and not any(re.search(r"\s", token["content"]) for token in spec.get("added_tokens") or []))


class Encoder:
    """Texts to the token ids the model was trained on, and whether each was cut to ``max_length``.

    Without ``special_tokens`` (the LSTM): no special tokens, the ids cut to ``max_length``, and a text with no
    tokens becomes ``[unk_id]``. With them (an imported encoder): the tokenizer's post-processor adds them as the
    model was trained ([CLS] x [SEP], <s> x </s>) and its own truncation cuts the text's tokens, never the final
    special token, to fit ``max_length``; the tokenizer file's padding is never applied.
    ``encode_batch_fast`` gives the same ids as ``encode_batch`` without character offsets.

    Where ``_ascii_shortcut`` allows it, plain ASCII texts are lower-cased here and tokenized without the
    normalizer: the same ids (a test compares both paths on every Banking77 sentence and on generated text), for
    about 40% less time per sentence (measured: 44 -> 26 us). A text holding an added token's content (say
    "[SEP]", in any case) takes the full path: added tokens are matched before normalization.
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int, unk_id: int, special_tokens: bool = False) -> None:
        self.tokenizer, self.max_length, self.unk_id, self.special_tokens = (tokenizer, max_length, unk_id,
                                                                             special_tokens)
        spec = json.loads(tokenizer.to_str())
        self._full = self._working(spec)
        self._plain: Tokenizer | None = None
        self._simple = PLAIN_ASCII.fullmatch
        if _ascii_shortcut(spec):
            self._plain = self._working(spec | {"normalizer": None})
            added = [re.escape(token["content"]) for token in spec.get("added_tokens") or []]
            if added:
                other = re.compile("|".join(added), re.IGNORECASE).search
                self._simple = lambda text: PLAIN_ASCII.fullmatch(text) is not None and other(text) is None

    def _working(self, spec: dict) -> Tokenizer:
        tokenizer = Tokenizer.from_str(json.dumps(spec))
        tokenizer.no_padding()
        if self.special_tokens:
            tokenizer.enable_truncation(self.max_length)
        else:
            tokenizer.no_truncation()
        return tokenizer

    def cache_key(self, text: str) -> str:
        """A key two texts share only if ``encode`` gives them the same ids (and the same cut): the lower-cased text
        where the plain-ASCII shortcut applies (``encode`` tokenizes exactly ``text.lower()`` then), else the text.
        The two kinds never meet: a lower-cased key is plain ASCII without an added token, an exact one is not."""
        if self._plain is not None and self._simple(text):
            return text.lower()
        return text

    def encode(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        plain, match, special = self._plain, self._simple, self.special_tokens
        if plain is not None and all(match(text) for text in texts):
            encodings = plain.encode_batch_fast([text.lower() for text in texts], add_special_tokens=special)
        elif plain is not None and any(match(text) for text in texts):
            encodings = [None] * len(texts)
            simple = [i for i, text in enumerate(texts) if match(text)]
            other = [i for i, text in enumerate(texts) if not match(text)]
            for index, encoding in zip(simple, plain.encode_batch_fast([texts[i].lower() for i in simple],
                                                                       add_special_tokens=special)):
                encodings[index] = encoding
            for index, encoding in zip(other, self._full.encode_batch_fast([texts[i] for i in other],
                                                                          add_special_tokens=special)):
                encodings[index] = encoding
        else:
            encodings = self._full.encode_batch_fast(list(texts), add_special_tokens=special)
        unk = [self.unk_id]
        if special:  # truncated by the tokenizer; what it cut off is in ``overflowing``
            return [encoding.ids or unk for encoding in encodings], [bool(e.overflowing) for e in encodings]
        ids, truncated, limit = [], [], self.max_length
        for encoding in encodings:
            tokens = encoding.ids
            ids.append(tokens[:limit] or unk)
            truncated.append(len(tokens) > limit)
        return ids, truncated


def pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to this batch's longest sequence: (ids int64 [batch, seq], lengths int64 [batch])."""
    count = len(sequences)
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=count)
    ids = np.full((count, int(lengths.max())), pad_id, dtype=np.int64)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
    return ids, lengths


def inputs(sequences: Sequence[Sequence[int]], pad_id: int,
           names: Sequence[str] = SIGNATURES["lstm"][0]) -> dict[str, np.ndarray]:
    """The graph's input feed for one batch: the tensors ``names`` (a manifest's ``input_names``; the LSTM's by
    default), all from the same right-padded ids."""
    ids, lengths = pad(sequences, pad_id)
    feed = {}
    for name in names:
        if name == INPUT_IDS:
            feed[name] = ids
        elif name == LENGTHS:
            feed[name] = lengths
        elif name == ATTENTION_MASK:
            feed[name] = (np.arange(ids.shape[1]) < lengths[:, None]).astype(np.int64)
        elif name == TOKEN_TYPE_IDS:
            feed[name] = np.zeros_like(ids)
        else:
            raise ValueError(f"no such graph input: {name!r}")
    return feed


# --- checking a folder --------------------------------------------------------------------------------------------

# The precisions whose max-probability thresholds the exporter stores (manifest ``selective``), so the service
# can map a request's ``min_precision`` to a threshold.
SELECTIVE_PRECISIONS = (0.90, 0.95, 0.99)

# Input drift: four signals per sentence, each binned the same way at export (the reference, from the training
# data) and in the service (a rolling window of served sentences).
DRIFT_LENGTH_EDGES = (2, 4, 6, 8, 10, 12, 16, 20, 24, 32, 48)  # tokens; bins [1, 2), [2, 4), ..., [48, inf)
DRIFT_UNKNOWN_EDGES = (1e-9, 0.05, 0.2, 0.5)  # share of [UNK] tokens; bins 0, (0, 0.05), ..., [0.5, 1]
DRIFT_SCORE_BINS = 10  # top probability, equal-width bins over [0, 1]


def drift_bins(ids: Sequence[int], unk_id: int, top_class: int, top_score: float) -> tuple[int, int, int, int]:
    """The bin of one sentence in each drift signal: (length, unknown-token share, predicted class, top score)."""
    length = bisect.bisect_right(DRIFT_LENGTH_EDGES, len(ids))
    unknown = bisect.bisect_right(DRIFT_UNKNOWN_EDGES, ids.count(unk_id) / (len(ids) or 1))
    score = top_score if math.isfinite(top_score) else 0.0
    return length, unknown, top_class, min(max(int(score * DRIFT_SCORE_BINS), 0), DRIFT_SCORE_BINS - 1)


def drift_sizes(num_classes: int) -> dict[str, int]:
    """How many bins each drift signal has, in ``drift_bins`` order."""
    return {"length": len(DRIFT_LENGTH_EDGES) + 1, "unknown_tokens": len(DRIFT_UNKNOWN_EDGES) + 1,
            "predicted_class": num_classes, "top_score": DRIFT_SCORE_BINS}


def _fraction(value: object, where: str) -> float | None:
    """A manifest threshold: None, or a number in [0, 1]; else ``ArtifactError`` naming the field."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ArtifactError(f"manifest.json: {where} must be a number in [0, 1], got {value!r}")
    return float(value)


def selective_thresholds(manifest: Manifest) -> list[tuple[float, float]]:
    """The manifest's (precision, min_score) pairs reached on validation, by precision (``selective``); the rows no
    threshold reached are left out. ``ArtifactError`` when the field is malformed."""
    rows = manifest.selective.get("thresholds", []) if isinstance(manifest.selective, dict) else None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ArtifactError("manifest.json: selective.thresholds must be a list of objects")
    pairs = [(_fraction(row.get("precision"), "selective.thresholds[].precision"),
              _fraction(row.get("min_score"), "selective.thresholds[].min_score")) for row in rows]
    return sorted((p, score) for p, score in pairs if p is not None and score is not None)


MULTI_LABEL_THRESHOLD = 0.5  # a multi-label model's default: every label whose probability is at least this


def default_threshold(manifest: Manifest) -> float | None:
    """The threshold a request that names none gets from the model: a multi-label model's per-label threshold
    (``selective.per_label_threshold``, else ``MULTI_LABEL_THRESHOLD``); else the out-of-scope threshold the model
    abstains below (``open_set.min_score``), if it was exported with one."""
    if manifest.activation == "sigmoid":
        per_label = manifest.selective.get("per_label_threshold") if isinstance(manifest.selective, dict) else None
        value = _fraction(per_label, "selective.per_label_threshold")
        return MULTI_LABEL_THRESHOLD if value is None else value
    return _fraction(manifest.open_set.get("min_score"), "open_set.min_score")


def read(folder: Path) -> Artifact:
    """Manifest, file hashes, labels, the graph's opset and the tokenizer, each against the others.

    Raises ``ArtifactError`` naming the file and what is wrong. Opens no onnxruntime session (``check`` does).
    """
    manifest = read_manifest(folder)
    for name in FILES:
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (the manifest lists it)")
        if sha256(path) != manifest.files[name].sha256:
            raise ArtifactError(f"{path}: sha256 differs from the manifest (file changed or corrupt)")
    labels = _read_json(folder / "labels.json")
    if not isinstance(labels, list) or not all(isinstance(label, str) and label for label in labels):
        raise ArtifactError(f"{folder}/labels.json: expected a list of non-empty class names")
    if len(labels) != manifest.num_classes or len(set(labels)) != len(labels):
        raise ArtifactError(f"{folder}/labels.json: {len(labels)} labels ({len(set(labels))} distinct), "
                            f"manifest says num_classes={manifest.num_classes}")
    opset = onnx_opset(folder / "model.onnx")
    if opset != manifest.opset:
        raise ArtifactError(f"{folder}/model.onnx: graph opset {opset}, manifest says {manifest.opset}")
    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as error:  # tokenizers raises plain Exception subclasses
        raise ArtifactError(f"{folder}/tokenizer.json: cannot load ({_one_line(error)})") from None
    vocab = tokenizer.get_vocab_size()
    if manifest.vocab_size != vocab:
        raise ArtifactError(f"{folder}/tokenizer.json: {vocab} ids, manifest says vocab_size={manifest.vocab_size}")
    for key in ("pad_id", "unk_id"):
        if getattr(manifest, key) >= vocab:
            raise ArtifactError(f"{folder}/manifest.json: {key}={getattr(manifest, key)} outside the tokenizer's "
                                f"{vocab} ids")
    return Artifact(folder, manifest, labels, tokenizer,
                    Encoder(tokenizer, manifest.max_length, manifest.unk_id, manifest.special_tokens))


def read_manifest(folder: Path) -> Manifest:
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such artifact folder")
    raw = _read_json(folder / MANIFEST)
    try:
        return Manifest.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(map(str, first["loc"]))
        problem = f"missing {where!r}" if first["type"] == "missing" else f"{where or 'manifest'}: {first['msg']}"
        raise ArtifactError(f"{folder}/{MANIFEST}: {problem}") from None


def check(folder: Path, providers: Sequence[str] = (CPU,), intra_op_threads: int = 1,
          inter_op_threads: int = 1) -> Artifact:
    """``read`` the folder, open the graph in onnxruntime with ``providers`` and prove it keeps the contract:
    input names (the manifest's signature) and types, output name and class count, and a test batch of two
    lengths that returns one probability row per sentence, each summing to 1 (softmax) or each value in [0, 1]
    (sigmoid). Returns the artifact with its open session."""
    import onnxruntime as ort

    artifact = read(folder)
    manifest = artifact.manifest
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=list(providers))
    except Exception as error:
        raise ArtifactError(f"{folder}/model.onnx: onnxruntime {ort.__version__} cannot load it "
                            f"(opset {manifest.opset}): {_one_line(error)}") from None
    found = {i.name: i.type for i in session.get_inputs()}
    expected = {name: INPUT_TYPE for name in manifest.input_names}
    if found != expected:
        raise ArtifactError(f"{folder}/model.onnx: inputs {found}, the manifest says {expected}")
    outputs = {o.name: o for o in session.get_outputs()}
    if PROBABILITIES not in outputs or outputs[PROBABILITIES].type != OUTPUT_TYPE:
        raise ArtifactError(f"{folder}/model.onnx: no float {PROBABILITIES!r} output (has {sorted(outputs)})")
    shape = outputs[PROBABILITIES].shape
    if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != manifest.num_classes):
        raise ArtifactError(f"{folder}/model.onnx: output shape {shape} disagrees with "
                            f"num_classes={manifest.num_classes}")
    try:
        probabilities = session.run([PROBABILITIES], inputs([[manifest.unk_id] * 3, [manifest.unk_id]],
                                                            manifest.pad_id, manifest.input_names))[0]
    except Exception as error:
        raise ArtifactError(f"{folder}/model.onnx: a test run failed: {_one_line(error)}") from None
    if probabilities.shape != (2, manifest.num_classes):
        raise ArtifactError(f"{folder}/model.onnx: a test batch of 2 gave shape {probabilities.shape}, expected "
                            f"(2, {manifest.num_classes})")
    if manifest.activation == "softmax" and not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3):
        raise ArtifactError(f"{folder}/model.onnx: output rows do not sum to 1 (softmax must be in the graph)")
    if manifest.activation == "sigmoid" and not ((probabilities >= 0) & (probabilities <= 1)).all():
        raise ArtifactError(f"{folder}/model.onnx: outputs outside [0, 1] (the sigmoid must be in the graph)")
    return Artifact(folder, manifest, artifact.labels, artifact.tokenizer, artifact.encoder, session)


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise ArtifactError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path}: not valid JSON ({error})") from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


# --- the graph's opset without the onnx package ---------------------------------------------------------------------

def onnx_opset(path: Path) -> int:
    """The default-domain opset of a serialized ONNX ModelProto (field 8, ``opset_import``).

    A few lines of protobuf wire-format reading, so the service needs no ``onnx`` package.
    """
    opsets: dict[str, int] = {}
    try:
        for field, value in _fields(path.read_bytes()):
            if field == 8 and isinstance(value, bytes):
                entry = dict(_fields(value))
                domain = entry.get(1, b"")
                opsets[domain.decode() if isinstance(domain, bytes) else ""] = int(entry.get(2, 0))
    except (IndexError, ValueError) as error:
        raise ArtifactError(f"{path}: not a readable ONNX file ({error})") from None
    for domain in ("", "ai.onnx"):
        if domain in opsets:
            return opsets[domain]
    raise ArtifactError(f"{path}: declares no default-domain opset (not an ONNX model?)")


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
