"""ONNX export per the artifact contract, then the two checks that make it trustworthy: parity and batch invariance."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import contract
from contract import OPSET, TOLERANCE

from .errors import UserError
from .model import SentenceClassifier
from .train import pad_batch


def export_onnx(model: SentenceClassifier, path: Path) -> None:
    """One self-contained ``model.onnx`` with ONNX ``LSTM`` ops and dynamic batch/sequence axes.

    The TorchScript exporter (``dynamo=False``) is used: measured here, the dynamo exporter's graph
    failed in onnxruntime on a sequence length other than the traced one ("invalid expand shape")
    and writes weights to a separate ``.data`` file by default.
    """
    model.eval()
    ids, lengths = pad_batch([[1, 2, 3], [4, 5], [6, 7, 8, 9]], model.shape.pad_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (ids, lengths),
            str(path),
            input_names=[contract.INPUT_IDS, contract.LENGTHS],
            output_names=[contract.PROBABILITIES],
            dynamic_axes={contract.INPUT_IDS: {0: "batch", 1: "seq"}, contract.LENGTHS: {0: "batch"},
                          contract.PROBABILITIES: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    ops = {node.op_type for node in graph.graph.node}
    if "LSTM" not in ops or "Softmax" not in ops:
        raise RuntimeError(f"exported graph lacks LSTM or Softmax ops: {sorted(ops)}")


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=[contract.CPU])


LSTM_INPUTS = contract.SIGNATURES["lstm"][0]


def run_batch(sess: ort.InferenceSession, sequences: list[list[int]], pad_id: int,
              names: tuple[str, ...] = LSTM_INPUTS) -> np.ndarray:
    return sess.run([contract.PROBABILITIES], contract.inputs(sequences, pad_id, names))[0]


def onnx_predict(sess: ort.InferenceSession, sequences: list[list[int]], pad_id: int, batch_size: int = 64,
                 shuffle_seed: int | None = None, names: tuple[str, ...] = LSTM_INPUTS) -> np.ndarray:
    """Probabilities in input order; batches of consecutive items, or of a random mix when ``shuffle_seed`` is set.
    ``names``: the graph's inputs (a manifest's ``input_names``)."""
    order = list(range(len(sequences)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    parts = []
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        parts.append((index, run_batch(sess, [sequences[i] for i in index], pad_id, names)))
    out = np.zeros((len(sequences), parts[0][1].shape[1]), dtype=np.float32)
    for index, probabilities in parts:
        out[index] = probabilities
    return out


def verify(onnx_path: Path, sequences: list[list[int]], reference: np.ndarray, pad_id: int,
           names: tuple[str, ...] = LSTM_INPUTS, parity_tolerance: float = TOLERANCE) -> tuple[dict, np.ndarray]:
    """Parity (ONNX vs ``reference``, torch's probabilities of ``sequences``, within ``parity_tolerance``) and batch
    invariance (alone vs inside mixed-length padded batches, within ``TOLERANCE``) on ``sequences``; ``names``: the
    graph's inputs.

    Returns the checks and the ONNX probabilities of each sentence run alone (the caller scores them).
    Raises ``UserError`` when either bound is broken, so a bad artifact is never written as good.
    """
    sess = session(onnx_path)
    alone = np.concatenate([run_batch(sess, [s], pad_id, names) for s in sequences])
    mixes = [onnx_predict(sess, sequences, pad_id, size, seed, names) for size, seed in ((64, 1), (17, 2), (256, 3))]
    mixed = np.maximum.reduce([np.abs(probabilities - alone) for probabilities in mixes])
    argmax_changes = np.logical_or.reduce([probabilities.argmax(1) != alone.argmax(1) for probabilities in mixes])
    result = {
        "checked_sentences": len(sequences),
        "parity_max_abs_diff": float(np.abs(reference - alone).max()),
        "batch_invariance_max_abs_diff": float(mixed.max()),
        "batch_invariance_argmax_changes": int(argmax_changes.sum()),
        "tolerance": TOLERANCE,
        "parity_tolerance": parity_tolerance,
    }
    if result["parity_max_abs_diff"] > parity_tolerance:
        raise UserError(f"ONNX vs torch parity broken: max abs diff {result['parity_max_abs_diff']:.2e} > "
                        f"{parity_tolerance}")
    if result["batch_invariance_max_abs_diff"] > TOLERANCE or result["batch_invariance_argmax_changes"]:
        raise UserError(
            f"batch invariance broken: max abs diff {result['batch_invariance_max_abs_diff']:.2e}, "
            f"{result['batch_invariance_argmax_changes']} argmax changes"
        )
    return result, alone
