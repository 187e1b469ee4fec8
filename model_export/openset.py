"""Out-of-scope ("none of the above") data: keep it out of training, and choose on validation the abstention
threshold that keeps the most in-scope accuracy while catching a stated share of out-of-scope sentences.

- ``--oos-label NAME``: rows with this label are out of scope. They are never trained on (the model has no such
  class); the training file's ones are scored with the validation split, the test file's ones with the test split.
- ``--oos-classes A,B,...``: the open-set protocol on a dataset without such a class: these intents are held out
  of training entirely and their sentences become out of scope (relabelled ``--oos-label``, default ``oos``).

At a threshold t a sentence is answered when its top probability is >= t. In-scope accuracy counts an abstention
on an in-scope sentence as an error; out-of-scope recall is the share of out-of-scope sentences abstained on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .data import Dataset, Split
from .errors import UserError

DEFAULT_LABEL = "oos"


@dataclass
class OutOfScope:
    label: str
    held_out_classes: list[str]
    train_texts: list[str]  # scored with the validation split
    test_texts: list[str]
    target_recall: float


def separate(dataset: Dataset, label: str | None, classes: list[str], target_recall: float) -> tuple[Dataset, OutOfScope | None]:
    """The dataset without its out-of-scope rows, and those rows; (dataset, None) when neither option is given."""
    if label is None and not classes:
        return dataset, None
    if not 0 < target_recall < 1:
        raise UserError(f"--oos-recall must be between 0 and 1, got {target_recall}")
    label = label or DEFAULT_LABEL
    known = set(dataset.train.labels)
    unknown = [c for c in classes if c not in known]
    if unknown:
        raise UserError(f"--oos-classes: not a label of the training data: {', '.join(unknown)}")
    moved = set(classes) | {label}
    if classes and label in known and label not in classes:
        raise UserError(f"--oos-label {label!r} is already a label of the data: pick another name for the held-out "
                        "classes")

    def split(part: Split) -> tuple[Split, list[str]]:
        keep = [i for i, y in enumerate(part.labels) if y not in moved]
        gone = [part.texts[i] for i, y in enumerate(part.labels) if y in moved]
        return Split([part.texts[i] for i in keep], [part.labels[i] for i in keep]), gone

    train, train_oos = split(dataset.train)
    test, test_oos = split(dataset.test)
    if not train_oos:
        raise UserError(f"--oos-label {label!r}: no training row has this label (it is needed to choose the "
                        "threshold on validation)")
    if not test_oos:
        raise UserError(f"--oos-label {label!r}: no test row has this label")
    if len(set(train.labels)) < 2:
        raise UserError("fewer than two in-scope classes are left once the out-of-scope rows are taken out")
    return replace(dataset, train=train, test=test), OutOfScope(label, sorted(classes), train_oos, test_oos,
                                                                target_recall)


def at(in_probabilities: np.ndarray, in_targets: np.ndarray, oos_probabilities: np.ndarray,
       min_score: float) -> dict:
    """In-scope accuracy and coverage, and out-of-scope recall, when answering only at or above ``min_score``."""
    confident = in_probabilities.max(axis=1) >= min_score
    correct = in_probabilities.argmax(axis=1) == in_targets
    return {"in_scope_accuracy": float((confident & correct).mean()), "in_scope_coverage": float(confident.mean()),
            "oos_recall": float((oos_probabilities.max(axis=1) < min_score).mean())}


def choose(oos_probabilities: np.ndarray, target_recall: float) -> float:
    """The lowest threshold at which at least ``target_recall`` of the out-of-scope sentences are abstained on
    (the lowest keeps the most in-scope answers, since in-scope accuracy only falls as the threshold rises)."""
    confidence = np.sort(oos_probabilities.max(axis=1))
    needed = int(np.ceil(target_recall * len(confidence)))
    return float(min(np.nextafter(confidence[needed - 1], np.inf), 1.0))  # a probability: never above 1


def curve(in_probabilities: np.ndarray, in_targets: np.ndarray, oos_probabilities: np.ndarray,
          points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """(out-of-scope recall, in-scope accuracy) over thresholds from 0 to 1."""
    rows = [at(in_probabilities, in_targets, oos_probabilities, t) for t in np.linspace(0, 1, points)]
    return np.array([r["oos_recall"] for r in rows]), np.array([r["in_scope_accuracy"] for r in rows])


def report(oos: OutOfScope, validation: tuple[np.ndarray, np.ndarray, np.ndarray],
           test: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict:
    """The manifest's ``open_set`` record: the threshold chosen on validation, and what it gives on test."""
    min_score = choose(validation[2], oos.target_recall)
    return {"oos_label": oos.label, "held_out_classes": oos.held_out_classes,
            "validation_oos_rows": len(validation[2]), "test_oos_rows": len(test[2]),
            "target_oos_recall": oos.target_recall, "min_score": min_score, "chosen_on": "validation",
            "validation": at(*validation, min_score), "test": at(*test, min_score),
            "test_without_threshold": {"in_scope_accuracy": float((test[0].argmax(1) == test[1]).mean()),
                                       "oos_recall": 0.0}}
