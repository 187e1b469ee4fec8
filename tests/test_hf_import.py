"""``python -m model_export import``: fine-tuned Hugging Face encoders (tiny ones built here, tests/hf_models.py) to
artifacts in the one contract: transformers' own probabilities through contract.Encoder + onnxruntime, batch
invariance, the tokenizer's special tokens and truncation, slow-tokenizer conversion, multi-label sigmoids,
calibration with --data, and one-line refusals of every folder it cannot import."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import alone, assert_one_line_error, edit_manifest, run_cli, sentences
from hf_models import transformers_probabilities

import contract
from model_export.export import onnx_predict

SINGLE = ["bert", "distilbert", "roberta", "xlm-roberta"]
INPUTS = {"bert": ("input_ids", "attention_mask", "token_type_ids"), "distilbert": ("input_ids", "attention_mask"),
          "roberta": ("input_ids", "attention_mask"), "xlm-roberta": ("input_ids", "attention_mask"),
          "bert-multilabel": ("input_ids", "attention_mask", "token_type_ids")}


@pytest.mark.parametrize("kind", [*SINGLE, "bert-multilabel"])
def test_import_matches_transformers_and_keeps_the_contract(kind, hf_folder, imported_encoder):
    """The folder passes contract.check; contract.Encoder gives transformers' ids; onnxruntime gives
    transformers' probabilities (1e-4) on 200 Banking77 test sentences; mixed padded batches change nothing."""
    out = imported_encoder(kind)
    artifact = contract.check(out)
    manifest = artifact.manifest
    multi = kind == "bert-multilabel"
    assert (manifest.model_kind, manifest.special_tokens) == ("encoder", True)
    assert manifest.activation == ("sigmoid" if multi else "softmax")
    assert manifest.input_names == INPUTS[kind]
    assert {i.name for i in artifact.session.get_inputs()} == set(INPUTS[kind])
    assert manifest.max_length == (126 if "roberta" in kind else 128)  # 128 positions, RoBERTa's offset of 2
    assert manifest.verification["parity_max_abs_diff"] <= contract.ENCODER_PARITY_TOLERANCE
    assert manifest.verification["batch_invariance_max_abs_diff"] <= contract.TOLERANCE
    config = json.loads((hf_folder(kind) / "config.json").read_text())
    assert artifact.labels == [config["id2label"][str(i)] for i in range(len(config["id2label"]))]

    texts = sentences()[:200]
    expected_ids, expected = transformers_probabilities(hf_folder(kind), texts, manifest.max_length, multi)
    ids = artifact.encoder.encode(texts)[0]
    assert ids == expected_ids
    names = manifest.input_names
    probabilities = onnx_predict(artifact.session, ids, manifest.pad_id, names=names)
    np.testing.assert_allclose(probabilities, expected, atol=1e-4, rtol=0)
    if multi:  # independent per-class sigmoids, not a distribution
        assert not np.allclose(probabilities.sum(1), 1.0, atol=1e-2)
    else:
        np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    one_by_one = alone(out, texts)
    for size, seed in ((7, 1), (64, 2), (200, 3)):
        mixed = onnx_predict(artifact.session, ids, manifest.pad_id, size, seed, names)
        assert np.abs(mixed - one_by_one).max() <= contract.TOLERANCE
        assert (mixed.argmax(1) == one_by_one.argmax(1)).all()


@pytest.mark.parametrize("kind, first, last", [("bert", "[CLS]", "[SEP]"), ("roberta", "<s>", "</s>")])
def test_special_tokens_and_truncation_keep_the_final_token(kind, first, last, imported_encoder):
    artifact = contract.read(imported_encoder(kind))
    encoder, tokenizer = artifact.encoder, artifact.tokenizer
    content = encoder.max_length - 2  # room for the text's tokens; "card" and " card" are one token each
    ids, truncated = encoder.encode(["where is my card " * 100, "where is my card", "", " ".join(["card"] * content),
                                     " ".join(["card"] * (content + 1))])
    assert [tokenizer.id_to_token(i[0]) for i in ids] == [first] * 5
    assert [tokenizer.id_to_token(i[-1]) for i in ids] == [last] * 5
    assert len(ids[0]) == encoder.max_length and truncated[0]
    assert not truncated[1] and len(ids[2]) == 2 and not truncated[2]  # an empty text: just the special tokens
    assert len(ids[3]) == encoder.max_length and not truncated[3]  # fits exactly
    assert len(ids[4]) == encoder.max_length and truncated[4]  # one token too many: cut, the last token kept


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_the_ascii_shortcut_gives_the_full_tokenizers_ids_on_encoder_tokenizers(kind, imported_encoder):
    """An HF BERT's normalizer (strip_accents null) still allows the shortcut; its added special tokens send any
    text that holds one ("[SEP]" in any case) down the full path. RoBERTa's byte-level tokenizer has no shortcut."""
    artifact = contract.read(imported_encoder(kind))
    encoder = artifact.encoder
    assert (encoder._plain is not None) == (kind == "bert")
    reference = contract.Tokenizer.from_str(artifact.tokenizer.to_str())
    reference.enable_truncation(encoder.max_length)

    def full(texts):
        return [e.ids for e in reference.encode_batch(list(texts), add_special_tokens=True)]

    texts = sentences() + ["Where is my [SEP] card?", "[sep] [CLS] [cls]", "[MASK]", "[mask] it", "[Unk] [PAD]",
                           "Café au lait", "naïve", "x\ty\nz", "ÅNGSTRÖM card", "a\x0bb",
                           "plain TEXT, punctuation!"]
    assert encoder.encode(texts)[0] == full(texts)
    for text in texts[-11:]:
        assert encoder.encode([text])[0] == full([text]), text


def test_the_ascii_shortcut_is_only_taken_where_it_is_provably_the_same():
    spec = {"normalizer": dict(contract.BERT_NORMALIZER), "pre_tokenizer": {"type": "BertPreTokenizer"},
            "added_tokens": [{"content": "[CLS]"}]}
    assert contract._ascii_shortcut(spec)
    assert contract._ascii_shortcut(spec | {"normalizer": spec["normalizer"] | {"strip_accents": None}})
    assert not contract._ascii_shortcut(spec | {"normalizer": spec["normalizer"] | {"lowercase": False}})  # cased
    assert not contract._ascii_shortcut(spec | {"normalizer": spec["normalizer"] | {"clean_text": False}})
    assert not contract._ascii_shortcut(spec | {"pre_tokenizer": {"type": "Whitespace"}})
    assert not contract._ascii_shortcut(spec | {"added_tokens": [{"content": "new card"}]})
    assert not contract._ascii_shortcut(spec | {"normalizer": None})


def test_a_slow_tokenizer_folder_converts_to_the_same_ids(hf_folder, imported_encoder):
    assert not (hf_folder("bert-slow") / "tokenizer.json").exists()
    slow, fast = contract.read(imported_encoder("bert-slow")), contract.read(imported_encoder("bert"))
    texts = sentences()
    assert slow.encoder.encode(texts) == fast.encoder.encode(texts)
    assert slow.manifest.input_names == fast.manifest.input_names


def _labelled(path: Path, labels: list[str], per_class: int) -> Path:
    """A CSV of Banking77 training sentences, ``per_class`` rows for each of ``labels`` (assigned in turn)."""
    import csv

    texts = [t for t in sentences()][: per_class * len(labels)]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows((text, labels[i % len(labels)]) for i, text in enumerate(texts))
    return path


def test_labelled_data_gives_scores_calibration_thresholds_and_drift(hf_folder, tmp_path):
    from model_export.cli import main

    labels = [json.loads((hf_folder("bert") / "config.json").read_text())["id2label"][str(i)] for i in range(77)]
    data = _labelled(tmp_path / "data.csv", labels, 8)
    out = tmp_path / "bert" / "1"
    assert main(["import", str(hf_folder("bert")), "--out", str(out), "--data", str(data),
                 "--test-fraction", "0.25"]) == 0
    manifest = contract.check(out).manifest
    assert set(manifest.metrics) >= {"accuracy", "macro_f1"} and manifest.metrics["test_rows"] == 154
    assert manifest.calibration["enabled"] and manifest.calibration["temperature"] > 0
    assert manifest.calibration["fitted_on"] == "validation" and "test_ece_after" in manifest.calibration
    assert [row["precision"] for row in manifest.selective["thresholds"]] == list(contract.SELECTIVE_PRECISIONS)
    assert set(manifest.drift["reference"]) == {"length", "unknown_tokens", "predicted_class", "top_score"}
    assert len(manifest.drift["reference"]["predicted_class"]) == 77
    assert manifest.verification["checked_sentences"] == 154
    assert manifest.dataset["train_rows"] + manifest.dataset["validation_rows"] == 462


def test_multi_label_data_keeps_the_default_threshold_and_no_temperature(hf_folder, tmp_path):
    from hf_models import MULTI_LABELS

    from model_export.cli import main

    data = _labelled(tmp_path / "data.csv", list(MULTI_LABELS), 20)
    out = tmp_path / "multi" / "1"
    assert main(["import", str(hf_folder("bert-multilabel")), "--out", str(out), "--data", str(data),
                 "--test-fraction", "0.25"]) == 0
    manifest = contract.check(out).manifest
    assert manifest.activation == "sigmoid"
    assert not manifest.calibration["enabled"] and "multi-label" in manifest.calibration["reason"]
    assert manifest.selective["per_label_threshold"] == 0.5 and manifest.selective["thresholds"] == []
    assert manifest.metrics["threshold"] == 0.5 and 0 <= manifest.metrics["macro_f1"] <= 1
    assert len(manifest.drift["reference"]["predicted_class"]) == len(MULTI_LABELS)


def test_check_refuses_an_encoder_whose_signature_disagrees(imported_encoder, tmp_path):
    folder = tmp_path / "m" / "1"
    shutil.copytree(imported_encoder("distilbert"), folder)
    edit_manifest(folder, inputs={"input_ids": "", "attention_mask": "", "token_type_ids": ""})
    with pytest.raises(contract.ArtifactError, match="inputs .* the manifest says"):
        contract.check(folder)
    edit_manifest(folder, inputs={"input_ids": "", "lengths": ""})
    with pytest.raises(contract.ArtifactError, match="not a encoder signature"):
        contract.check(folder)
    edit_manifest(folder, inputs={"input_ids": "", "attention_mask": ""}, model_kind="lstm")
    with pytest.raises(contract.ArtifactError, match="not a lstm signature"):
        contract.check(folder)


def _copy_with(source: Path, folder: Path, drop: tuple[str, ...] = (), **config: object) -> Path:
    shutil.copytree(source, folder)
    for name in drop:
        (folder / name).unlink()
    if config:
        path = folder / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | config))
    return folder


def _truncated_weights(source: Path, folder: Path) -> Path:
    _copy_with(source, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


BAD_FOLDERS = {
    "a hub id": (lambda b, t: Path("bert-base-uncased"), "hf download bert-base-uncased --local-dir"),
    "an org/name hub id": (lambda b, t: Path("someorg/some-model"), "is a Hugging Face Hub id, download it first"),
    "a file": (lambda b, t: b / "config.json", "not a folder"),
    "no config.json": (lambda b, t: _copy_with(b, t, ("config.json",)), "no config.json"),
    "decoder-only gpt2": (lambda b, t: _copy_with(b, t, model_type="gpt2",
                                                  architectures=["GPT2ForSequenceClassification"]),
                          "model_type 'gpt2' is a decoder-only model"),
    "seq2seq bart": (lambda b, t: _copy_with(b, t, model_type="bart", is_encoder_decoder=True,
                                             architectures=["BartForSequenceClassification"]),
                     "model_type 'bart' is a sequence-to-sequence model"),
    "no classification head": (lambda b, t: _copy_with(b, t, architectures=["BertModel"]),
                               "has no sequence-classification head"),
    "num_labels disagrees": (lambda b, t: _copy_with(b, t, num_labels=5), "num_labels=5 but id2label names 77"),
    "no tokenizer": (lambda b, t: _copy_with(b, t, ("tokenizer.json",)), "no tokenizer"),
    "truncated weights": (_truncated_weights, "model.safetensors: unreadable, truncated or corrupt"),
    "no weights": (lambda b, t: _copy_with(b, t, ("model.safetensors",)), "no weights"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_a_folder_it_cannot_import_is_one_line_and_exit_2(case, hf_folder, tmp_path):
    make, says = BAD_FOLDERS[case]
    folder = make(hf_folder("bert"), tmp_path / "bad")
    result = run_cli("model_export", "import", str(folder), "--out", str(tmp_path / "out" / "1"), timeout=120)
    assert_one_line_error(result, says)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_data_labels_must_be_id2label_names(hf_folder, tmp_path):
    data = _labelled(tmp_path / "data.csv", ["card", "not_a_label"], 10)
    result = run_cli("model_export", "import", str(hf_folder("bert-multilabel")), "--out", str(tmp_path / "m" / "1"),
                     "--data", str(data), "--test-fraction", "0.2", timeout=120)
    last = assert_one_line_error(result, "--data labels not in the model's id2label: not_a_label")
    assert "id2label: card, transfer" in last
