"""Batch invariance under load: every Banking77 test sentence through real uvicorn, 64 in flight, equals a
direct single-sentence onnxruntime run; answers never swap between requests or within one."""

from __future__ import annotations

import http.client
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import SHIPPED, alone, sentences


def classify_all(url: str, requests: list[list[str]], concurrency: int = 64) -> list[list[dict]]:
    """``concurrency`` clients in threads, each with its own keep-alive connection, sending its next
    request as soon as its last one is answered. (Measured here: http.client in threads sent about
    2,000 requests/s; one httpx AsyncClient shared by 64 tasks about 110.)"""
    host, port = url.removeprefix("http://").split(":")
    local = threading.local()

    def one(texts: list[str]) -> list[dict]:
        if not hasattr(local, "connection"):
            local.connection = http.client.HTTPConnection(host, int(port), timeout=120)
        body = {"text": texts[0]} if len(texts) == 1 else {"texts": texts}
        local.connection.request("POST", "/classify", json.dumps(body | {"top_k": 77}),
                                 {"Content-Type": "application/json"})
        response = local.connection.getresponse()
        payload = response.read()
        assert response.status == 200, payload[:300]
        return json.loads(payload)["predictions"]

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, requests))


def check(folder: Path, service, texts: list[str], requests: list[list[str]]) -> None:
    reference = alone(folder, texts)
    labels = service_labels(service)
    answers = [p for predictions in classify_all(service.url, requests) for p in predictions]
    assert len(answers) == len(texts)
    served = np.array([[p["probabilities"][label] for label in labels] for p in answers], dtype=np.float64)
    difference = np.abs(served - reference).max(axis=1)
    assert difference.max() <= 1e-5, f"{(difference > 1e-5).sum()} answers differ, max {difference.max():.2e}"
    assert (served.argmax(1) == reference.argmax(1)).all()
    assert [p["label"] for p in answers] == [labels[i] for i in reference.argmax(1)]
    size = service.metric("scs_batch_size_sentences_sum") / service.metric("scs_batch_size_sentences_count")
    assert size > 1.5, f"mean batch {size:.2f}: the load never batched, so invariance was not exercised"
    assert service.metric("scs_padded_tokens_total") > 1.2 * service.metric("scs_real_tokens_total")  # mixed lengths really were padded


# Mixed lengths on purpose (no padding limit) and a short fill wait, so that batches are big and padded.
MIXING = {"MAX_PADDING_RATIO": 1000, "MAX_WAIT_MS": 5}


def service_labels(service) -> list[str]:
    return httpx.get(f"{service.url}/v1/model").json()["model"]["labels"]


def split(texts: list[str], seed: int) -> list[list[str]]:
    """Consecutive runs of 1-8 texts: multi-text requests whose answers must keep input order."""
    rng, out, position = random.Random(seed), [], 0
    while position < len(texts):
        size = rng.randint(1, 8)
        out.append(texts[position : position + size])
        position += size
    return out


@pytest.mark.slow
def test_single_sentence_requests_match_alone_runs(service_factory, test_artifact):
    texts = sentences()
    assert len(texts) == 3080
    check(test_artifact, service_factory(test_artifact, **MIXING), texts, [[t] for t in texts])


@pytest.mark.slow
def test_multi_text_requests_keep_order(service_factory, test_artifact):
    texts = sentences()
    random.Random(1).shuffle(texts)
    check(test_artifact, service_factory(test_artifact, **MIXING), texts, split(texts, 2))


@pytest.mark.slow
def test_shipped_model_under_load(service_factory):
    texts = sentences()
    check(SHIPPED, service_factory(SHIPPED.parent, **MIXING), texts, [[t] for t in texts])
