"""Imported Hugging Face encoders served for real (tiny BERT, RoBERTa and a multi-label BERT, built and imported
here: tests/hf_models.py): through /classify and V2 with the unmodified tritonclient, transformers' own
probabilities within 1e-4, the same answer whatever batch a sentence lands in under 64 concurrent clients, and the
multi-label semantics (a sigmoid per class, every label at or above the threshold)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from conftest import ServiceProcess, alone, sentences, start_service
from hf_models import transformers_probabilities

import contract

KINDS = ("bert", "roberta", "bert-multilabel")


@pytest.fixture(scope="module")
def served(imported_encoder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One service with the three imported encoders as models of one repository (named by kind)."""
    root = tmp_path_factory.mktemp("encoders")
    for kind in KINDS:
        shutil.copytree(imported_encoder(kind), root / "models" / kind / "1")
    service = start_service(root / "models", root / "service.log", DEFAULT_MODEL="bert")
    yield service
    service.stop()
    assert "Traceback" not in (root / "service.log").read_text()


def classify(url: str, model: str, texts: list[str], **options) -> list[dict]:
    """Every class's probability for each text (top_k: all of them)."""
    classes = 6 if model == "bert-multilabel" else 77
    response = httpx.post(f"{url}/classify", json={"texts": texts, "model": model, "top_k": classes} | options,
                          timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def as_matrix(predictions: list[dict], labels: list[str]) -> np.ndarray:
    return np.array([[p["probabilities"][label] for label in labels] for p in predictions])


@pytest.mark.parametrize("kind", KINDS)
def test_classify_and_v2_equal_transformers_forward_pass(served, kind, hf_folder, imported_encoder):
    import tritonclient.http as triton

    artifact = contract.read(imported_encoder(kind))
    labels, multi = artifact.labels, kind == "bert-multilabel"
    texts = sentences()[:200]
    _, expected = transformers_probabilities(hf_folder(kind), texts, artifact.manifest.max_length, multi)
    answers = [p for start in range(0, 200, 50) for p in classify(served.url, kind, texts[start:start + 50])]
    np.testing.assert_allclose(as_matrix(answers, labels), expected, atol=1e-4, rtol=0)
    client = triton.InferenceServerClient(served.url.removeprefix("http://"))
    v2 = []
    for start in range(0, 200, 50):
        tensor = triton.InferInput("TEXT", [50], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in texts[start:start + 50]], dtype=object))
        v2.append(client.infer(kind, [tensor]).as_numpy("PROBABILITIES"))
    np.testing.assert_allclose(np.concatenate(v2), expected, atol=1e-4, rtol=0)
    metadata = client.get_model_metadata(kind)
    assert metadata["parameters"] == {"multi_label": multi}
    assert metadata["outputs"][0]["shape"] == [-1, len(labels)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_any_batch_gives_the_answer_alone_under_64_clients(served, kind, imported_encoder):
    """Every sentence's probabilities through the service, under 64 concurrent clients (so batches of mixed
    lengths form), equal the sentence run alone, within 1e-5 and with no argmax change."""
    texts = sentences()[:640]
    reference = alone(imported_encoder(kind), texts)
    labels = contract.read(imported_encoder(kind)).labels

    async def everyone() -> list[dict]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=served.url, limits=limits, timeout=60) as client:
            responses = await asyncio.gather(*(client.post("/classify", json={"text": t, "model": kind, "top_k": 77})
                                               for t in texts))
        return [r.json()["predictions"][0] for r in responses]

    got = as_matrix(asyncio.run(everyone()), labels)
    assert np.abs(got - reference).max() <= contract.TOLERANCE
    assert (got.argmax(1) == reference.argmax(1)).all()
    assert served.metric("scs_batch_size_sentences_sum", model=kind) > served.metric(
        "scs_batch_size_sentences_count", model=kind)  # batches of more than one sentence formed


def test_multi_label_answers_every_label_at_or_above_the_threshold(served, imported_encoder):
    labels = contract.read(imported_encoder("bert-multilabel")).labels
    texts = sentences()[:60]
    response = httpx.post(f"{served.url}/classify", json={"texts": texts, "model": "bert-multilabel", "top_k": 6},
                          timeout=60).json()
    assert response["multi_label"] is True
    for prediction in response["predictions"]:
        probabilities = prediction["probabilities"]
        chosen = [label for label in sorted(labels, key=lambda k: -probabilities[k]) if probabilities[label] >= 0.5]
        assert prediction["labels"] == chosen
        assert prediction["abstained"] == (not chosen)
        assert prediction["label"] == (chosen[0] if chosen else None)
    assert any(len(p["labels"]) > 1 for p in response["predictions"])  # several labels at once do happen
    assert abs(sum(response["predictions"][0]["probabilities"].values()) - 1) > 1e-3  # not a distribution
    everything = classify(served.url, "bert-multilabel", texts, min_score=0)
    assert all(len(p["labels"]) == len(labels) for p in everything)
    nothing = classify(served.url, "bert-multilabel", texts, min_score=1)
    assert all(p["labels"] == [] and p["abstained"] and p["label"] is None for p in nothing)
    single = httpx.post(f"{served.url}/classify", json={"text": texts[0], "model": "bert"}, timeout=60).json()
    assert "multi_label" not in single and "labels" not in single["predictions"][0]
    described = {m["name"]: m["versions"][0] for m in httpx.get(f"{served.url}/v1/models").json()["models"]}
    assert described["bert-multilabel"]["multi_label"] and not described["bert"]["multi_label"]
    assert described["bert"]["kind"] == "encoder"


def test_multi_label_v2_label_is_the_top_label_or_empty(served):
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [3], "data": sentences()[:3]}],
            "outputs": [{"name": "LABEL"}, {"name": "PROBABILITIES"}]}
    url = f"{served.url}/v2/models/bert-multilabel/infer"
    answer = httpx.post(url, json=body, timeout=60).json()
    labels, probabilities = answer["outputs"][0]["data"], np.array(answer["outputs"][1]["data"]).reshape(3, -1)
    assert all((label == "") == (row.max() < 0.5) for label, row in zip(labels, probabilities))
    none = httpx.post(url, json=body | {"parameters": {"min_score": 1}}, timeout=60).json()
    assert none["outputs"][0]["data"] == ["", "", ""]
    unavailable = httpx.post(url, json=body | {"parameters": {"min_precision": 0.9}}, timeout=60)
    assert unavailable.status_code == 400 and "reaches precision 0.9" in unavailable.json()["error"]


def test_a_long_text_is_cut_keeping_its_final_token_and_says_so(served):
    [long, short] = classify(served.url, "roberta", ["card payment declined " * 80, "card"])
    assert long["truncated"] is True and short["truncated"] is False
