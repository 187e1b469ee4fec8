"""The artifact contract (``contract.py``): texts to ids and tensors, the repository layout, and ``check`` refusing
every way a version folder can disagree with its manifest, with one line naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

import contract
from conftest import BROKEN_ARTIFACTS, ROOT, TEST_ARTIFACT, edit_manifest, rehash


def refuses(folder: Path, says: str) -> None:
    with pytest.raises(contract.ArtifactError, match=says) as caught:
        contract.check(folder)
    assert "\n" not in str(caught.value)


def test_encode_and_pad_are_what_the_model_reads(test_artifact):
    artifact = contract.check(test_artifact)
    manifest = artifact.manifest
    texts = ["Where is my card?", "", "   ", "card " * 100, "💳 我的卡", "\u200b"]
    ids, truncated = artifact.encoder.encode(texts)
    assert truncated == [False, False, False, True, False, False]
    assert len(ids[3]) == manifest.max_length
    assert ids[1] == ids[2] == ids[5] == [manifest.unk_id]  # nothing to tokenize: one unknown token
    assert ids[0] == artifact.tokenizer.encode("Where is my card?", add_special_tokens=False).ids
    feed = contract.inputs(ids, manifest.pad_id)
    assert set(feed) == set(contract.INPUT_TYPES)
    assert feed[contract.INPUT_IDS].dtype == np.int64 and feed[contract.INPUT_IDS].shape == (6, manifest.max_length)
    assert feed[contract.LENGTHS].tolist() == [len(s) for s in ids]
    assert (feed[contract.INPUT_IDS][0, len(ids[0]):] == manifest.pad_id).all()  # right-padded with pad_id


def test_the_ascii_shortcut_gives_exactly_the_full_tokenizers_ids(test_artifact):
    """Plain ASCII skips the BERT normalizer (lower-cased in Python instead): the ids must not change, on every
    Banking77 sentence (train and test), on mixed batches, and on generated text (hypothesis)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from conftest import ROOT
    from loadtest.data import read_sentences

    for folder in (test_artifact, ROOT / "models" / "banking77" / "1"):
        artifact = contract.read(folder)
        encoder, tokenizer = artifact.encoder, artifact.tokenizer
        assert encoder._plain is not None  # the shortcut is in use for this tokenizer

        def full(texts):
            return [e.ids[: encoder.max_length] or [encoder.unk_id]
                    for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]

        texts = [row for split in ("train", "test") for row in read_sentences(ROOT / "data" / "banking77" /
                                                                              f"{split}.csv")]
        assert encoder.encode(texts)[0] == full(texts)
        mixed = ["Café au lait", "plain TEXT, with: punctuation!", "naïve", "x\ty\nz", "ÅNGSTRÖM card", "a\x0bb"]
        assert encoder.encode(mixed)[0] == full(mixed)

        @settings(max_examples=300, deadline=None, derandomize=True, database=None)
        @given(st.lists(st.text(st.characters(min_codepoint=0, max_codepoint=0x17F), max_size=40), min_size=1,
                        max_size=6))
        def same(batch):
            assert encoder.encode(batch)[0] == full(batch)

        same()


def test_check_opens_the_graph_and_proves_its_signature(test_artifact):
    artifact = contract.check(test_artifact)
    assert artifact.provider == contract.CPU and artifact.name == "test-model" and artifact.version == "1"
    assert {i.name for i in artifact.session.get_inputs()} == set(contract.INPUT_TYPES)
    assert contract.onnx_opset(test_artifact / "model.onnx") == contract.OPSET


def test_manifest_is_validated_when_written():
    valid = contract.read_manifest(TEST_ARTIFACT).model_dump()
    with pytest.raises(ValidationError):
        contract.Manifest(**valid | {"num_classes": "77"})  # strict: no strings for numbers
    with pytest.raises(ValidationError):
        contract.Manifest(**valid | {"files": {"model.onnx": valid["files"]["model.onnx"]}})  # every file hashed
    with pytest.raises(ValidationError):
        contract.Manifest(**valid | {"version": "v1"})  # version folders are integers


@pytest.mark.parametrize("broken", list(BROKEN_ARTIFACTS))
def test_check_refuses_a_broken_folder_naming_the_file(artifact_copy, broken):
    break_it, says = BROKEN_ARTIFACTS[broken]
    break_it(artifact_copy)
    refuses(artifact_copy, says)


def test_hash_mismatch(artifact_copy):
    with (artifact_copy / "labels.json").open("a") as handle:
        handle.write(" ")
    refuses(artifact_copy, "labels.json: sha256 differs")


def test_class_count_disagrees_with_model_output(artifact_copy):
    labels = json.loads((artifact_copy / "labels.json").read_text())[:-1]
    (artifact_copy / "labels.json").write_text(json.dumps(labels))
    rehash(artifact_copy, "labels.json")
    edit_manifest(artifact_copy, num_classes=len(labels))
    refuses(artifact_copy, "shape")


def test_version_folders(artifact_copy):
    models = artifact_copy.parent
    for version in ("2", "10"):
        shutil.copytree(artifact_copy, models / version)
    (models / "notes").mkdir()
    assert contract.versions(models) == [1, 2, 10]  # integer order, not string order
    assert contract.version_folder(models) == models / "10"
    assert contract.version_folder(models, 2) == models / "2"
    assert contract.version_folder(models / "2") == models / "2"
    for path, version, says in ((models, 7, "no version 7"), (models / "2", 3, "pinned"),
                                (models / "notes", None, "no integer version folders"),
                                (models / "absent", None, "no such model folder")):
        with pytest.raises(contract.ArtifactError, match=says):
            contract.version_folder(path, version)


def test_the_contract_is_defined_once():
    """The tensor names, the file list and encode/pad live in contract.py alone (tests aside)."""
    sources = [p for folder in ("service", "model_export", "loadtest", "scripts") for p in (ROOT / folder).rglob("*.py")]
    for needle in ('"input_ids"', '"lengths"', '"attention_mask"', '"token_type_ids"', '(["probabilities"]',
                   '=["probabilities"]', '"tensor(int64)"',
                   '"tokenizer.json", "labels.json"',
                   "def encode(", "def pad(", "encode_batch", "def sha256("):
        found = [str(p.relative_to(ROOT)) for p in sources if needle in p.read_text(encoding="utf-8")]
        assert not found, f"{needle} is defined again in {found}"


def test_inputs_builds_each_signatures_feed_from_the_same_padded_ids():
    sequences = [[5, 6, 7], [8], [9, 10]]
    lstm = contract.inputs(sequences, 0)
    assert list(lstm) == list(contract.SIGNATURES["lstm"][0]) and lstm[contract.LENGTHS].tolist() == [3, 1, 2]
    for names in contract.SIGNATURES["encoder"]:
        feed = contract.inputs(sequences, 0, names)
        assert list(feed) == list(names) and all(tensor.dtype == np.int64 for tensor in feed.values())
        assert (feed[contract.INPUT_IDS] == lstm[contract.INPUT_IDS]).all()
        assert feed[contract.ATTENTION_MASK].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert (feed[contract.TOKEN_TYPE_IDS] == 0).all() and feed[contract.TOKEN_TYPE_IDS].shape == (3, 3)
    with pytest.raises(ValueError, match="no such graph input"):
        contract.inputs(sequences, 0, ("input_ids", "pixels"))


def test_manifests_made_before_the_encoder_fields_read_as_lstm_softmax():
    for folder in (TEST_ARTIFACT, ROOT / "models" / "banking77" / "1"):
        raw = json.loads((folder / "manifest.json").read_text())
        manifest = contract.read_manifest(folder)
        assert "model_kind" not in raw or folder == TEST_ARTIFACT
        assert (manifest.model_kind, manifest.activation, manifest.special_tokens) == ("lstm", "softmax", False)
        assert manifest.input_names == contract.SIGNATURES["lstm"][0]
