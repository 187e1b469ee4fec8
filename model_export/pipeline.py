"""From a dataset to a verified artifact folder: the whole training path in one function."""

from __future__ import annotations

import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime
import tokenizers
import torch
from tokenizers import Tokenizer

import contract

from . import calibration, openset
from .config import TrainConfig
from .data import Dataset, Split, stratified_split
from .export import export_onnx, verify
from .report import (plot_confusion_matrix, plot_coverage, plot_open_set, plot_reliability, plot_training_curve,
                     test_metrics)
from .tokenizer import PAD, UNK, fit_tokenizer
from .train import Training, TrainResult, macro_f1, predict, train


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


@dataclass
class Prepared:
    """The splits, the tokenizer fitted on the training rows, and both splits as ids and class indices."""

    tokenizer: Tokenizer
    labels: list[str]
    fit: Split
    validation: Split
    fit_ids: list[list[int]]
    fit_targets: list[int]
    validation_ids: list[list[int]]
    validation_targets: list[int]

    def training(self, config: TrainConfig) -> Training:
        """A training run of ``config`` on these splits (``config`` must share the vocabulary and length)."""
        return Training(config, self.fit_ids, self.fit_targets, self.validation_ids, self.validation_targets,
                        self.tokenizer.get_vocab_size(), len(self.labels), self.tokenizer.token_to_id(PAD))

    def fitted(self, result: TrainResult) -> Fitted:
        return Fitted(self.tokenizer, self.labels, self.fit, self.validation, result)


def prepare(dataset: Dataset, config: TrainConfig) -> Prepared:
    """Hold out validation, fit the tokenizer on the rest of train, encode both; the test split is not read."""
    fit, validation = stratified_split(dataset.train.texts, dataset.train.labels, config.validation_fraction,
                                       config.seed, "validation")
    labels = sorted(set(dataset.train.labels))
    index = {label: i for i, label in enumerate(labels)}
    tokenizer = fit_tokenizer(fit.texts, config.vocab_size)
    encoder = contract.Encoder(tokenizer, config.max_length, tokenizer.token_to_id(UNK))
    return Prepared(tokenizer, labels, fit, validation, encoder.encode(fit.texts)[0],
                    [index[label] for label in fit.labels], encoder.encode(validation.texts)[0],
                    [index[label] for label in validation.labels])


def fit_model(dataset: Dataset, config: TrainConfig, progress: bool = True, log=print) -> Fitted:
    """``prepare``, then train; the test split is not read."""
    prepared = prepare(dataset, config)
    log(f"data: {len(prepared.fit)} train, {len(prepared.validation)} validation, {len(dataset.test)} test rows, "
        f"{len(prepared.labels)} classes; vocabulary {prepared.tokenizer.get_vocab_size()}; skipped "
        f"{dataset.skipped_empty} empty text(s)")
    result = train(config, prepared.fit_ids, prepared.fit_targets, prepared.validation_ids,
                   prepared.validation_targets, prepared.tokenizer.get_vocab_size(), len(prepared.labels),
                   prepared.tokenizer.token_to_id(PAD), progress=progress)
    log(f"trained in {result.seconds:.0f}s; kept epoch {result.best_epoch} (validation accuracy "
        f"{result.best_val_accuracy:.4f})")
    return prepared.fitted(result)


def calibrate(fitted: Fitted, config: TrainConfig, validation_targets: np.ndarray) -> tuple[dict, np.ndarray]:
    """Fit the temperature on validation and set it on the model. Returns the calibration record and the
    validation probabilities the model now gives (with the temperature, or without when calibration is off)."""
    model = fitted.result.model
    logits = predict(model, fitted.ids(fitted.validation.texts, config.max_length), fitted.pad_id, logits=True)
    if not config.calibrate:
        return {"enabled": False}, calibration.softmax(logits)
    record, after = fit_temperature(logits, validation_targets)
    model.temperature.fill_(record["temperature"])
    return record, after


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> tuple[dict, np.ndarray]:
    """Temperature scaling fitted on the validation logits: the manifest's calibration record and the calibrated
    validation probabilities."""
    temperature = calibration.fit_temperature(logits, targets)
    before, after = calibration.softmax(logits), calibration.softmax(logits, temperature)
    record = {"enabled": True, "method": "temperature scaling", "fitted_on": "validation",
              "temperature": temperature, "bins": calibration.ECE_BINS,
              "validation_nll_before": calibration.nll(logits, targets),
              "validation_nll_after": calibration.nll(logits, targets, temperature),
              "validation_ece_before": calibration.ece(before, targets),
              "validation_ece_after": calibration.ece(after, targets)}
    return record, after


def calibration_on_test(uncalibrated: np.ndarray, calibrated: np.ndarray, targets: np.ndarray) -> dict:
    """What the temperature did on the test split, for the calibration record."""
    return {"test_ece_before": calibration.ece(uncalibrated, targets),
            "test_ece_after": calibration.ece(calibrated, targets),
            "argmax_changes": int((uncalibrated.argmax(1) != calibrated.argmax(1)).sum())}


def selective(validation_probabilities: np.ndarray, validation_targets: np.ndarray, test_probabilities: np.ndarray,
              test_targets: np.ndarray) -> dict:
    """The max-probability thresholds that reach each target precision on validation, and what each gives on
    test (coverage, precision), for the manifest and the service's ``min_precision``."""
    rows = []
    for row in calibration.thresholds(validation_probabilities, validation_targets):
        test = (calibration.at_threshold(test_probabilities, test_targets, row["min_score"])
                if row["min_score"] is not None else {"coverage": 0.0, "precision": None})
        rows.append({"precision": row["precision"], "min_score": row["min_score"],
                     "validation_coverage": row["coverage"], "validation_precision": row["achieved_precision"],
                     "test_coverage": test["coverage"], "test_precision": test["precision"]})
    return {"chosen_on": "validation", "score": "max probability", "thresholds": rows}


def drift_reference(fitted: Fitted, max_length: int, validation_probabilities: np.ndarray) -> dict:
    """Each drift signal's share per bin (``contract.drift_bins``): length, unknown tokens and predicted class on
    the training rows, top score on validation (training rows are scored over-confidently)."""
    ids = fitted.ids(fitted.fit.texts, max_length)
    probabilities = predict(fitted.result.model, ids, fitted.pad_id)
    return drift_record(ids, probabilities, validation_probabilities, fitted.tokenizer.token_to_id(UNK))


def drift_record(ids: list[list[int]], probabilities: np.ndarray, validation_probabilities: np.ndarray,
                 unk_id: int) -> dict:
    """The manifest's ``drift``: each signal's share per bin, from the training rows' ids and probabilities and
    the validation rows' probabilities."""
    sizes = contract.drift_sizes(probabilities.shape[1])
    counts = {name: np.zeros(size) for name, size in sizes.items()}
    for sentence, row in zip(ids, probabilities):
        length, unknown, top, _ = contract.drift_bins(sentence, unk_id, int(row.argmax()), float(row.max()))
        counts["length"][length] += 1
        counts["unknown_tokens"][unknown] += 1
        counts["predicted_class"][top] += 1
    for row in validation_probabilities:
        counts["top_score"][contract.drift_bins([0], unk_id, 0, float(row.max()))[3]] += 1
    return {"reference": {name: (c / c.sum()).round(6).tolist() for name, c in counts.items()},
            "rows": {"training": len(ids), "validation": len(validation_probabilities)},
            "signals": {"length": "tokens per sentence", "unknown_tokens": "share of [UNK] tokens",
                        "predicted_class": "the most likely class", "top_score": "the top probability (validation)"}}


def test_scores(fitted: Fitted, dataset: Dataset, max_length: int) -> dict:
    """Torch accuracy and macro-F1 on the test split (for seed sweeps and searches without an artifact;
    artifacts are scored through onnxruntime)."""
    index = {label: i for i, label in enumerate(fitted.labels)}
    probabilities = predict(fitted.result.model, fitted.ids(dataset.test.texts, max_length), fitted.pad_id)
    targets = np.array([index[label] for label in dataset.test.labels])
    predictions = probabilities.argmax(1)
    return {"accuracy": float((predictions == targets).mean()),
            "macro_f1": macro_f1(targets, predictions, len(fitted.labels))}


def build_artifact(dataset: Dataset, config: TrainConfig, out: Path, name: str, version: str,
                   dataset_info: dict, progress: bool = True, log=print,
                   oos: openset.OutOfScope | None = None, fitted: Fitted | None = None, tuning: dict | None = None,
                   extras: Callable[[Path], None] | None = None) -> contract.Manifest:
    """Train, evaluate on test once, export, verify, and move the finished folder to ``out``. Returns the manifest.
    ``oos``: out-of-scope sentences (never trained on) to choose the abstention threshold with. ``fitted``: a model
    already trained with ``config`` (``tune``'s winner) instead of training one; ``tuning``: the search's record
    for the manifest; ``extras``: writes more files (reports) into the folder before it is published."""
    started = time.perf_counter()
    fitted = fitted or fit_model(dataset, config, progress, log)
    tokenizer, labels, fit, validation, result = (fitted.tokenizer, fitted.labels, fitted.fit, fitted.validation,
                                                  fitted.result)
    index = {label: i for i, label in enumerate(labels)}
    pad_id, unk_id = tokenizer.token_to_id(PAD), tokenizer.token_to_id(UNK)
    validation_targets = np.array([index[label] for label in validation.labels])
    calibrated, validation_probabilities = calibrate(fitted, config, validation_targets)
    if calibrated["enabled"]:
        log(f"calibration: temperature {calibrated['temperature']:.3f} (validation NLL "
            f"{calibrated['validation_nll_before']:.4f} -> {calibrated['validation_nll_after']:.4f})")

    with staged(out) as staging:
        tokenizer.save(str(staging / "tokenizer.json"))
        contract.write_json(staging / "labels.json", labels)
        export_onnx(result.model, staging / "model.onnx")

        # The test split is touched here, once, after the model was chosen on validation.
        test_ids = fitted.ids(dataset.test.texts, config.max_length)
        checks, probabilities = verify(staging / "model.onnx", test_ids, predict(result.model, test_ids, pad_id),
                                       pad_id)
        targets = np.array([index[label] for label in dataset.test.labels])
        predictions = probabilities.argmax(1)
        metrics, report = test_metrics(targets, predictions, labels)
        log(report)
        plot_confusion_matrix(targets, predictions, labels, staging / "confusion_matrix.png")
        plot_training_curve(result.history, result.best_epoch, staging / "training_curve.png")
        uncalibrated = calibration.softmax(predict(result.model, test_ids, pad_id, logits=True))
        if calibrated["enabled"]:
            calibrated |= calibration_on_test(uncalibrated, probabilities, targets)
            log(f"calibration: test ECE {calibrated['test_ece_before']:.4f} -> {calibrated['test_ece_after']:.4f} "
                f"({calibrated['argmax_changes']} argmax changes)")
        plot_reliability(uncalibrated, probabilities if calibrated["enabled"] else None, targets,
                         staging / "reliability_diagram.png")
        thresholds = selective(validation_probabilities, validation_targets, probabilities, targets)
        plot_coverage(validation_probabilities, validation_targets, probabilities, targets,
                      staging / "coverage_curve.png")
        log(selective_table(thresholds))
        drift = drift_reference(fitted, config.max_length, validation_probabilities)
        open_set = {}
        if oos is not None:
            model = result.model
            validation_oos = predict(model, fitted.ids(oos.train_texts, config.max_length), pad_id)
            test_oos = predict(model, fitted.ids(oos.test_texts, config.max_length), pad_id)
            open_set = openset.report(oos, (validation_probabilities, validation_targets, validation_oos),
                                      (probabilities, targets, test_oos))
            plot_open_set((validation_probabilities, validation_targets, validation_oos),
                          (probabilities, targets, test_oos), open_set, staging / "open_set_curve.png")
            log(f"out of scope: threshold {open_set['min_score']:.4f} chosen on validation for "
                f"{oos.target_recall:.0%} recall; test in-scope accuracy {open_set['test']['in_scope_accuracy']:.4f} "
                f"(without it {open_set['test_without_threshold']['in_scope_accuracy']:.4f}), out-of-scope recall "
                f"{open_set['test']['oos_recall']:.4f} ({len(oos.test_texts)} test sentences)")

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
                      "history": result.history} | ({"tune": tuning} if tuning else {}),
            verification=checks,
            calibration=calibrated,
            selective=thresholds,
            open_set=open_set,
            drift=drift,
            versions=library_versions(),
        )
        contract.write_manifest(staging, manifest)
        if extras is not None:
            extras(staging)
        contract.check(staging)  # what the service will check at start, before the folder is published
    log(f"test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}; parity "
        f"{checks['parity_max_abs_diff']:.1e}, batch invariance {checks['batch_invariance_max_abs_diff']:.1e} "
        f"({checks['batch_invariance_argmax_changes']} argmax changes); wrote {out} in "
        f"{time.perf_counter() - started:.0f}s")
    return manifest


def library_versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "tokenizers": tokenizers.__version__}


def selective_table(selective: dict) -> str:
    """The thresholds as a Markdown table: validation (where they were chosen) beside test."""
    lines = ["| target precision | min_score | validation coverage | validation precision | test coverage | "
             "test precision |", "|---:|---:|---:|---:|---:|---:|"]
    for row in selective["thresholds"]:
        cells = [f"{row['precision']:.0%}"]
        for key in ("min_score", "validation_coverage", "validation_precision", "test_coverage", "test_precision"):
            value = row[key]
            cells.append("-" if value is None else f"{value:.4f}" if key == "min_score" else f"{value:.1%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A hidden folder beside ``out`` to write an artifact into: renamed into place as ``out`` (replacing it) when
    the block ends, deleted when it raises, so no reader (the service's repository poller) sees half a folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; a container's non-root user must read the artifact
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

