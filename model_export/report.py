"""Test-split metrics and the two PNGs written next to the artifact."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score  # noqa: E402


def test_metrics(targets: np.ndarray, predictions: np.ndarray, labels: list[str]) -> tuple[dict, str]:
    """(metrics for the manifest, the per-class report as text)."""
    indices = list(range(len(labels)))
    report = classification_report(targets, predictions, labels=indices, target_names=labels, digits=3,
                                    zero_division=0)
    per_class = classification_report(targets, predictions, labels=indices, target_names=labels,
                                      output_dict=True, zero_division=0)
    metrics = {
        "accuracy": float(accuracy_score(targets, predictions)),
        "macro_f1": float(f1_score(targets, predictions, labels=indices, average="macro", zero_division=0)),
        "test_rows": int(len(targets)),
        "per_class": {
            label: {key: round(float(per_class[label][key]), 4) for key in ("precision", "recall", "f1-score", "support")}
            for label in labels
        },
    }
    return metrics, report


def plot_confusion_matrix(targets: np.ndarray, predictions: np.ndarray, labels: list[str], path: Path) -> None:
    matrix = confusion_matrix(targets, predictions, labels=list(range(len(labels))), normalize="true")
    size = max(6.0, 0.14 * len(labels) + 3)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(labels))
    fontsize = 8 if len(labels) <= 20 else 4
    ax.set_xticks(ticks, labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (test split, row-normalised)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training_curve(history: list[dict], best_epoch: int, path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, loss_ax = plt.subplots(figsize=(7, 4))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:red", label="train loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    loss_ax.set_ylabel("train loss", color="tab:red")
    acc_ax = loss_ax.twinx()
    acc_ax.plot(epochs, [h["val_accuracy"] for h in history], "s-", color="tab:blue", label="validation accuracy")
    acc_ax.set_ylabel("validation accuracy", color="tab:blue")
    acc_ax.axvline(best_epoch, color="gray", linestyle="--", linewidth=1)
    acc_ax.annotate(f"kept: epoch {best_epoch}", (best_epoch, acc_ax.get_ylim()[0]), fontsize=8, xytext=(4, 6),
                    textcoords="offset points")
    loss_ax.set_title("Training curve")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(before: np.ndarray, after: np.ndarray | None, targets: np.ndarray, path: Path) -> None:
    """Reliability diagram on the test split: accuracy against confidence per bin, before and after calibration."""
    from .calibration import ece, reliability

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfectly calibrated")
    for probabilities, name, style in ((before, "uncalibrated", "o-"), (after, "temperature-scaled", "s-")):
        if probabilities is None:
            continue
        rows = [row for row in reliability(probabilities, targets) if row["count"]]
        ax.plot([row["confidence"] for row in rows], [row["accuracy"] for row in rows], style,
                label=f"{name} (ECE {ece(probabilities, targets):.3f})")
    _finish(fig, ax, path, "Reliability diagram (test split, 15 bins)", "confidence (max probability)", "accuracy",
            "upper left")


def plot_coverage(validation: np.ndarray, validation_targets: np.ndarray, test: np.ndarray,
                  test_targets: np.ndarray, path: Path) -> None:
    """Selective classification: precision of the answered predictions against the share answered."""
    from .calibration import coverage_curve

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for probabilities, targets, name in ((validation, validation_targets, "validation"), (test, test_targets, "test")):
        _, coverage, precision = coverage_curve(probabilities, targets)
        ax.plot(coverage, precision, label=name)
    _finish(fig, ax, path, "Coverage vs precision (answer only when max probability >= threshold)",
            "coverage (share of predictions answered)", "precision of the answered predictions", "lower left",
            full_y=False)


def plot_open_set(validation: tuple, test: tuple, record: dict, path: Path) -> None:
    """In-scope accuracy against out-of-scope recall as the abstention threshold rises, and the chosen point."""
    from .openset import curve

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for (in_probabilities, in_targets, oos_probabilities), name in ((validation, "validation"), (test, "test")):
        recall, accuracy = curve(in_probabilities, in_targets, oos_probabilities)
        ax.plot(recall, accuracy, label=name)
    chosen = record["test"]
    ax.plot([chosen["oos_recall"]], [chosen["in_scope_accuracy"]], "k*", markersize=10,
            label=f"threshold {record['min_score']:.3f} (chosen on validation), on test")
    _finish(fig, ax, path, "Out of scope: abstention threshold from 0 to 1", "out-of-scope recall (share abstained on)",
            "in-scope accuracy (abstaining counts as wrong)", "lower left")


def _finish(fig, ax, path: Path, title: str, xlabel: str, ylabel: str, legend: str, full_y: bool = True) -> None:
    """Axes on [0, 1], labels, legend; write the PNG."""
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(0, 1))
    if full_y:
        ax.set_ylim(0, 1)
    ax.legend(loc=legend, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tune(trials: list[int], scores: list[float], complete: list[bool], winner: int, path: Path) -> None:
    """Validation accuracy per trial (at the last milestone it reached), the complete trials' running best, the
    default (trial 0) and the winner marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    done = [i for i, c in enumerate(complete) if c]
    paused = [i for i, c in enumerate(complete) if not c]
    ax.scatter([trials[i] for i in paused], [scores[i] for i in paused], color="tab:gray", s=18,
               label="stopped by halving or budget")
    ax.scatter([trials[i] for i in done], [scores[i] for i in done], color="tab:blue", s=24, label="ran to its end")
    best, running = -1.0, []
    for i in range(len(trials)):
        best = max(best, scores[i]) if complete[i] else best
        running.append(best if best >= 0 else np.nan)
    ax.step(trials, running, where="post", color="tab:blue", linewidth=1, label="best complete so far")
    ax.axhline(scores[0], color="tab:orange", linestyle="--", linewidth=1, label="default (trial 0)")
    ax.scatter([winner], [scores[trials.index(winner)]], marker="*", s=160, color="tab:red", zorder=3, label="winner")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("validation accuracy")
    ax.set_title("Search: validation accuracy by trial")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
