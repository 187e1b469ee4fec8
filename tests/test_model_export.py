"""model_export: data errors, tokenizer, the padding regression, a tiny end-to-end training run, the contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tokenizers import Tokenizer

from model_export.artifact import check_hashes, sha256
from model_export.data import load_dataset
from model_export.errors import UserError
from model_export.model import ModelShape, SentenceClassifier, reverse_within_length
from model_export.tokenizer import encode, fit_tokenizer
from model_export.train import pad_batch

ROOT = Path(__file__).resolve().parents[1]
TEST_ARTIFACT = ROOT / "artifacts" / "test-model" / "1"
SHIPPED = ROOT / "models" / "banking77" / "1"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_export", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def toy_rows(classes: int = 3, per_class: int = 20) -> list[tuple[str, str]]:
    words = {0: "card lost stolen missing", 1: "transfer money send bank", 2: "refund return payment back"}
    return [(f"my {words[c % 3].split()[i % 4]} please {i}", f"class_{c}") for c in range(classes)
            for i in range(per_class)]


# ---- data loading: every user error is one clear line -------------------------------------------------------------

def test_missing_column_lists_existing_columns(tmp_path):
    write(tmp_path / "d.csv", "sentence,category\nhello,a\n")
    with pytest.raises(UserError, match=r"no column 'text'; columns are: 'sentence', 'category'"):
        load_dataset(tmp_path / "d.csv", test_fraction=0.5)


def test_non_utf8_names_the_line(tmp_path):
    write(tmp_path / "d.csv", b"text,label\nfine,a\nbad \xff byte,b\n")
    with pytest.raises(UserError, match="line 3 is not valid UTF-8"):
        load_dataset(tmp_path / "d.csv", test_fraction=0.5)


def test_empty_texts_are_skipped_and_counted(tmp_path):
    rows = "".join(f"{t},{label}\n" for t, label in toy_rows()) + " ,class_0\n\"   \",class_1\n"
    write(tmp_path / "d.csv", "text,label\n" + rows)
    dataset = load_dataset(tmp_path / "d.csv", test_fraction=0.25)
    assert dataset.skipped_empty == 2
    assert len(dataset.train) + len(dataset.test) == 60


def test_fewer_than_two_classes(tmp_path):
    write(tmp_path / "d.csv", "text,label\na,x\nb,x\nc,x\n")
    with pytest.raises(UserError, match="at least two classes"):
        load_dataset(tmp_path / "d.csv", test_fraction=0.5)


def test_class_too_small_to_split_is_named(tmp_path):
    write(tmp_path / "d.csv", "text,label\na,x\nb,x\nc,y\n")
    with pytest.raises(UserError, match="class 'y' has 1 row"):
        load_dataset(tmp_path / "d.csv", test_fraction=0.5)


def test_tsv_and_jsonl_and_folder(tmp_path):
    rows = toy_rows()
    write(tmp_path / "d.tsv", "text\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in rows))
    write(tmp_path / "d.jsonl", "".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows))
    for name in ("d.tsv", "d.jsonl"):
        dataset = load_dataset(tmp_path / name, test_fraction=0.2)
        assert len(dataset.train) == 48 and len(dataset.test) == 12
        assert set(dataset.test.labels) == {"class_0", "class_1", "class_2"}  # stratified
    folder = tmp_path / "set"
    folder.mkdir()
    write(folder / "train.jsonl", "".join(json.dumps({"q": t, "y": label}) + "\n" for t, label in rows))
    write(folder / "test.csv", "q,y\nmy card,class_0\n")
    dataset = load_dataset(folder, "q", "y")
    assert len(dataset.train) == 60 and dataset.test.texts == ["my card"]


def test_missing_file_and_bad_json_and_binary(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_dataset(tmp_path / "nope.csv", test_fraction=0.5)
    write(tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\n{broken\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        load_dataset(tmp_path / "d.jsonl", test_fraction=0.5)
    write(tmp_path / "b.csv", b"text,label\nab\x00cd,x\n")
    with pytest.raises(UserError, match="line 2 contains a NUL byte"):
        load_dataset(tmp_path / "b.csv", test_fraction=0.5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "missing.csv", "--out", "OUT", "--test-fraction", "0.2"], "error: missing.csv: no such file"),
        (["train", "data/banking77", "--out", "OUT"], "error: data/banking77/train.csv: no column 'label'; columns are: 'text', 'category'"),
        (["train", "data/banking77", "--label-column", "category", "--out", "OUT", "--epochs", "0"], "error: hyperparameter epochs must be >= 1"),
        (["check", "nowhere"], "error: nowhere: no such artifact folder"),
    ],
)
def test_cli_user_errors_are_one_line_without_traceback(args, message, tmp_path):
    result = cli(*[str(tmp_path / "out") if a == "OUT" else a for a in args])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr


# ---- tokenizer and model --------------------------------------------------------------------------------------------

def test_tokenizer_round_trip(tmp_path):
    texts = ["I lost my card yesterday", "How do I transfer money?", "card card card"] * 10
    tokenizer = fit_tokenizer(texts, vocab_size=200)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert encode(loaded, texts, 64) == encode(tokenizer, texts, 64)
    ids = encode(loaded, ["I LOST my card"], 64)[0]
    assert loaded.decode(ids) == "i lost my card"
    assert encode(loaded, ["word " * 100], 8)[0].__len__() == 8  # truncated to max_length
    assert encode(loaded, ["\u200b"], 8) == [[loaded.token_to_id("[UNK]")]]  # nothing to tokenize -> one unknown
    assert "[UNK]" not in loaded.decode(encode(loaded, ["cards"], 8)[0], skip_special_tokens=False)  # falls back to characters
    assert fit_tokenizer(texts, vocab_size=200).to_str() == tokenizer.to_str()  # deterministic


def test_reverse_within_length_keeps_padding_in_place():
    ids = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])
    assert reverse_within_length(ids, torch.tensor([3, 5])).tolist() == [[3, 2, 1, 0, 0], [8, 7, 6, 5, 4]]


def test_padded_batch_regression():
    """The classic bug: reading padding. A sentence's probabilities alone equal those inside a padded batch."""
    torch.manual_seed(0)
    model = SentenceClassifier(ModelShape(vocab_size=50, num_classes=5, pad_id=0, embedding_dim=16, hidden_size=16)).eval()
    sentences = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15], [16], [17, 18]]
    ids, lengths = pad_batch(sentences, pad_id=0)
    with torch.no_grad():
        batched = model(ids, lengths)
        for row, sentence in enumerate(sentences):
            alone = model(*pad_batch([sentence], pad_id=0))
            assert torch.allclose(alone[0], batched[row], atol=1e-6)
        # changing what sits in the padding changes nothing
        noisy = ids.clone()
        noisy[ids == 0] = 42
        assert torch.allclose(model(noisy, lengths), batched, atol=1e-6)


# ---- a tiny end-to-end run, and the artifact contract ---------------------------------------------------------------

def assert_contract(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in ("model.onnx", "tokenizer.json", "labels.json", "confusion_matrix.png", "training_curve.png"):
        assert (folder / name).is_file(), name
    assert check_hashes(folder) == []
    assert all(manifest["files"][name]["sha256"] == sha256(folder / name) for name in manifest["files"])
    labels = json.loads((folder / "labels.json").read_text())
    assert len(labels) == manifest["num_classes"]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "lengths"]
    assert session.get_outputs()[0].name == "probabilities"
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    sequences = encode(tokenizer, ["where is my card", "I want a refund for this payment please"], manifest["max_length"])
    ids, lengths = pad_batch(sequences, manifest["pad_id"])
    probabilities = session.run(None, {"input_ids": ids.numpy(), "lengths": lengths.numpy()})[0]
    assert probabilities.shape == (2, manifest["num_classes"])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    verification = manifest["verification"]
    assert verification["parity_max_abs_diff"] <= 1e-5
    assert verification["batch_invariance_max_abs_diff"] <= 1e-5
    assert verification["batch_invariance_argmax_changes"] == 0
    return manifest


def test_tiny_training_run_writes_a_valid_artifact(tmp_path):
    rows = toy_rows(per_class=30)
    write(tmp_path / "toy.csv", "text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    out = tmp_path / "repo" / "toy" / "1"
    result = cli("train", str(tmp_path / "toy.csv"), "--test-fraction", "0.2", "--out", str(out), "--epochs", "2",
                 "--embedding-dim", "16", "--hidden-size", "16", "--vocab-size", "100", "--threads", "1",
                 "--no-progress")
    assert result.returncode == 0, result.stderr
    manifest = assert_contract(out)
    assert manifest["name"] == "toy" and manifest["version"] == "1"
    assert manifest["training"]["config"]["epochs"] == 2
    assert "test accuracy" in result.stdout
    again = cli("train", str(tmp_path / "toy.csv"), "--test-fraction", "0.2", "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr
    # Same data, same seed: the same artifact, byte for byte (tokenizer and weights).
    twin = tmp_path / "repo" / "toy" / "2"
    result = cli("train", str(tmp_path / "toy.csv"), "--test-fraction", "0.2", "--out", str(twin), "--epochs", "2",
                 "--embedding-dim", "16", "--hidden-size", "16", "--vocab-size", "100", "--threads", "1",
                 "--no-progress")
    assert result.returncode == 0, result.stderr
    for name in ("model.onnx", "tokenizer.json", "labels.json"):
        assert sha256(out / name) == sha256(twin / name), name


def test_test_artifact_passes_the_contract():
    assert TEST_ARTIFACT.is_dir(), "run `make test-artifact` first"
    assert_contract(TEST_ARTIFACT)
    assert cli("check", str(TEST_ARTIFACT)).returncode == 0


def test_check_detects_a_tampered_file(tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(TEST_ARTIFACT, copy)
    labels = json.loads((copy / "labels.json").read_text())
    (copy / "labels.json").write_text(json.dumps(labels[::-1]))
    result = cli("check", str(copy))
    assert result.returncode == 2 and "labels.json: sha256 differs from manifest" in result.stderr


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="shipped model not built")
def test_shipped_model_passes_the_contract_and_the_bar():
    manifest = assert_contract(SHIPPED)
    assert manifest["num_classes"] == 77
    assert manifest["metrics"]["accuracy"] >= 0.895


def test_evaluate_reproduces_the_manifest_accuracy():
    manifest = json.loads((TEST_ARTIFACT / "manifest.json").read_text())
    result = cli("evaluate", str(TEST_ARTIFACT), "data/banking77", "--label-column", "category")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 3080
    assert summary["accuracy"] == round(manifest["metrics"]["accuracy"], 4)


def test_bench_prints_the_throughput_table():
    result = cli("bench", str(TEST_ARTIFACT), "data/banking77", "--label-column", "category", "--seconds", "0.2")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [tuple(r.split("|")[1:4]) for r in rows] == [
        (" 1 ", " 1 ", " no "), (" 1 ", " 64 ", " no "), (" 1 ", " 64 ", " yes "),
        (" 2 ", " 1 ", " no "), (" 2 ", " 64 ", " no "), (" 2 ", " 64 ", " yes "),
    ]
    assert all(int(r.split("|")[4].replace(",", "")) > 0 for r in rows)


def test_seeds_reports_each_seed_and_the_mean():
    result = cli("seeds", "data/banking77", "--label-column", "category", "--seeds", "3,4", "--limit", "800",
                 "--epochs", "1", "--embedding-dim", "16", "--hidden-size", "16", "--threads", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["seed 3", "seed 4"]
    assert lines[2].startswith("mean test accuracy ") and "over 2 seed(s)" in lines[2]
