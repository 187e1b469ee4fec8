"""model_export: data errors, tokenizer, the padding regression, a tiny end-to-end training run, the shipped model."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

import contract
from conftest import BROKEN_ARTIFACTS, ROOT, SHIPPED, TEST_ARTIFACT, assert_one_line_error, run_cli
from model_export.data import load_dataset
from model_export.errors import UserError
from model_export.model import ModelShape, SentenceClassifier, reverse_within_length
from model_export.tokenizer import fit_tokenizer
from model_export.train import pad_batch


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli("model_export", *args)


def encode(tokenizer: Tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return contract.Encoder(tokenizer, max_length, tokenizer.token_to_id("[UNK]")).encode(texts)[0]


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
        (["evaluate", "nowhere", "data/banking77"], "error: nowhere: no such artifact folder"),
    ],
)
def test_cli_user_errors_are_one_line_without_traceback(args, message, tmp_path):
    result = cli(*[str(tmp_path / "out" / "1") if a == "OUT" else a for a in args])
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
    """``contract.check`` passes, the plots are there, a batch of two sums to 1, the export checks held."""
    artifact = contract.check(folder)
    for name in ("confusion_matrix.png", "training_curve.png"):
        assert (folder / name).is_file(), name
    manifest = artifact.manifest
    ids = encode(artifact.tokenizer, ["where is my card", "I want a refund for this payment please"], manifest.max_length)
    probabilities = artifact.session.run(None, contract.inputs(ids, manifest.pad_id, manifest.input_names))[0]
    assert probabilities.shape == (2, manifest.num_classes)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    verification = manifest.verification
    assert verification["parity_max_abs_diff"] <= contract.TOLERANCE
    assert verification["batch_invariance_max_abs_diff"] <= contract.TOLERANCE
    assert verification["batch_invariance_argmax_changes"] == 0
    return manifest.model_dump()


@pytest.mark.slow
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
    for name in contract.FILES:
        assert contract.sha256(out / name) == contract.sha256(twin / name), name


def test_out_must_be_a_version_folder(tmp_path):
    result = cli("train", "data/banking77", "--label-column", "category", "--out", str(tmp_path / "mine"))
    assert_one_line_error(result, "the last part must be an integer version folder")


def test_test_artifact_passes_the_contract():
    assert_contract(TEST_ARTIFACT)
    assert cli("check", str(TEST_ARTIFACT)).returncode == 0


@pytest.mark.parametrize("broken", list(BROKEN_ARTIFACTS))
def test_check_names_what_is_broken(artifact_copy, broken):
    break_it, says = BROKEN_ARTIFACTS[broken]
    break_it(artifact_copy)
    assert_one_line_error(cli("check", str(artifact_copy)), says)


@pytest.mark.parametrize("out, says", [
    ("/proc/scs-no-such-place/1", "cannot write there"),
    ("FILE/1", "cannot write there"),
    ("FILE", "exists and is not a folder"),
])
def test_unwritable_out_is_refused_before_training(tmp_path, out, says):
    (tmp_path / "a-file").write_text("")
    out = out.replace("FILE", str(tmp_path / "a-file"))
    result = cli("train", "data/banking77", "--label-column", "category", "--out", out)
    assert_one_line_error(result, says)


@pytest.mark.parametrize("config, says", [
    ('{"hidden": 3}', "unknown hyperparameter(s): hidden"),
    ("{broken", "cannot parse config"),
    ('{"epochs": "many"}', "hyperparameter epochs: expected int"),
    ("[1, 2]", "config must be a mapping"),
])
def test_bad_config_file_is_one_line(tmp_path, config, says):
    (tmp_path / "c.json").write_text(config)
    result = cli("train", "data/banking77", "--label-column", "category", "--out", str(tmp_path / "m" / "1"),
                 "--config", str(tmp_path / "c.json"))
    assert_one_line_error(result, says)


@pytest.mark.slow
def test_shipped_model_keeps_its_recorded_accuracy():
    """The manifest is the shipped model's record: its own hash is pinned in models/SHA256SUMS, and the accuracy it
    states is recomputed here from the model and the test split."""
    listed = {}
    for line in (ROOT / "models" / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name.lstrip("*")] = digest
    manifests = sorted(str(p.relative_to(ROOT / "models")) for p in (ROOT / "models").glob("*/*/manifest.json"))
    assert sorted(listed) == manifests, "every shipped version's manifest.json is listed in models/SHA256SUMS"
    for name, digest in listed.items():
        assert hashlib.sha256((ROOT / "models" / name).read_bytes()).hexdigest() == digest, name
    manifest = assert_contract(SHIPPED)
    assert manifest["num_classes"] == 77 and manifest["metrics"]["accuracy"] >= 0.895
    result = cli("evaluate", str(SHIPPED), "data/banking77", "--label-column", "category")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows"] == manifest["metrics"]["test_rows"] == 3080
    assert summary["accuracy"] == round(manifest["metrics"]["accuracy"], 4)
    assert summary["macro_f1"] == round(manifest["metrics"]["macro_f1"], 4)


@pytest.mark.slow
def test_evaluate_reproduces_the_manifest_accuracy():
    manifest = json.loads((TEST_ARTIFACT / "manifest.json").read_text())
    result = cli("evaluate", str(TEST_ARTIFACT), "data/banking77", "--label-column", "category")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 3080
    assert summary["accuracy"] == round(manifest["metrics"]["accuracy"], 4)


def test_bench_prints_the_throughput_table():
    result = cli("bench", str(TEST_ARTIFACT), "data/banking77", "--label-column", "category", "--seconds", "0.2",
                 "--tokenize")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [tuple(r.split("|")[1:5]) for r in rows] == [
        (" 1 ", " 1 ", " no ", " yes "), (" 1 ", " 64 ", " no ", " yes "), (" 1 ", " 64 ", " yes ", " yes "),
        (" 2 ", " 1 ", " no ", " yes "), (" 2 ", " 64 ", " no ", " yes "), (" 2 ", " 64 ", " yes ", " yes "),
    ]
    assert all(int(r.split("|")[5].replace(",", "")) > 0 for r in rows)


@pytest.mark.slow
def test_seeds_reports_each_seed_and_the_mean():
    result = cli("seeds", "data/banking77", "--label-column", "category", "--seeds", "3,4", "--limit", "800",
                 "--epochs", "1", "--embedding-dim", "16", "--hidden-size", "16", "--threads", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["seed 3", "seed 4"]
    assert lines[2].startswith("mean test accuracy ") and "over 2 seed(s)" in lines[2]
