"""Confidence you can act on: temperature scaling, expected calibration error, and selective-classification
thresholds, all fitted on the validation split (never the test split). numpy only.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar T before the softmax: it changes how
confident the model is, never which class it picks, so accuracy and the artifact contract are unchanged.
"""

from __future__ import annotations

import numpy as np

from contract import SELECTIVE_PRECISIONS

ECE_BINS = 15


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the targets under ``softmax(logits / temperature)``."""
    scaled = logits.astype(np.float64) / temperature
    top = scaled.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(scaled - top).sum(axis=1)) + top[:, 0]
    return float((log_norm - scaled[np.arange(len(targets)), targets]).mean())


def fit_temperature(logits: np.ndarray, targets: np.ndarray, low: float = 0.05, high: float = 20.0) -> float:
    """The T in [low, high] that minimises the NLL. The NLL is convex in 1/T, so a golden-section search on
    1/T finds the optimum deterministically (no optimizer state, no seed)."""
    ratio = (np.sqrt(5) - 1) / 2
    a, b = 1 / high, 1 / low
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(logits, targets, 1 / c), nll(logits, targets, 1 / d)
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(logits, targets, 1 / c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(logits, targets, 1 / d)
    return float(1 / ((a + b) / 2))


def reliability(probabilities: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width confidence bin: how many predictions, their mean confidence and their accuracy."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count,
                     "confidence": float(confidence[members].mean()) if count else None,
                     "accuracy": float(correct[members].mean()) if count else None})
    return rows


def ece(probabilities: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the count-weighted mean |accuracy - confidence| over equal-width bins."""
    rows = reliability(probabilities, targets, bins)
    total = sum(row["count"] for row in rows)
    return float(sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in rows if row["count"]) / total)


def coverage_curve(probabilities: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(threshold, coverage, precision) when answering only predictions whose max probability is >= threshold,
    one point per distinct confidence, most confident first."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    order = np.argsort(-confidence, kind="stable")
    confidence, correct = confidence[order], correct[order]
    answered = np.arange(1, len(order) + 1)
    precision = np.cumsum(correct) / answered
    last = np.r_[confidence[1:] != confidence[:-1], True]  # the last of each run of equal confidences
    return confidence[last], answered[last] / len(order), precision[last]


def thresholds(probabilities: np.ndarray, targets: np.ndarray,
               precisions: tuple[float, ...] = SELECTIVE_PRECISIONS) -> list[dict]:
    """For each target precision, the lowest max-probability threshold whose answered predictions reach it
    (the widest coverage that does), with that coverage; None when no threshold reaches it."""
    threshold, coverage, precision = coverage_curve(probabilities, targets)
    chosen = []
    for target in precisions:
        reach = np.nonzero(precision >= target)[0]
        if len(reach) == 0:
            chosen.append({"precision": target, "min_score": None, "coverage": 0.0, "achieved_precision": None})
            continue
        best = reach[-1]  # the largest coverage at which the precision still reaches the target
        chosen.append({"precision": target, "min_score": float(threshold[best]), "coverage": float(coverage[best]),
                       "achieved_precision": float(precision[best])})
    return chosen


def at_threshold(probabilities: np.ndarray, targets: np.ndarray, min_score: float) -> dict:
    """Coverage and precision of the predictions answered at ``min_score``."""
    confidence = probabilities.max(axis=1)
    answered = confidence >= min_score
    correct = probabilities.argmax(axis=1) == targets
    return {"coverage": float(answered.mean()),
            "precision": float(correct[answered].mean()) if answered.any() else None}
