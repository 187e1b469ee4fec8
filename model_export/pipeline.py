"""From a dataset to a verified artifact folder: the whole training path in one function."""

from __future__ import annotations

import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import tokenizers
import torch
from tokenizers import Tokenizer

import contract

from .config import TrainConfig
from .data import Dataset, Split, stratified_split
from .errors import UserError
from .export import export_onnx, verify
from .report import plot_confusion_matrix, plot_training_curve, test_metrics
from .tokenizer import PAD, UNK, fit_tokenizer
from .train import TrainResult, predict, train


@dataclass
class Fitted:
    """A trained model with what it was trained from: the tokenizer, labels and splits."""

    tokenizer: Tokenizer
    labels: list[str]
    fit: Split
    validation: Split
    result: TrainResult

    @property
    def pad_id(self) -> int:
        return self.tokenizer.token_to_id(PAD)

    def ids(self, texts: list[str], max_length: int) -> list[list[int]]:
        """``contract.Encoder`` with this tokenizer: what the model is trained and checked on."""
        return contract.Encoder(self.tokenizer, max_length, self.tokenizer.token_to_id(UNK)).encode(texts)[0]


def fit_model(dataset: Dataset, config: TrainConfig, progress: bool = True, log=print) -> Fitted:
    """Hold out validation, fit the tokenizer on the rest of train, train; the test split is not read."""
    fit, validation = stratified_split(dataset.train.texts, dataset.train.labels, config.validation_fraction,
                                       config.seed, "validation")
    labels = sorted(set(dataset.train.labels))
    index = {label: i for i, label in enumerate(labels)}
    tokenizer = fit_tokenizer(fit.texts, config.vocab_size)
    log(f"data: {len(fit)} train, {len(validation)} validation, {len(dataset.test)} test rows, {len(labels)} classes; "
        f"vocabulary {tokenizer.get_vocab_size()}; skipped {dataset.skipped_empty} empty text(s)")
    encoder = contract.Encoder(tokenizer, config.max_length, tokenizer.token_to_id(UNK))
    result = train(config, encoder.encode(fit.texts)[0], [index[label] for label in fit.labels],
                   encoder.encode(validation.texts)[0],
                   [index[label] for label in validation.labels], tokenizer.get_vocab_size(), len(labels),
                   tokenizer.token_to_id(PAD), progress=progress)
    log(f"trained in {result.seconds:.0f}s; kept epoch {result.best_epoch} (validation accuracy "
        f"{result.best_val_accuracy:.4f})")
    return Fitted(tokenizer, labels, fit, validation, result)


def test_accuracy(fitted: Fitted, dataset: Dataset, max_length: int) -> float:
    """Torch accuracy on the test split (for seed sweeps; artifacts are scored through onnxruntime)."""
    index = {label: i for i, label in enumerate(fitted.labels)}
    probabilities = predict(fitted.result.model, fitted.ids(dataset.test.texts, max_length), fitted.pad_id)
    return float((probabilities.argmax(1) == np.array([index[label] for label in dataset.test.labels])).mean())


def build_artifact(dataset: Dataset, config: TrainConfig, out: Path, name: str, version: str,
                   dataset_info: dict, progress: bool = True, log=print) -> contract.Manifest:
    """Train, evaluate on test once, export, verify, and move the finished folder to ``out``. Returns the manifest."""
    started = time.perf_counter()
    fitted = fit_model(dataset, config, progress, log)
    tokenizer, labels, fit, validation, result = (fitted.tokenizer, fitted.labels, fitted.fit, fitted.validation,
                                                  fitted.result)
    index = {label: i for i, label in enumerate(labels)}
    pad_id, unk_id = tokenizer.token_to_id(PAD), tokenizer.token_to_id(UNK)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; a container's non-root user must read the artifact
    try:
        tokenizer.save(str(staging / "tokenizer.json"))
        contract.write_json(staging / "labels.json", labels)
        export_onnx(result.model, staging / "model.onnx")

        # The test split is touched here, once, after the model was chosen on validation.
        test_ids = fitted.ids(dataset.test.texts, config.max_length)
        checks, probabilities = verify(result.model, staging / "model.onnx", test_ids)
        targets = np.array([index[label] for label in dataset.test.labels])
        predictions = probabilities.argmax(1)
        metrics, report = test_metrics(targets, predictions, labels)
        log(report)
        plot_confusion_matrix(targets, predictions, labels, staging / "confusion_matrix.png")
        plot_training_curve(result.history, result.best_epoch, staging / "training_curve.png")

        manifest = contract.Manifest(
            name=name,
            version=version,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            files=contract.file_entries(staging),
            num_classes=len(labels),
            max_length=config.max_length,
            pad_id=pad_id,
            unk_id=unk_id,
            vocab_size=tokenizer.get_vocab_size(),
            opset=contract.OPSET,
            dataset=dataset_info | {"train_rows": len(fit), "validation_rows": len(validation),
                                    "test_rows": len(dataset.test), "skipped_empty_texts": dataset.skipped_empty},
            metrics=metrics,
            training={"config": config.to_dict(), "best_epoch": result.best_epoch,
                      "best_validation_accuracy": result.best_val_accuracy, "seconds": round(result.seconds, 1),
                      "history": result.history},
            verification=checks,
            versions={"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
                      "onnxruntime": onnxruntime.__version__, "tokenizers": tokenizers.__version__},
        )
        contract.write_manifest(staging, manifest)
        contract.check(staging)  # what the service will check at start, before the folder is published
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}; parity "
        f"{checks['parity_max_abs_diff']:.1e}, batch invariance {checks['batch_invariance_max_abs_diff']:.1e} "
        f"({checks['batch_invariance_argmax_changes']} argmax changes); wrote {out} in "
        f"{time.perf_counter() - started:.0f}s")
    return manifest


def check_output_folder(out: Path, force: bool) -> None:
    """Refuse, before any training, an ``--out`` that exists (without ``--force``) or cannot be written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out}: already exists and is not empty (pass --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=".probe-", dir=out.parent)).rmdir()
    except OSError as error:
        raise UserError(f"--out {out}: cannot write there ({error.strerror or error})") from None
