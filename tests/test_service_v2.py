"""The Open Inference Protocol with its own clients, unmodified, against a real server on 127.0.0.1: tritonclient
(HTTP, sync and async, binary and JSON, with and without classification) and the kserve package's REST client
(in a virtualenv of its own: its pins clash with the project's); V2 answers equal /classify's and a direct
one-sentence onnxruntime run for every test sentence; every bad tensor is a 4xx in the protocol's shape."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

from conftest import TEST_ARTIFACT, TEXT, alone, kserve_client, sentences, start_service

MODEL = "test-model"
TEXTS = [TEXT, "How do I top up by card?", "my card was stolen 💳"]


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    """The test model's two versions, both served (policy all)."""
    service = start_service(TEST_ARTIFACT.parent, tmp_path_factory.mktemp("v2") / "service.log",
                            VERSION_POLICY="all")
    yield service
    service.stop()


def client(service) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(service.url.removeprefix("http://"))


def text_input(texts: list[str], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("TEXT", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_), binary_data=binary)
    return tensor


def strings(array) -> list[str]:
    """BYTES elements as str (tritonclient gives bytes from binary outputs, str from JSON ones)."""
    return [x.decode() if isinstance(x, bytes) else x for x in array.ravel()]


def classify(service, texts: list[str], version: str | None = None) -> dict:
    body = {"texts": texts, "top_k": 77, "model": MODEL} | ({"version": version} if version else {})
    return httpx.post(f"{service.url}/classify", json=body, timeout=30).json()


def as_matrix(answer: dict, labels: list[str]) -> np.ndarray:
    return np.array([[p["probabilities"][label] for label in labels] for p in answer["predictions"]])


def test_server_and_model_metadata_and_health(v2):
    with client(v2) as c:
        assert c.is_server_live() and c.is_server_ready()
        meta = c.get_server_metadata()
        assert {"binary_tensor_data", "classification", "model_repository"} <= set(meta["extensions"])
        model = c.get_model_metadata(MODEL)
        assert model["versions"] == ["1", "2"]
        assert model["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": [-1]}]
        assert {o["name"]: o["shape"] for o in model["outputs"]} == {"PROBABILITIES": [-1, 77], "LABEL": [-1]}
        assert c.is_model_ready(MODEL) and c.is_model_ready(MODEL, "1") and not c.is_model_ready(MODEL, "7")
        assert not c.is_model_ready("nobody")
        index = c.get_model_repository_index()
        assert {(row["name"], row["version"], row["state"]) for row in index} == {(MODEL, "1", "READY"),
                                                                                (MODEL, "2", "READY")}
    assert httpx.get(f"{v2.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{v2.url}/v2/health/ready").json() == {"ready": True}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infer_equals_classify(v2, binary):
    with client(v2) as c:
        for version in ("1", "2"):
            outputs = [triton.InferRequestedOutput("PROBABILITIES", binary_data=binary),
                       triton.InferRequestedOutput("LABEL", binary_data=binary)]
            result = c.infer(MODEL, [text_input(TEXTS, binary)], model_version=version, outputs=outputs,
                             request_id="req-7")
            answer = classify(v2, TEXTS, version)
            labels = json.loads((TEST_ARTIFACT.parent / version / "labels.json").read_text())
            probabilities = result.as_numpy("PROBABILITIES")
            assert probabilities.dtype == np.float32 and probabilities.shape == (3, 77)
            assert np.abs(probabilities - as_matrix(answer, labels)).max() <= 1e-6
            assert strings(result.as_numpy("LABEL")) == [p["label"] for p in answer["predictions"]]
            response = result.get_response()
            assert response["model_version"] == version and response["id"] == "req-7"


def test_tritonclient_with_no_outputs_named_gets_every_output_in_binary(v2):
    with client(v2) as c:
        result = c.infer(MODEL, [text_input(TEXTS)])
        assert result.as_numpy("PROBABILITIES").shape == (3, 77) and len(result.as_numpy("LABEL")) == 3
        assert result.get_response()["model_version"] == "2"  # the newest served version by default
        assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_extension_answers_score_index_label(v2, binary):
    with client(v2) as c:
        result = c.infer(MODEL, [text_input(TEXTS, binary)], model_version="1",
                         outputs=[triton.InferRequestedOutput("PROBABILITIES", binary_data=binary, class_count=3)])
    top = result.as_numpy("PROBABILITIES")
    assert top.shape == (3, 3)
    answer = classify(v2, TEXTS, "1")
    for row, prediction in zip(top, answer["predictions"]):
        fields = [item.split(":", 2) for item in strings(row)]
        assert [label for _, _, label in fields] == list(prediction["probabilities"])[:3]
        assert [float(score) for score, _, _ in fields] == pytest.approx(
            list(prediction["probabilities"].values())[:3], abs=1e-6)
        labels = json.loads((TEST_ARTIFACT.parent / "1" / "labels.json").read_text())
        assert all(labels[int(index)] == label for _, index, label in fields)


def test_async_tritonclient(v2):
    async def run():
        async with triton_aio.InferenceServerClient(v2.url.removeprefix("http://")) as c:
            assert await c.is_server_ready()
            results = await asyncio.gather(*(c.infer(MODEL, [text_input([text])]) for text in TEXTS))
            return [strings(r.as_numpy("LABEL"))[0] for r in results]

    assert asyncio.run(run()) == [p["label"] for p in classify(v2, TEXTS)["predictions"]]


def test_tritonclient_sees_errors_as_errors(v2):
    with client(v2) as c:
        with pytest.raises(InferenceServerException, match="not served"):
            c.infer("nobody", [text_input(TEXTS)])
        with pytest.raises(InferenceServerException, match="version '9'"):
            c.infer(MODEL, [text_input(TEXTS)], model_version="9")
        with pytest.raises(InferenceServerException, match="classification must be an integer from 1 to 77"):
            c.infer(MODEL, [text_input(TEXTS)], outputs=[triton.InferRequestedOutput("PROBABILITIES", class_count=78)])


@pytest.mark.slow
def test_every_test_sentence_through_v2_equals_classify_and_a_direct_run(v2):
    texts = sentences()
    reference = alone(TEST_ARTIFACT.parent / "2", texts)
    labels = json.loads((TEST_ARTIFACT.parent / "2" / "labels.json").read_text())
    served, classified = [], []
    with client(v2) as c:
        for start in range(0, len(texts), 64):
            chunk = texts[start:start + 64]
            served.append(c.infer(MODEL, [text_input(chunk)]).as_numpy("PROBABILITIES"))
            classified.append(as_matrix(classify(v2, chunk), labels))
    served, classified = np.concatenate(served), np.concatenate(classified)
    assert served.shape == (3080, 77)
    assert np.abs(served - classified).max() <= 1e-5 and (served.argmax(1) == classified.argmax(1)).all()
    assert np.abs(served - reference).max() <= 1e-5 and (served.argmax(1) == reference.argmax(1)).all()


def raw(service, body: bytes, headers: dict | None = None, path: str = f"/v2/models/{MODEL}/infer") -> httpx.Response:
    return httpx.post(f"{service.url}{path}", content=body, headers=headers or {}, timeout=30)


def binary_request(texts: list[bytes], header: dict | None = None, size: int | None = None,
                   payload: bytes | None = None) -> tuple[bytes, dict]:
    data = payload if payload is not None else b"".join(struct.pack("<I", len(t)) + t for t in texts)
    head = header or {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(texts)],
                                  "parameters": {"binary_data_size": len(data) if size is None else size}}]}
    encoded = json.dumps(head).encode()
    return encoded + data, {"Inference-Header-Content-Length": str(len(encoded))}


def tensor(**changes) -> bytes:
    base = {"name": "TEXT", "datatype": "BYTES", "shape": [2], "data": ["a card", "a refund"]}
    return json.dumps({"inputs": [base | changes]}).encode()


BAD = {
    "wrong datatype": (tensor(datatype="FP32"), None, 400, "datatype BYTES"),
    "shape says 3, data has 2": (tensor(shape=[3]), None, 400, "must hold 3 strings"),
    "shape of rank 3": (tensor(shape=[2, 1, 1]), None, 400, "shape [n] or [n, 1]"),
    "unknown input name": (tensor(name="SENTENCE"), None, 400, "unknown input 'SENTENCE'"),
    "a number in BYTES data": (tensor(data=["a", 5]), None, 400, "element 1 must be a string"),
    "control character": (tensor(data=["a", "b\u0007"]), None, 400, "control character"),
    "unknown output": (json.dumps({"inputs": [json.loads(tensor())["inputs"][0]],
                                   "outputs": [{"name": "LOGITS"}]}).encode(), None, 400, "unknown output 'LOGITS'"),
    "classification 0 < k": (json.dumps({"inputs": [json.loads(tensor())["inputs"][0]], "outputs": [
        {"name": "PROBABILITIES", "parameters": {"classification": -1}}]}).encode(), None, 400, "classification"),
    "timeout not a number": (json.dumps({"inputs": [json.loads(tensor())["inputs"][0]],
                                         "parameters": {"timeout": "soon"}}).encode(), None, 400, "timeout"),
    "not JSON": (b"{nope", None, 400, "not valid JSON"),
    "a list, not an object": (b"[1, 2]", None, 400, "must be a JSON object"),
    "no inputs": (b"{}", None, 400, "'inputs' must be a non-empty list"),
}
BINARY_BAD = {
    "non-UTF-8 bytes": (binary_request([b"ok", b"\xff\xfe"]), 400, "not UTF-8"),
    "truncated binary payload": (binary_request([b"hello", b"world"], size=30), 400, "runs past the end"),
    "element longer than the payload": (binary_request([b"x"], payload=struct.pack("<I", 50) + b"x"), 400,
                                        "declares 50 bytes"),
    "bytes after the elements": (binary_request([b"x"], payload=struct.pack("<I", 1) + b"xyz"), 400, "bytes after"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_json_tensors_are_4xx_in_the_protocols_shape(v2, case):
    body, headers, status, says = BAD[case]
    response = raw(v2, body, headers)
    assert response.status_code == status and says in response.json()["error"], response.text
    assert set(response.json()) == {"error"}


@pytest.mark.parametrize("case", list(BINARY_BAD))
def test_bad_binary_tensors_are_4xx_in_the_protocols_shape(v2, case):
    (body, headers), status, says = BINARY_BAD[case]
    response = raw(v2, body, headers)
    assert response.status_code == status and says in response.json()["error"], response.text


def test_header_length_past_the_body_and_unknown_models(v2):
    body, _ = binary_request([b"card"])
    response = raw(v2, body, {"Inference-Header-Content-Length": str(len(body) + 10)})
    assert response.status_code == 400 and "only" in response.json()["error"]
    assert raw(v2, tensor(), path="/v2/models/nobody/infer").status_code == 404
    assert raw(v2, tensor(), path=f"/v2/models/{MODEL}/versions/3/infer").status_code == 404
    assert httpx.get(f"{v2.url}/v2/models/nobody").json()["error"].startswith("model 'nobody' is not served")


def test_gzip_bodies_are_read_and_bombs_refused(v2):
    import gzip

    body, headers = binary_request([t.encode() for t in TEXTS])
    answer = raw(v2, gzip.compress(body), headers | {"Content-Encoding": "gzip"})
    assert answer.status_code == 200, answer.text  # no binary output asked for: a JSON answer
    assert [o["shape"] for o in answer.json()["outputs"]] == [[3, 77], [3]]
    bomb = raw(v2, gzip.compress(b"{" + b" " * 5_000_000 + b"}"), {"Content-Encoding": "gzip"})
    assert bomb.status_code == 413
    assert raw(v2, tensor(), {"Content-Encoding": "br"}).status_code == 415


def test_a_timeout_in_microseconds_is_honoured(service_factory, test_artifact):
    svc = service_factory(test_artifact, MAX_BATCH_SIZE=1)
    body = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [64], "data": [
        f"{TEXT} {i}" for i in range(64)]}], "parameters": {"timeout": 1}}).encode()  # 1 us: never in time
    response = raw(svc, body, path=f"/v2/models/{MODEL}/infer")
    assert response.status_code == 504 and "not answered within" in response.json()["error"]


KSERVE_CLIENT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

async def main(url, texts):
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    out = {"live": await client.is_server_live(url), "ready": await client.is_server_ready(url),
           "model_ready": await client.is_model_ready(url, "test-model")}
    for binary in (False, True):
        tensor = InferInput("TEXT", [len(texts)], "BYTES")
        tensor.set_data_from_numpy(np.array(texts, dtype=np.object_), binary_data=binary)
        result = await client.infer(url, InferRequest("test-model", [tensor], request_id="k1"), "test-model")
        outputs = {o.name: o.as_numpy().tolist() for o in result.outputs}
        outputs["LABEL"] = [x.decode() if isinstance(x, bytes) else x for x in outputs["LABEL"]]
        out["binary" if binary else "json"] = {"id": result.id, "version": result.model_version, **outputs}
    await client.close()
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
"""


@pytest.mark.slow
@pytest.mark.venv
def test_the_kserve_rest_client_works_unmodified(v2, kserve_python):
    seen = kserve_client(kserve_python, KSERVE_CLIENT, v2.url, TEXTS)
    answer = classify(v2, TEXTS)
    labels = json.loads((TEST_ARTIFACT.parent / "2" / "labels.json").read_text())
    for kind in ("json", "binary"):
        assert seen[kind]["id"] == "k1"  # (kserve's InferResponse keeps no model_version: the values say it was v2)
        assert seen[kind]["LABEL"] == [p["label"] for p in answer["predictions"]]
        assert np.abs(np.array(seen[kind]["PROBABILITIES"]) - as_matrix(answer, labels)).max() <= 1e-6


def test_a_sentence_from_either_route_can_share_a_batch(test_artifact, metric):
    """Held model, one /classify and one V2 request queued together: they leave the queue in one batch."""
    import threading

    from conftest import in_process
    from service.runtime import load_runtime

    runtime = load_runtime(test_artifact)
    gate, real_run = threading.Event(), runtime.run
    gate.set()  # open for the warm-up
    runtime.run = lambda sequences: (gate.wait(30), real_run(sequences))[1]
    with in_process(runtime) as served:
        gate.clear()
        try:
            port = int(served.url.rsplit(":", 1)[1])
            held = socket.create_connection(("127.0.0.1", port))
            body = b'{"text": "card"}'
            held.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            results: dict = {}
            threads = [threading.Thread(target=lambda: results.update(c=httpx.post(
                           f"{served.url}/classify", json={"text": "same length A"}, timeout=30))),
                       threading.Thread(target=lambda: results.update(v=raw(served, tensor(shape=[1], data=[
                           "same length B"]), path=f"/v2/models/{MODEL}/infer")))]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 10
            while metric(served.url, "scs_queue_depth") < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            gate.set()
        for thread in threads:
            thread.join(30)
        held.close()
        assert results["c"].status_code == 200 and results["v"].status_code == 200
        sizes = metric(served.url, "scs_batch_size_sentences_bucket", le="2.0") - metric(
            served.url, "scs_batch_size_sentences_bucket", le="1.0")
        assert sizes >= 1  # a batch of two: one sentence from each route
