"""In-process onnxruntime throughput of an artifact: batch size x length grouping x threads, with or without
tokenization. The one model-ceiling measurement: ``python -m model_export bench`` prints it and the benchmark
harness (``loadtest``) reports it as M. Torch-free: it runs where the service runs."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path

import contract


def batches_of(texts: Sequence[str], lengths: Sequence[int], size: int, grouped: bool) -> list[list[int]]:
    """Indices of ``texts`` cut into batches of ``size``: in the given order, or of similar token length
    (sorted by length, cut, then the batches shuffled: grouped, but not a sorted sweep over time)."""
    order = sorted(range(len(texts)), key=lengths.__getitem__) if grouped else list(range(len(texts)))
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    if grouped:
        random.Random(0).shuffle(batches)
    return batches


def sentences_per_second(artifact: contract.Artifact, texts: Sequence[str], size: int, grouped: bool,
                         seconds: float, tokenize: bool) -> float:
    """Run batches for about ``seconds``; with ``tokenize``, each run encodes its texts first (as a server must)."""
    manifest = artifact.manifest
    ids = artifact.encoder.encode(texts)[0]
    batches = batches_of(texts, [len(s) for s in ids], size, grouped)
    session, names = artifact.session, [contract.PROBABILITIES]
    done, position, started = 0, 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch = batches[position % len(batches)]
        if tokenize:
            sequences = artifact.encoder.encode([texts[i] for i in batch])[0]
        else:
            sequences = [ids[i] for i in batch]
        session.run(names, contract.inputs(sequences, manifest.pad_id, manifest.input_names))
        done, position = done + len(batch), position + 1
    return done / (time.perf_counter() - started)


def bench(folder: Path, texts: list[str], seconds: float = 2.0, batch_sizes=(1, 64), threads=(1, 2),
          tokenize: bool = False) -> list[dict]:
    texts = list(texts)
    random.Random(0).shuffle(texts)
    rows = []
    for thread_count in threads:
        artifact = contract.check(folder, intra_op_threads=thread_count)
        sentences_per_second(artifact, texts[:64], 64, False, 0.2, tokenize)  # warm up
        for size in batch_sizes:
            for grouped in ([False] if size == 1 else [False, True]):
                rate = sentences_per_second(artifact, texts, size, grouped, seconds, tokenize)
                rows.append({"threads": thread_count, "batch": size, "grouped": grouped, "tokenize": tokenize,
                             "sentences_per_s": round(rate)})
    return rows
