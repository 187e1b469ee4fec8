"""The response cache and priority classes on real servers: cached answers equal uncached ones bit for bit, a swap
never serves the old version's answers, the byte bound holds under a flood of distinct texts (as charged, and as
memory really held), the three ways to bypass it, every bad priority or cache field refused as a client error, and
priorities under overload on loopback (the low level refused first, the high level never)."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import tracemalloc
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from conftest import TEST_ARTIFACT, alone, assert_error, sentences, start_service
from service.cache import ResponseCache

MODEL = "test-model"
CACHE = {"model": MODEL, "version": "1"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The test model with the cache on (its default) and gRPC on."""
    service = start_service(TEST_ARTIFACT, tmp_path_factory.mktemp("cache") / "service.log", DRIFT_WINDOW=100_000)
    yield service
    service.stop()


def classify(url: str, texts: list[str], headers: dict | None = None, **fields) -> list[dict]:
    body = {"texts": texts, "top_k": 77} | fields
    response = httpx.post(f"{url}/classify", json=body, headers=headers or {}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def in_chunks(url: str, texts: list[str], size: int = 64, **fields) -> dict[str, dict]:
    """Each text's prediction (probabilities as JSON floats), sent ``size`` texts a request."""
    answers = {}
    for start in range(0, len(texts), size):
        chunk = texts[start:start + size]
        answers |= dict(zip(chunk, classify(url, chunk, **fields)))
    return answers


def counts(service) -> tuple[float, float]:
    return service.metric("scs_cache_hits_total", **CACHE), service.metric("scs_cache_misses_total", **CACHE)


def test_cached_answers_equal_uncached_ones_bit_for_bit_on_every_test_sentence(served):
    """Cached answers are the model's float32 answers, bit for bit: against the same requests sent uncached (the same
    batches; a sentence's probabilities in another batch agree within the contract's 1e-5, not always to the last
    bit), and within 1e-5 of each sentence run alone."""
    texts = list({text.lower(): text for text in sentences()}.values())  # one text per cache key
    rng = random.Random(0)
    rng.shuffle(texts)
    filled = in_chunks(served.url, texts, size=48)  # misses, stored
    uncached = in_chunks(served.url, texts, size=48, cache=False)  # the same batches, nothing read or stored
    assert uncached == filled
    hits, misses = counts(served)
    again = texts[:]
    rng.shuffle(again)
    cached = in_chunks(served.url, again, size=64)
    assert counts(served) == (hits + len(texts), misses)  # every one a hit
    assert cached == uncached  # probabilities, labels, scores: equal as floats, bit for bit
    labels = json.loads((TEST_ARTIFACT / "labels.json").read_text())
    sample = texts[:200]
    matrix = np.array([[cached[text]["probabilities"][label] for label in labels] for text in sample])
    assert np.abs(matrix - alone(TEST_ARTIFACT, sample)).max() <= 1e-5
    # one entry serves every request shape: top_k applied on the way out
    short = classify(served.url, texts[:5], top_k=3)
    assert [list(p["probabilities"]) for p in short] == [list(uncached[t]["probabilities"])[:3] for t in texts[:5]]
    assert counts(served)[0] == hits + len(texts) + 5


def test_cached_sentences_still_reach_the_drift_window(served):
    text = "drift sees me even when I am cached"
    before = httpx.get(f"{served.url}/v1/models/{MODEL}/drift").json()["sentences"]
    classify(served.url, [text] * 3)  # one miss (stored), then two hits in the same request
    classify(served.url, [text])
    after = httpx.get(f"{served.url}/v1/models/{MODEL}/drift").json()["sentences"]
    assert after == before + 4


def grpc_infer(target: str, texts: list[str], **parameters) -> np.ndarray:
    tensor = triton.InferInput("TEXT", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    priority = parameters.pop("priority", 0)
    with triton.InferenceServerClient(target) as client:
        return client.infer(MODEL, [tensor], priority=priority, parameters=parameters or None).as_numpy(
            "PROBABILITIES")


def v2_infer(url: str, texts: list[str], headers: dict | None = None, **parameters) -> httpx.Response:
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    return httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body | ({"parameters": parameters} if parameters else {}),
                      headers=headers or {}, timeout=30)


def test_each_way_to_bypass_the_cache_reads_and_stores_nothing(served):
    ways = {
        "classify field": lambda text: classify(served.url, [text], cache=False),
        "Cache-Control header": lambda text: classify(served.url, [text], {"Cache-Control": "no-cache"}),
        "V2 parameter": lambda text: v2_infer(served.url, [text], cache=False).raise_for_status(),
        "V2 header": lambda text: v2_infer(served.url, [text], {"cache-control": "no-cache"}).raise_for_status(),
        "gRPC parameter": lambda text: grpc_infer(served.grpc, [text], cache=False),
    }
    for way, bypass in ways.items():
        text = f"bypass the cache by the {way}"
        before = counts(served)
        bypass(text)
        bypass(text)
        assert counts(served) == before, way  # not looked up, not stored
        classify(served.url, [text])
        classify(served.url, [text])
        assert counts(served) == (before[0] + 1, before[1] + 1), way  # then a miss, stored, and a hit


def test_bad_priority_or_cache_fields_are_client_errors_on_every_protocol(served):
    for fields in ({"priority": 4}, {"priority": -1}, {"priority": "high"}, {"priority": 1.5}, {"priority": True},
                   {"cache": "no"}, {"cache": 0}, {"cache": None}):
        response = httpx.post(f"{served.url}/classify", json={"text": "hello", **fields})
        error = assert_error(response, 422, "invalid_request")
        if fields.get("priority") in (4, -1):
            assert error["details"][0]["type"] == "priority_out_of_range" and "1 (the highest)" in error["details"][0][
                "msg"]
    for parameters in ({"priority": 4}, {"priority": -2}, {"priority": "1"}, {"priority": 1.5}, {"cache": "false"},
                       {"cache": 1}):
        response = v2_infer(served.url, ["hello"], **parameters)
        assert response.status_code == 400 and ("priority" in response.text or "cache" in response.text), response.text
    for parameters in ({"priority": 4}, {"cache": "false"}, {"cache": 1}):
        with pytest.raises(InferenceServerException) as refused:
            grpc_infer(served.grpc, ["hello"], **parameters)
        assert refused.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT), parameters
    for priority in (0, 1, 2, 3):
        assert classify(served.url, ["hello"], priority=priority)
        assert v2_infer(served.url, ["hello"], priority=priority).status_code == 200
        assert grpc_infer(served.grpc, ["hello"], priority=priority).shape == (1, 77)


def test_a_swap_never_serves_the_old_versions_cached_answers(tmp_path):
    root = tmp_path / "models"
    shutil.copytree(TEST_ARTIFACT, root / MODEL / "1")
    svc = start_service(root, tmp_path / "service.log", ALLOW_REPOSITORY_CONTROL="true", GRPC_PORT=0)
    texts = sentences()[:32]
    try:
        first = classify(svc.url, texts)
        assert classify(svc.url, texts) == first and svc.metric("scs_cache_hits_total", **CACHE) == len(texts)
        shutil.copytree(TEST_ARTIFACT.parent / "2", root / MODEL / "2")
        assert httpx.post(f"{svc.url}/v2/repository/models/{MODEL}/load").status_code == 200
        response = httpx.post(f"{svc.url}/classify", json={"texts": texts, "top_k": 77}).json()
        assert response["version"] == "2"
        labels = json.loads((root / MODEL / "2" / "labels.json").read_text())
        served = np.array([[p["probabilities"][label] for label in labels] for p in response["predictions"]])
        assert np.abs(served - alone(root / MODEL / "2", texts)).max() <= 1e-6  # version 2's own answers
        assert response["predictions"] != first
        assert svc.metric("scs_cache_hits_total", model=MODEL, version="2") == 0
        # the same version unloaded and loaded again starts empty
        assert httpx.post(f"{svc.url}/v2/repository/models/{MODEL}/unload").status_code == 200
        assert httpx.post(f"{svc.url}/v2/repository/models/{MODEL}/load").status_code == 200
        [model] = httpx.get(f"{svc.url}/v1/models").json()["models"]
        assert model["versions"][0]["cache"]["entries"] == 0
    finally:
        svc.stop()


def test_the_byte_bound_holds_under_a_flood_of_distinct_texts(tmp_path):
    limit = 40_000
    svc = start_service(TEST_ARTIFACT, tmp_path / "service.log", CACHE_MAX_BYTES=limit, GRPC_PORT=0)
    try:
        base = sentences()
        for start in range(0, 4000, 64):
            classify(svc.url, [f"{base[i % len(base)]} #{i}" for i in range(start, start + 64)], top_k=1)
            assert svc.metric("scs_cache_bytes", **CACHE) <= limit
        assert svc.metric("scs_cache_evictions_total", **CACHE) > 3000
        [model] = httpx.get(f"{svc.url}/v1/models").json()["models"]
        cache = model["versions"][0]["cache"]
        assert 0 < cache["bytes"] <= cache["max_bytes"] == limit and cache["entries"] > 40
    finally:
        svc.stop()


def test_the_memory_the_cache_holds_stays_within_its_bound():
    """What the charge per entry claims, measured: the Python heap the cache's entries and keys really hold (and the
    dict's table) stays within 10% of ``max_bytes`` once it is full and evicting."""
    limit, classes = 2**20, 77
    rng = np.random.default_rng(0)
    tracemalloc.start()
    try:
        cache = ResponseCache(limit, classes, str)
        before = tracemalloc.get_traced_memory()[0]
        for start in range(0, 30_000, 64):
            probabilities = rng.random((64, classes), dtype=np.float32)
            entries = cache.pack(probabilities, np.argsort(-probabilities, axis=1), [(1, 2, 3, 4)] * 64)
            for index, entry in enumerate(entries):
                cache.put(f"a distinct text of ordinary length, number {start + index}", entry, False)
            del probabilities, entries
            assert cache.bytes <= limit
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache) > 1000 and held <= 1.10 * limit, (held, len(cache))


@pytest.mark.slow
def test_priorities_under_overload_refuse_the_low_level_first_and_never_the_high(tmp_path):
    """24 clients flooding at the lowest level beside 4 at the highest, each request 64 sentences, on loopback: the
    queue (384 sentences; the whole queue may reach 384, 256, 128 and still admit level 1, 2, 3) sheds the low
    level only; every answer is a 200 or a 503 with Retry-After."""
    svc = start_service(TEST_ARTIFACT, tmp_path / "service.log", MAX_QUEUE_SIZE=384, MAX_BATCH_SIZE=8,
                        CACHE_MAX_BYTES=0, GRPC_PORT=0)
    base = sentences()

    async def client(http: httpx.AsyncClient, priority: int, requests: int, seed: int) -> list[httpx.Response]:
        answers = []
        for i in range(requests):
            texts = [base[(seed * 997 + i * 64 + j) % len(base)] for j in range(64)]
            answers.append(await http.post("/classify", json={"texts": texts, "priority": priority}))
        return answers

    async def flood() -> tuple[list, list]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=svc.url, limits=limits, timeout=60) as http:
            low = [client(http, 3, 12, seed) for seed in range(24)]
            high = [client(http, 1, 12, 100 + seed) for seed in range(4)]
            results = await asyncio.gather(*low, *high)
        return [r for rs in results[:24] for r in rs], [r for rs in results[24:] for r in rs]

    try:
        low, high = asyncio.run(flood())
        assert {r.status_code for r in high} == {200}
        assert {r.status_code for r in low} == {200, 503}
        assert all(r.headers.get("retry-after") for r in low if r.status_code == 503)
        refused = {level: svc.metric("scs_priority_rejections_total", **CACHE, priority=level, reason="queue_full")
                   for level in "123"}
        assert refused["1"] == refused["2"] == 0 and refused["3"] == sum(r.status_code == 503 for r in low)
        assert svc.metric("scs_priority_queue_wait_seconds_count", **CACHE, priority="1") == 64 * len(high)
    finally:
        svc.stop()
