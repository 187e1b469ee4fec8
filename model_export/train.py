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


def train(
    config: TrainConfig,
    train_ids: list[list[int]],
    train_labels: list[int],
    val_ids: list[list[int]],
    val_labels: list[int],
    vocab_size: int,
    num_classes: int,
    pad_id: int,
    progress: bool = True,
) -> TrainResult:
    seed_everything(config.seed)
    torch.set_num_threads(config.threads)
    shape = ModelShape(
        vocab_size=vocab_size,
        num_classes=num_classes,
        pad_id=pad_id,
        embedding_dim=config.embedding_dim,
        hidden_size=config.hidden_size,
        bidirectional=config.bidirectional,
        dropout=config.dropout,
        embedding_dropout=config.embedding_dropout,
    )
    model = SentenceClassifier(shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    rng = random.Random(config.seed)
    lengths = [len(s) for s in train_ids]
    steps_per_epoch = len(bucketed_batches(lengths, config.batch_size, random.Random(0)))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.epochs * steps_per_epoch, pct_start=0.2
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    targets = torch.tensor(train_labels, dtype=torch.int64)
    val_targets = np.asarray(val_labels)

    best_accuracy, best_epoch, best_state = -1.0, 0, None
    history: list[dict] = []
    started = time.perf_counter()
    bar = tqdm(total=config.epochs * steps_per_epoch, desc="train", unit="batch", disable=not progress, leave=True)
    for epoch in range(1, config.epochs + 1):
        model.train()
        total_loss, seen = 0.0, 0
        for batch in bucketed_batches(lengths, config.batch_size, rng):
            ids, batch_lengths = pad_batch([train_ids[i] for i in batch], pad_id)
            loss = loss_fn(model.logits(ids, batch_lengths), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(batch)
            seen += len(batch)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{total_loss / seen:.3f}", val_acc=f"{max(best_accuracy, 0):.3f}")
        val_accuracy = float((predict(model, val_ids, pad_id).argmax(1) == val_targets).mean())
        history.append({"epoch": epoch, "train_loss": total_loss / seen, "val_accuracy": val_accuracy,
                        "seconds": time.perf_counter() - started})
        if val_accuracy > best_accuracy:
            best_accuracy, best_epoch = val_accuracy, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar.set_postfix(epoch=epoch, loss=f"{total_loss / seen:.3f}", val_acc=f"{val_accuracy:.3f}")
        if epoch - best_epoch >= config.patience:
            break
    bar.close()
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model, best_epoch, best_accuracy, time.perf_counter() - started, history)
