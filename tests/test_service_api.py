"""The HTTP API against a real uvicorn on 127.0.0.1: answers, every bad input, limits, metrics, docs."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from conftest import TEXT, assert_error, in_process, read_metric


def post(service, body, **kwargs) -> httpx.Response:
    if isinstance(body, (dict, list)):
        kwargs["json"] = body
    else:
        kwargs["content"] = body
    return httpx.post(f"{service.url}/classify", timeout=30, **kwargs)


def test_one_text(service):
    response = post(service, {"text": TEXT}, headers={"X-Request-ID": "req-123"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-123"
    body = response.json()
    assert body["model"] == "test-model" and body["version"] == "1"
    [prediction] = body["predictions"]
    probabilities = list(prediction["probabilities"].values())
    assert len(probabilities) == 5 and probabilities == sorted(probabilities, reverse=True)
    assert prediction["label"] == next(iter(prediction["probabilities"]))
    assert prediction["score"] == probabilities[0]
    assert prediction["truncated"] is False


def test_generated_request_id(service):
    first, second = post(service, {"text": TEXT}), post(service, {"text": TEXT})
    assert first.headers["x-request-id"] and first.headers["x-request-id"] != second.headers["x-request-id"]


def test_many_texts_answer_in_order_like_single_requests(service):
    texts = ["card", "I want a refund for this purchase right now please", "top up", "where is my money " * 5, TEXT]
    batch = post(service, {"texts": texts, "top_k": 77}).json()["predictions"]
    single = [post(service, {"text": t, "top_k": 77}).json()["predictions"][0] for t in texts]
    assert len(batch) == len(texts)
    for together, alone in zip(batch, single):
        assert together["label"] == alone["label"]
        assert max(abs(together["probabilities"][k] - alone["probabilities"][k]) for k in alone["probabilities"]) <= 1e-5
        assert abs(sum(together["probabilities"].values()) - 1) < 1e-4


def test_long_text_is_truncated_and_says_so(service):
    [long, short] = post(service, {"texts": ["card payment declined " * 80, "card"]}).json()["predictions"]
    assert long["truncated"] is True and short["truncated"] is False


@pytest.mark.parametrize("text", ["My card 💳 never arrived 😡", "أين بطاقتي الجديدة؟", "כרטיס האשראי שלי לא הגיע",
                                  "我的卡还没到", "カードが届きません", "Где моя карта?", "\t tabs\nand newlines \r"])
def test_any_script_classifies(service, text):
    response = post(service, {"text": text})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"]


BAD_JSON = [
    (b'{"text": "unterminated', 400, "malformed_json"),
    (b"", 400, "malformed_json"),
    (b'{"text": "caf\xe9"}', 400, "invalid_utf8"),
    (b'{"text": "\\ud800"}', 400, "malformed_json"),  # a lone surrogate is not text
]
BAD_FIELDS = [
    ({"text": 5}, "string_type"),
    ({"texts": "one"}, "list_type"),
    ({"texts": ["ok", 3]}, "string_type"),
    ({}, "text_or_texts"),
    ({"text": None}, "text_or_texts"),
    ({"text": "a", "texts": ["b"]}, "text_or_texts"),
    ({"text": "a", "colour": "red"}, "extra_forbidden"),
    ([TEXT], "model_type"),
    ({"text": ""}, "empty_text"),
    ({"text": "  \n\t "}, "empty_text"),
    ({"texts": ["fine", " "]}, "empty_text"),
    ({"texts": []}, "empty_texts"),
    ({"text": "a\x00b"}, "control_character"),
    ({"text": "escape \x1b[31m red"}, "control_character"),
    ({"text": "bell\x07"}, "control_character"),
    ({"text": "x" * 2001}, "text_too_long"),
    ({"texts": ["ok"] * 65}, "too_many_texts"),
    ({"text": "a", "top_k": 0}, "top_k_out_of_range"),
    ({"text": "a", "top_k": 78}, "top_k_out_of_range"),
    ({"text": "a", "top_k": "3"}, "int_type"),
    ({"text": "a", "top_k": 2.5}, "int_type"),
    ({"text": "a", "top_k": True}, "int_type"),
]


@pytest.mark.parametrize("body, status, code", BAD_JSON)
def test_unreadable_body_is_400(service, body, status, code):
    assert_error(post(service, body, headers={"content-type": "application/json"}), status, code)


@pytest.mark.parametrize("body, problem", BAD_FIELDS)
def test_invalid_request_is_422_naming_the_problem(service, body, problem):
    error = assert_error(post(service, body), 422, "invalid_request")
    assert problem in {detail["type"] for detail in error["details"]}, error


def test_body_over_limit_is_413_before_parsing(service):
    huge = b'{"text": "' + b"a" * 1_100_000 + b'"}'
    error = assert_error(post(service, huge), 413, "body_too_large")
    assert error["details"]["limit_bytes"] == 1_048_576

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield b"x" * 65536

    assert_error(post(service, chunks()), 413, "body_too_large")


def test_the_service_survives_a_declared_but_unsent_huge_body(service):
    with socket.create_connection(("127.0.0.1", int(service.url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 999999999\r\n\r\n{")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413")
    assert post(service, {"text": TEXT}).status_code == 200


def test_other_routes_and_methods_use_the_error_shape(service):
    assert_error(httpx.get(f"{service.url}/classify"), 405, "method_not_allowed")
    assert_error(httpx.get(f"{service.url}/nothing-here"), 404, "not_found")


def test_health_ready_model(service):
    assert httpx.get(f"{service.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{service.url}/readyz").json() == {"status": "ready"}
    info = httpx.get(f"{service.url}/v1/model").json()
    assert info["provider"] == "CPUExecutionProvider"
    assert info["model"]["name"] == "test-model" and len(info["model"]["labels"]) == 77
    assert info["batching"]["max_batch_size"] == 64 and info["limits"]["max_texts"] == 64
    assert len(info["model"]["files"]["model.onnx"]) == 64


def test_metrics_count_requests_batches_and_rejections(service):
    before = service.metric("scs_requests_total", endpoint="/classify", status="200")
    post(service, {"texts": ["card arrived", "refund"]})
    assert_error(post(service, {"text": ""}), 422)
    assert service.metric("scs_requests_total", endpoint="/classify", status="200") == before + 1
    assert service.metric("scs_requests_total", endpoint="/classify", status="422") >= 1
    for name in ("scs_batch_size_sentences_count", "scs_batch_padded_tokens_count", "scs_batch_padding_ratio_count",
                 "scs_model_run_seconds_count", "scs_queue_wait_seconds_count", "scs_real_tokens_total",
                 "scs_padded_tokens_total"):
        assert service.metric(name) > 0, name
    text = httpx.get(f"{service.url}/metrics").text
    for name in ("scs_queue_depth", "scs_requests_in_flight", "scs_request_duration_seconds_bucket",
                 'scs_model_info{name="test-model",provider="CPUExecutionProvider",version="1"} 1.0'):
        assert name in text


def test_docs_show_the_contract_with_examples(service):
    assert httpx.get(f"{service.url}/docs").status_code == 200
    spec = httpx.get(f"{service.url}/openapi.json").json()
    operation = spec["paths"]["/classify"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["examples"]
    assert {"400", "413", "422", "503", "504"} <= set(operation["responses"])
    assert "ClassifyResponse" in json.dumps(operation["responses"]["200"])


async def burst(url: str, bodies: list[dict], concurrency: int = 64) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        return await asyncio.gather(*(client.post("/classify", json=body) for body in bodies))


def test_full_queue_answers_503_with_retry_after(service_factory, test_artifact):
    busy = service_factory(test_artifact, MAX_QUEUE_SIZE=64, MAX_BATCH_SIZE=1)
    bodies = [{"texts": [f"{TEXT} {i} {j}" for j in range(64)]} for i in range(24)]
    responses = asyncio.run(burst(busy.url, bodies, concurrency=24))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert_error(refused, 503, "queue_full")
    assert refused.headers["retry-after"] == "1"
    assert busy.metric("scs_rejections_total", reason="queue_full") == statuses.count(503)
    assert post(busy, {"text": TEXT}).status_code == 200


def test_deadline_answers_504_and_drops_the_work(service_factory, test_artifact):
    slow = service_factory(test_artifact, REQUEST_TIMEOUT_S=0.05, MAX_BATCH_SIZE=1)
    bodies = [{"texts": [f"{TEXT} {i} {j}" for j in range(64)]} for i in range(16)]
    responses = asyncio.run(burst(slow.url, bodies, concurrency=16))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 504} and 504 in statuses, statuses
    assert_error(next(r for r in responses if r.status_code == 504), 504, "deadline_exceeded")
    ran = slow.metric("scs_batch_size_sentences_sum")
    assert ran < 64 * len(bodies)  # expired sentences were never run
    assert slow.metric("scs_rejections_total", reason="deadline_exceeded") == statuses.count(504)


@pytest.mark.parametrize("plain_uvicorn", [False, True], ids=["disconnect-notice", "watcher-task"])
def test_client_that_leaves_costs_no_model_run(test_artifact, metric, plain_uvicorn):
    """Real uvicorn (in a thread) and the real model, held at a gate so the leaver's sentences must wait.
    Served as ``python -m service`` serves (our protocol's disconnect notice) and by plain uvicorn, where
    the handler's watcher task must notice instead."""
    import threading

    from service.runtime import load_runtime

    runtime = load_runtime(test_artifact)
    gate, real_run = threading.Event(), runtime.run
    gate.set()
    runtime.run = lambda sequences: (gate.wait(30), real_run(sequences))[1]

    def wait_for(condition) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not condition():
            time.sleep(0.01)

    def request(body: dict) -> bytes:
        data = json.dumps(body).encode()
        return (b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)

    with in_process(runtime, plain_uvicorn=plain_uvicorn) as served:
        url = served.url
        try:
            port = int(url.rsplit(":", 1)[1])
            gate.clear()
            blocker = socket.create_connection(("127.0.0.1", port))
            blocker.sendall(request({"text": TEXT}))  # its model run now waits at the gate
            wait_for(lambda: metric(url, "scs_requests_in_flight") >= 2)
            gone = socket.create_connection(("127.0.0.1", port))
            gone.sendall(request({"texts": [f"gone {j}" for j in range(64)]}))
            wait_for(lambda: metric(url, "scs_queue_depth") == 64)
            gone.close()
            wait_for(lambda: metric(url, "scs_rejections_total", reason="client_disconnected") >= 1)
            gate.set()
            blocker.settimeout(30)
            assert blocker.recv(64).startswith(b"HTTP/1.1 200")
            blocker.close()
            assert metric(url, "scs_rejections_total", reason="client_disconnected") == 1
            wait_for(lambda: metric(url, "scs_queue_depth") == 0)
            assert metric(url, "scs_batch_size_sentences_sum") == 1  # the blocker's sentence; none of the leaver's 64
        finally:
            gate.set()  # never leave the model thread waiting, even when an assertion failed


def test_failing_model_run_answers_500_with_error_id_and_service_stays_up(test_artifact, caplog):
    """Fault injection: the real runtime, made to raise on batches holding one token."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.runtime import load_runtime
    from service.settings import Settings

    runtime = load_runtime(test_artifact)
    manifest = runtime.artifact.manifest
    [[poison]] = runtime.artifact.encoder.encode(["refund"])[0]
    real_run = runtime.run

    def failing_run(sequences):
        if any(poison in s for s in sequences):
            raise RuntimeError("injected model failure")
        return real_run(sequences)

    runtime.run = failing_run
    with TestClient(create_app(Settings(model_dir=test_artifact), runtime)) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        error = assert_error(client.post("/classify", json={"texts": ["card", "refund"]}), 500, "model_error")
        [logged] = [r for r in caplog.records if getattr(r, "fields", {}).get("error_id") == error["details"]["error_id"]]
        assert logged.levelname == "ERROR" and "injected model failure" in caplog.text
        assert client.post("/classify", json={"text": "card"}).status_code == 200


@pytest.mark.slow
def test_slow_model_keeps_deadlines_and_a_bounded_queue(test_artifact):
    """Every model run takes 0.2 s; 40 requests of 4 sentences arrive at once into a 32-sentence queue
    with a 1 s deadline: each is answered 200, refused 503 (Retry-After) or 504; none hangs or fails."""
    from service.runtime import load_runtime

    runtime = load_runtime(test_artifact)
    real_run = runtime.run
    runtime.run = lambda sequences: (time.sleep(0.2), real_run(sequences))[1]
    with in_process(runtime, max_batch_size=4, max_queue_size=32, max_texts=4, request_timeout_s=1.0) as served:
        url = served.url
        depths: list[float] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                depths.append(read_metric(url, "scs_queue_depth"))

        watcher = threading.Thread(target=watch)
        watcher.start()

        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=30,
                                         limits=httpx.Limits(max_connections=40)) as client:
                return await asyncio.gather(*(client.post("/classify", json={"texts": [f"card {i} {j}" for j in
                                                                                         range(4)]})
                                              for i in range(40)))

        try:
            responses = asyncio.run(burst())
        finally:
            stop.set()
            watcher.join(10)
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503, 504} and {200, 503, 504} <= set(statuses), statuses
        assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)
        assert all(r.json()["error"]["code"] == "deadline_exceeded" for r in responses if r.status_code == 504)
        assert max(depths) <= 32
        ran = read_metric(url, "scs_batch_size_sentences_sum")
        assert ran < 4 * statuses.count(200) + 4 * statuses.count(504)  # some expired sentences never ran
        assert httpx.post(f"{url}/classify", json={"text": "card"}, timeout=30).status_code == 200
