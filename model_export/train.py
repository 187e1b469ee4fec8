"""Training: length-bucketed batches, AdamW + one-cycle, label smoothing, best epoch chosen on validation."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import contract

from .config import TrainConfig
from .model import ModelShape, SentenceClassifier


@dataclass
class TrainResult:
    model: SentenceClassifier
    best_epoch: int
    best_val_accuracy: float
    seconds: float
    history: list[dict] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``contract.pad`` as tensors: (ids [batch, seq], lengths [batch])."""
    ids, lengths = contract.pad(sequences, pad_id)
    return torch.from_numpy(ids), torch.from_numpy(lengths)


def bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, sort by length within pools of 50 batches, cut into batches, shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lengths.__getitem__)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@torch.no_grad()
def predict(model: SentenceClassifier, sequences: list[list[int]], pad_id: int, batch_size: int = 256,
            logits: bool = False) -> np.ndarray:
    """Probabilities (or, with ``logits``, the uncalibrated logits) for every sequence, in order (batches of
    similar lengths for speed)."""
    model.eval()
    run = model.logits if logits else model
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = np.zeros((len(sequences), model.shape.num_classes), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        ids, lengths = pad_batch([sequences[i] for i in index], pad_id)
        out[index] = run(ids, lengths).numpy()
    return out


class Training:
    """One training run, an epoch at a time, so a search can pause it and resume it later (successive halving).

    Running it to the end gives exactly what ``train`` gives: the run keeps its own torch random state (dropout
    masks) across pauses, so runs interleaved with others in one process stay reproducible for their seed.
    """

    def __init__(self, config: TrainConfig, train_ids: list[list[int]], train_labels: list[int],
                 val_ids: list[list[int]], val_labels: list[int], vocab_size: int, num_classes: int,
                 pad_id: int) -> None:
        seed_everything(config.seed)
        torch.set_num_threads(config.threads)
        shape = ModelShape(vocab_size=vocab_size, num_classes=num_classes, pad_id=pad_id,
                           embedding_dim=config.embedding_dim, hidden_size=config.hidden_size,
                           bidirectional=config.bidirectional, dropout=config.dropout,
                           embedding_dropout=config.embedding_dropout)
        self.config, self.pad_id = config, pad_id
        self.model = SentenceClassifier(shape)
        self.train_ids, self.val_ids = train_ids, val_ids
        self.targets = torch.tensor(train_labels, dtype=torch.int64)
        self.val_targets = np.asarray(val_labels)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.rng = random.Random(config.seed)
        self.lengths = [len(s) for s in train_ids]
        self.steps_per_epoch = len(bucketed_batches(self.lengths, config.batch_size, random.Random(0)))
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=config.learning_rate, total_steps=config.epochs * self.steps_per_epoch,
            pct_start=0.2)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.torch_state = torch.get_rng_state()
        self.epoch, self.best_epoch, self.best_accuracy = 0, 0, -1.0
        self.best_state: dict | None = None
        self.best_predictions: np.ndarray | None = None  # validation predictions at the best epoch
        self.history: list[dict] = []
        self.seconds = 0.0

    @property
    def done(self) -> bool:
        """The schedule is over, or validation has not improved for ``patience`` epochs."""
        return self.epoch >= self.config.epochs or (self.epoch > 0 and
                                                    self.epoch - self.best_epoch >= self.config.patience)

    def run_epoch(self, on_batch=None) -> dict:
        """Train one epoch, score validation, keep the best weights; returns the epoch's history row."""
        started = time.perf_counter()
        torch.set_num_threads(self.config.threads)
        torch.set_rng_state(self.torch_state)
        model = self.model
        model.train()
        self.epoch += 1
        total_loss, seen = 0.0, 0
        for batch in bucketed_batches(self.lengths, self.config.batch_size, self.rng):
            ids, batch_lengths = pad_batch([self.train_ids[i] for i in batch], self.pad_id)
            loss = self.loss_fn(model.logits(ids, batch_lengths), self.targets[batch])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), self.config.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            total_loss += loss.item() * len(batch)
            seen += len(batch)
            if on_batch is not None:
                on_batch(self.epoch, total_loss / seen, max(self.best_accuracy, 0.0))
        self.optimizer.zero_grad(set_to_none=True)  # a paused run holds no gradients
        predictions = predict(model, self.val_ids, self.pad_id).argmax(1)
        val_accuracy = float((predictions == self.val_targets).mean())
        self.torch_state = torch.get_rng_state()
        self.seconds += time.perf_counter() - started
        row = {"epoch": self.epoch, "train_loss": total_loss / seen, "val_accuracy": val_accuracy,
               "val_macro_f1": macro_f1(self.val_targets, predictions, self.model.shape.num_classes),
               "seconds": self.seconds}
        self.history.append(row)
        if val_accuracy > self.best_accuracy:
            self.best_accuracy, self.best_epoch, self.best_predictions = val_accuracy, self.epoch, predictions
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return row

    def result(self) -> TrainResult:
        """The model at its best validation epoch (so far, if the run is paused)."""
        assert self.epoch > 0, "run at least one epoch"
        if self.best_state is not None:  # None once released: the model holds the best weights already
            self.model.load_state_dict(self.best_state)
        self.model.eval()
        return TrainResult(self.model, self.best_epoch, self.best_accuracy, self.seconds, list(self.history))

    def release(self) -> None:
        """A finished run keeps only its best model: drop the optimizer, the training data references and the
        separate copy of the best weights (loaded into the model)."""
        self.result()
        self.best_state = None
        self.optimizer = self.scheduler = None  # type: ignore[assignment]
        self.train_ids = self.val_ids = []


def macro_f1(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    """Mean F1 over the classes present in ``targets`` or ``predictions``."""
    scores = []
    for c in range(num_classes):
        true, predicted = targets == c, predictions == c
        if not true.any() and not predicted.any():
            continue
        hits = float((true & predicted).sum())
        scores.append(2 * hits / (true.sum() + predicted.sum()))
    return float(np.mean(scores)) if scores else 0.0


def train(config: TrainConfig, train_ids: list[list[int]], train_labels: list[int], val_ids: list[list[int]],
          val_labels: list[int], vocab_size: int, num_classes: int, pad_id: int,
          progress: bool = True) -> TrainResult:
    run = Training(config, train_ids, train_labels, val_ids, val_labels, vocab_size, num_classes, pad_id)
    bar = tqdm(total=config.epochs * run.steps_per_epoch, desc="train", unit="batch", disable=not progress,
               leave=True)

    def on_batch(epoch: int, loss: float, best: float) -> None:
        bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}", val_acc=f"{best:.3f}")

    while not run.done:
        run.run_epoch(on_batch)
    bar.close()
    result = run.result()
    run.release()
    return result
