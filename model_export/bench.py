"""In-process onnxruntime throughput of an artifact: batch size x length grouping x threads."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from tokenizers import Tokenizer

from .export import run_batch, session
from .tokenizer import encode


def sentences_per_second(sess, sequences: list[list[int]], pad_id: int, batch_size: int, grouped: bool,
                         seconds: float) -> float:
    order = sorted(sequences, key=len) if grouped else sequences
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if grouped:
        random.Random(0).shuffle(batches)  # similar lengths inside a batch, not a sorted sweep over time
    done, started, position = 0, time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        batch = batches[position % len(batches)]
        run_batch(sess, batch, pad_id)
        done += len(batch)
        position += 1
    return done / (time.perf_counter() - started)


def bench(folder: Path, texts: list[str], seconds: float = 2.0, batch_sizes=(1, 64), threads=(1, 2)) -> list[dict]:
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    sequences = encode(tokenizer, texts, manifest["max_length"])
    random.Random(0).shuffle(sequences)
    rows = []
    for thread_count in threads:
        sess = session(folder / "model.onnx", threads=thread_count)
        run_batch(sess, sequences[:64], manifest["pad_id"])  # warm up
        for batch_size in batch_sizes:
            for grouped in ([False] if batch_size == 1 else [False, True]):
                rate = sentences_per_second(sess, sequences, manifest["pad_id"], batch_size, grouped, seconds)
                rows.append({"threads": thread_count, "batch": batch_size, "grouped": grouped,
                             "sentences_per_s": round(rate)})
    return rows
