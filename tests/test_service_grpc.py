"""The Open Inference Protocol over gRPC with its own clients, unmodified, against a real server on 127.0.0.1:
tritonclient.grpc (raw and typed contents, classification, metadata, readiness, the repository extension) and the
kserve package's InferenceGRPCClient (in its own virtualenv); answers equal /classify's; every status code the issue
names; a cancelled call and a deadline take their sentences out of the queue; malformed bytes, wrong datatypes,
shapes that do not match, oversize messages are each answered with a status, never INTERNAL or UNKNOWN; the health
service; workers sharing the port; SIGTERM under gRPC load loses no call and exits 0."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import (ROOT, TEST_ARTIFACT, TEXT, free_port, in_process, kserve_client, read_metric, sentences,
                      start_service, wait_for)
from service.grpc_messages import HEALTH, SERVICE, HealthCheckRequest, HealthCheckResponse

MODEL = "test-model"
TEXTS = [TEXT, "How do I top up by card?", "my card was stolen 💳"]
INFER = f"/{SERVICE}/ModelInfer"
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}  # never for a client's malformed request
LABELS = {version: json.loads((TEST_ARTIFACT.parent / version / "labels.json").read_text()) for version in ("1", "2")}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The test model's two versions, both served (policy all); gRPC on its own port."""
    service = start_service(TEST_ARTIFACT.parent, tmp_path_factory.mktemp("grpc") / "service.log",
                            VERSION_POLICY="all")
    yield service
    service.stop()


def client(target: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(target)


def text_input(texts: list[str]) -> triton.InferInput:
    tensor = triton.InferInput("TEXT", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    return tensor


def classify(service, texts: list[str], version: str | None = None) -> np.ndarray:
    """/classify's probabilities for ``texts``, as a matrix in label order."""
    body = {"texts": texts, "top_k": 77, "model": MODEL} | ({"version": version} if version else {})
    answer = httpx.post(f"{service.url}/classify", json=body, timeout=30).json()
    labels = LABELS[answer["version"]]
    return np.array([[p["probabilities"][label] for label in labels] for p in answer["predictions"]])


def code_of(error: InferenceServerException) -> str:
    return str(error.status())


def raw_call(target: str, body: bytes, method: str = INFER, timeout: float = 30, metadata=None):
    """One call with ``body`` as the serialized request: (code, details)."""
    with grpc.insecure_channel(target) as channel:
        try:
            channel.unary_unary(method)(body, timeout=timeout, metadata=metadata)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as error:
            return error.code(), error.details()


def request(texts: list[str] | None = None, **tensor) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest in tritonclient's own messages, TEXT in typed contents (or as ``tensor`` says)."""
    message = service_pb2.ModelInferRequest(model_name=MODEL)
    spec = {"name": "TEXT", "datatype": "BYTES", "shape": [len(texts or TEXTS)]} | tensor
    message.inputs.add(**spec)
    if "contents" not in tensor:
        message.inputs[0].contents.bytes_contents.extend(t.encode() for t in texts or TEXTS)
    return message


# --- tritonclient.grpc against the real service --------------------------------------------------------------------

def test_tritonclient_health_metadata_and_readiness(served):
    with client(served.grpc) as c:
        assert c.is_server_live() and c.is_server_ready()
        meta = c.get_server_metadata(as_json=True)
        assert meta["name"] == "sentence-classifier-service"
        assert {"binary_tensor_data", "classification", "model_repository"} <= set(meta["extensions"])
        model = c.get_model_metadata(MODEL, as_json=True)
        assert model["versions"] == ["1", "2"] and model["platform"] == "onnxruntime_onnx"
        assert model["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": ["-1"]}]
        assert {o["name"]: o["shape"] for o in model["outputs"]} == {"PROBABILITIES": ["-1", "77"], "LABEL": ["-1"]}
        assert c.get_model_metadata(MODEL, "1", as_json=True)["versions"] == ["1"]
        assert c.is_model_ready(MODEL) and c.is_model_ready(MODEL, "1")
        for name, version in (("nobody", ""), (MODEL, "7")):
            with pytest.raises(InferenceServerException) as refused:
                c.is_model_ready(name, version)
            assert code_of(refused.value) == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as refused:
            c.get_model_metadata("nobody")
        assert code_of(refused.value) == "StatusCode.NOT_FOUND" and "not served" in refused.value.message()
        index = c.get_model_repository_index(as_json=True)["models"]
        assert {(row["name"], row["version"], row["state"]) for row in index} == {(MODEL, "1", "READY"),
                                                                                (MODEL, "2", "READY")}


def test_tritonclient_infer_equals_classify_on_200_test_sentences(served):
    """The bar: raw contents (tritonclient's way), both versions, 200 test sentences, within 1e-6 of /classify."""
    texts = sentences()[:200]
    with client(served.grpc) as c:
        for version in ("1", "2"):
            for start in range(0, 200, 50):
                chunk = texts[start:start + 50]
                result = c.infer(MODEL, [text_input(chunk)], model_version=version, request_id=f"r{start}")
                probabilities = result.as_numpy("PROBABILITIES")
                assert probabilities.dtype == np.float32 and probabilities.shape == (50, 77)
                assert np.abs(probabilities - classify(served, chunk, version)).max() <= 1e-6
                labels = [x.decode() for x in result.as_numpy("LABEL")]
                assert labels == [LABELS[version][i] for i in probabilities.argmax(1)]
                response = result.get_response()
                assert response.model_version == version and response.id == f"r{start}"
                assert len(response.raw_output_contents) == 2  # raw in, raw out


def test_typed_contents_in_typed_contents_out(served):
    """bytes_contents in (tritonclient's own stub and messages): fp32_contents and bytes_contents out."""
    with grpc.insecure_channel(served.grpc) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request(), timeout=30)
    assert not response.raw_output_contents and response.model_version == "2"
    probabilities, labels = response.outputs
    assert (probabilities.name, probabilities.datatype, list(probabilities.shape)) == ("PROBABILITIES", "FP32", [3, 77])
    got = np.array(probabilities.contents.fp32_contents).reshape(3, 77)
    assert np.abs(got - classify(served, TEXTS)).max() <= 1e-6
    assert [x.decode() for x in labels.contents.bytes_contents] == [LABELS["2"][i] for i in got.argmax(1)]


def test_classification_extension_and_one_output(served):
    with client(served.grpc) as c:
        result = c.infer(MODEL, [text_input(TEXTS)], model_version="1",
                         outputs=[triton.InferRequestedOutput("PROBABILITIES", class_count=3)])
        assert [o.name for o in result.get_response().outputs] == ["PROBABILITIES"]
        top = result.as_numpy("PROBABILITIES")
        assert top.shape == (3, 3)
        reference = classify(served, TEXTS, "1")
        for row, expected in zip(top, reference):
            fields = [item.decode().split(":", 2) for item in row]
            assert [int(index) for _, index, _ in fields] == list(np.argsort(-expected)[:3])
            assert [float(score) for score, _, _ in fields] == pytest.approx(np.sort(expected)[::-1][:3], abs=1e-6)
            assert all(LABELS["1"][int(index)] == label for _, index, label in fields)
        only_label = c.infer(MODEL, [text_input(TEXTS)], outputs=[triton.InferRequestedOutput("LABEL")])
        assert [o.name for o in only_label.get_response().outputs] == ["LABEL"]
        with pytest.raises(InferenceServerException) as refused:
            c.infer(MODEL, [text_input(TEXTS)], outputs=[triton.InferRequestedOutput("PROBABILITIES", class_count=78)])
        assert code_of(refused.value) == "StatusCode.INVALID_ARGUMENT"
        assert "classification must be an integer from 1 to 77" in refused.value.message()


def test_parameters_abstain_and_the_request_id_travels(served):
    with client(served.grpc) as c:
        result = c.infer(MODEL, [text_input(TEXTS)], parameters={"min_score": 1.0}, request_id="abc",
                         headers={"x-request-id": "trace-me-7"})
        assert [x.decode() for x in result.as_numpy("LABEL")] == ["", "", ""]  # nothing reaches a score of 1
        with pytest.raises(InferenceServerException) as refused:
            c.infer(MODEL, [text_input(TEXTS)], parameters={"min_score": 0.5, "min_precision": 0.9})
        assert code_of(refused.value) == "StatusCode.INVALID_ARGUMENT" and "at most one" in refused.value.message()


def test_the_metrics_count_grpc_calls_by_method_and_code(served):
    labels = {"protocol": "grpc", "endpoint": INFER}
    before = served.metric("scs_requests_total", status="OK", **labels)
    with client(served.grpc) as c:
        c.infer(MODEL, [text_input(["card"])])
        with pytest.raises(InferenceServerException):
            c.infer("nobody", [text_input(["card"])])
    assert served.metric("scs_requests_total", status="OK", **labels) == before + 1
    assert served.metric("scs_requests_total", status="NOT_FOUND", **labels) >= 1
    assert served.metric("scs_request_duration_seconds_count", **labels) >= 2


def test_the_health_service_answers_as_a_kubernetes_probe_asks(served):
    def check(service: str):
        code, _ = raw_call(served.grpc, HealthCheckRequest(service=service).SerializeToString(), f"/{HEALTH}/Check")
        return code

    with grpc.insecure_channel(served.grpc) as channel:
        answer = channel.unary_unary(f"/{HEALTH}/Check")(HealthCheckRequest().SerializeToString(), timeout=10)
        assert HealthCheckResponse.FromString(answer).status == HealthCheckResponse.SERVING
        watch = channel.unary_stream(f"/{HEALTH}/Watch")(HealthCheckRequest(service=SERVICE).SerializeToString(),
                                                         timeout=10)
        assert HealthCheckResponse.FromString(next(watch)).status == HealthCheckResponse.SERVING
        watch.cancel()
    assert check(SERVICE) == grpc.StatusCode.OK and check("nope") == grpc.StatusCode.NOT_FOUND


# --- every status code ---------------------------------------------------------------------------------------------

BAD = {
    "wrong datatype": (request(datatype="FP32"), "datatype BYTES"),
    "shape says 4, contents hold 3": (request(shape=[4]), "must hold 4 elements"),
    "shape of rank 3": (request(shape=[3, 1, 1]), "shape [n] or [n, 1]"),
    "unknown input name": (request(name="SENTENCE"), "unknown input 'SENTENCE'"),
    "FP32 contents for BYTES": (request(contents=service_pb2.InferTensorContents(fp32_contents=[1, 2, 3])),
                                "not fp32_contents"),
    "control character": (request(["a", "b\u0007", "c"]), "control character"),
    "65 texts (SCS_MAX_TEXTS 64)": (request(["a card"] * 65), "between 1 and 64"),
}


def with_raw(texts: list[bytes], shape: list[int] | None = None, payload: bytes | None = None,
             extra_contents: bool = False) -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name=MODEL)
    message.inputs.add(name="TEXT", datatype="BYTES", shape=shape or [len(texts)])
    if extra_contents:
        message.inputs[0].contents.bytes_contents.append(b"x")
    message.raw_input_contents.append(payload if payload is not None else
                                      b"".join(struct.pack("<I", len(t)) + t for t in texts))
    return message


RAW_BAD = {
    "non-UTF-8 bytes": (with_raw([b"ok", b"\xff\xfe"]), "not UTF-8"),
    "element longer than the payload": (with_raw([b"x"], payload=struct.pack("<I", 50) + b"x"), "declares 50 bytes"),
    "bytes after the elements": (with_raw([b"x"], payload=struct.pack("<I", 1) + b"xyz"), "bytes after"),
    "shape says 2, raw holds 1": (with_raw([b"card"], shape=[2]), "ends inside element 1"),
    "raw and contents both": (with_raw([b"card"], extra_contents=True), "both contents and raw_input_contents"),
}


@pytest.mark.parametrize("case", list(BAD) + list(RAW_BAD))
def test_bad_tensors_are_invalid_argument_with_the_rest_message(served, case):
    message, says = (BAD | RAW_BAD)[case]
    code, details = raw_call(served.grpc, message.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and says in details, (code, details)


def test_unknown_models_and_versions_are_not_found(served):
    for model, version in (("nobody", ""), (MODEL, "3"), (MODEL, "x")):
        message = request()
        message.model_name, message.model_version = model, version
        code, details = raw_call(served.grpc, message.SerializeToString())
        assert code == grpc.StatusCode.NOT_FOUND, (model, version, code, details)


def test_repository_control_is_refused_without_the_switch(served):
    with client(served.grpc) as c:
        with pytest.raises(InferenceServerException) as refused:
            c.unload_model(MODEL)
        assert code_of(refused.value) == "StatusCode.PERMISSION_DENIED" and "repository control is off" in \
            refused.value.message()


KEY = "k" * 24


def test_the_key_guards_everything_but_the_probes_and_repository_control_works_with_it(tmp_path):
    svc = start_service(TEST_ARTIFACT.parent, tmp_path / "service.log", API_KEY=KEY, VERSION_POLICY="all")
    try:
        with client(svc.grpc) as c:
            assert c.is_server_live() and c.is_server_ready()  # open, as /v2/health/* are
            for headers in (None, {"authorization": "Bearer wrong-key-wrong-key"}, {"authorization": KEY}):
                with pytest.raises(InferenceServerException) as refused:
                    c.infer(MODEL, [text_input(TEXTS)], headers=headers)
                assert code_of(refused.value) == "StatusCode.UNAUTHENTICATED"
            key = {"authorization": f"Bearer {KEY}"}
            assert c.infer(MODEL, [text_input(TEXTS)], headers=key).as_numpy("PROBABILITIES").shape == (3, 77)
            health = HealthCheckRequest().SerializeToString()
            assert raw_call(svc.grpc, health, f"/{HEALTH}/Check")[0] == grpc.StatusCode.OK
            # the repository extension, as tritonclient calls it: unload, then the index says so, then load
            c.unload_model(MODEL, headers=key)
            index = c.get_model_repository_index(headers=key, as_json=True)["models"]
            assert [(row["name"], row["state"], row.get("reason")) for row in index] == [(MODEL, "UNAVAILABLE",
                                                                                          "unloaded")]
            with pytest.raises(InferenceServerException) as refused:
                c.infer(MODEL, [text_input(TEXTS)], headers=key)
            assert code_of(refused.value) == "StatusCode.NOT_FOUND"
            c.load_model(MODEL, headers=key)
            assert c.is_model_ready(MODEL, "1", headers=key) and c.is_model_ready(MODEL, "2", headers=key)
            with pytest.raises(InferenceServerException) as refused:
                c.load_model("nobody", headers=key)
            assert code_of(refused.value) == "StatusCode.NOT_FOUND"
            # a rollout policy as the load call's string parameter: checked as over REST (400: INVALID_ARGUMENT)
            load = service_pb2.RepositoryModelLoadRequest(model_name=MODEL)
            load.parameters["rollout"].string_param = '{"canary": {"weight": 2}}'
            code, details = raw_call(svc.grpc, load.SerializeToString(), f"/{SERVICE}/RepositoryModelLoad",
                                     metadata=[("authorization", f"Bearer {KEY}")])
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "canary.weight" in details, (code, details)
    finally:
        svc.stop()


@pytest.fixture
def held(test_artifact):
    """An in-process service (gRPC on) whose model runs wait on ``gate`` once warm; small queue, 4 texts a call."""
    from service.runtime import load_runtime

    runtime = load_runtime(test_artifact)
    gate, real_run, ran = threading.Event(), runtime.run, []
    gate.set()  # open for the warm-up
    runtime.run = lambda sequences: (gate.wait(30), ran.append(len(sequences)), real_run(sequences))[2]
    with in_process(runtime, grpc_port=free_port(), max_batch_size=4, max_texts=4, max_queue_size=8,
                    request_timeout_s=5.0, priority_levels=1, default_priority=1) as service:  # one queue, all of it
        gate.clear()
        ran.clear()  # the warm-up's runs
        service.gate, service.ran = gate, ran
        try:
            yield service
        finally:
            gate.set()


def queue_depth(url: str) -> float:
    return read_metric(url, "scs_queue_depth")


def test_a_full_queue_is_resource_exhausted_then_it_recovers(held):
    with client(held.grpc) as c:
        answers: list = []
        first = c.async_infer(MODEL, [text_input(["one"] * 4)], lambda result, error: answers.append((result, error)))
        time.sleep(0.3)  # its batch (4) is in the held model; the queue holds 8 more
        queued = [c.async_infer(MODEL, [text_input(["two"] * 4)], lambda result, error: answers.append((result, error)))
                  for _ in range(2)]
        assert wait_for(lambda: queue_depth(held.url) == 8, 5)
        with pytest.raises(InferenceServerException) as refused:
            c.infer(MODEL, [text_input(["three"] * 4)])
        assert code_of(refused.value) == "StatusCode.RESOURCE_EXHAUSTED" and "capacity" in refused.value.message()
        held.gate.set()
        assert wait_for(lambda: len(answers) == 3, 10) and all(error is None for _, error in answers)
        del first, queued
        assert c.infer(MODEL, [text_input(["four"])]).as_numpy("LABEL").shape == (1,)


def test_a_cancelled_call_and_a_passed_deadline_take_their_sentences_out_of_the_queue(held):
    """With the model held: a call cancelled while queued and one whose gRPC deadline passes never run (the queue
    drops them as it reaches them: only the first call's 4 sentences ever reach the model)."""
    with client(held.grpc) as c:
        c.async_infer(MODEL, [text_input(["first"] * 4)], lambda result, error: None)  # into the held model
        time.sleep(0.2)
        cancelled = c.async_infer(MODEL, [text_input(["cancel me"] * 4)], lambda result, error: None)
        assert wait_for(lambda: queue_depth(held.url) == 4, 5)
        cancelled.cancel()
        assert wait_for(lambda: read_metric(held.url, "scs_rejections_total", reason="client_disconnected") == 1, 5)
        with pytest.raises(InferenceServerException) as late:
            c.infer(MODEL, [text_input(["too late"] * 3)], client_timeout=0.5)  # the gRPC deadline
        assert code_of(late.value) == "StatusCode.DEADLINE_EXCEEDED"
        with pytest.raises(InferenceServerException) as late:  # the timeout parameter, in microseconds
            c.infer(MODEL, [text_input(["soon"])], timeout=50_000)
        assert code_of(late.value) == "StatusCode.DEADLINE_EXCEEDED" and "within 0.05 s" in late.value.message()
        held.gate.set()
        assert wait_for(lambda: sum(held.ran) >= 4 and queue_depth(held.url) == 0, 10)
        time.sleep(0.3)
        assert sum(held.ran) == 4, held.ran  # the first call's sentences, none of the three others'


def test_a_failed_model_run_is_internal_and_the_server_stays_up(test_artifact):
    from service.runtime import load_runtime

    runtime = load_runtime(test_artifact)
    real_run, broken = runtime.run, threading.Event()
    runtime.run = lambda sequences: (_ for _ in ()).throw(RuntimeError("injected")) if broken.is_set() \
        else real_run(sequences)
    with in_process(runtime, grpc_port=free_port()) as service:
        broken.set()
        with client(service.grpc) as c:
            with pytest.raises(InferenceServerException) as failed:
                c.infer(MODEL, [text_input(["card"])])
            assert code_of(failed.value) == "StatusCode.INTERNAL" and "model run" in failed.value.message()
            broken.clear()
            assert c.infer(MODEL, [text_input(["card"])]).as_numpy("LABEL").shape == (1,)


def test_warming_up_is_unavailable_and_not_serving(test_artifact, tmp_path):
    """A warm-up held 6 s: gRPC already answers; calls are UNAVAILABLE, readiness false, health NOT_SERVING."""
    grpc_port, port = free_port(), free_port()
    slow = ("import time, service.runtime as r\nwarm = r.Runtime.warmup\n"
            "r.Runtime.warmup = lambda self: (time.sleep(6), warm(self))[1]\n"
            "from service.__main__ import main\nsys.exit(main(sys.argv[1:]))")
    log = (tmp_path / "service.log").open("wb")
    process = subprocess.Popen([__import__("sys").executable, "-c", f"import sys\n{slow}", "--model-dir",
                                str(test_artifact), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                               cwd=ROOT, stdout=log, stderr=log, env=__import__("os").environ | {
                                   "SCS_GRPC_PORT": str(grpc_port)})
    target = f"127.0.0.1:{grpc_port}"
    try:
        with client(target) as c:
            assert wait_for(lambda: _live(c), 30)
            assert not c.is_server_ready()
            with pytest.raises(InferenceServerException) as refused:
                c.infer(MODEL, [text_input(TEXTS)])
            assert code_of(refused.value) == "StatusCode.UNAVAILABLE" and "warming up" in refused.value.message()
            status = raw_call(target, HealthCheckRequest().SerializeToString(), f"/{HEALTH}/Check")
            assert status[0] == grpc.StatusCode.OK
            with grpc.insecure_channel(target) as channel:
                answer = channel.unary_unary(f"/{HEALTH}/Check")(HealthCheckRequest().SerializeToString())
            assert HealthCheckResponse.FromString(answer).status == HealthCheckResponse.NOT_SERVING
            assert wait_for(c.is_server_ready, 30)
            assert c.infer(MODEL, [text_input(TEXTS)]).as_numpy("LABEL").shape == (3,)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


def _live(c) -> bool:
    try:
        return c.is_server_live()
    except InferenceServerException:
        return False


# --- the fuzzing spirit --------------------------------------------------------------------------------------------

MALFORMED = {
    "not protobuf": b"\xff\xff\xff\xff\xff",
    "truncated": request().SerializeToString()[:-3],
    "a length past the end": b"\x2a\xff\xff\xff\x0f",
    "invalid UTF-8 in a string field": b"\x0a\x02\xff\xfe",
    "a group wire type": b"\x0b\x0c",
    "empty": b"",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_protobuf_is_answered_with_a_status(served, case):
    for method in (INFER, f"/{SERVICE}/ModelMetadata", f"/{SERVICE}/ModelReady", f"/{HEALTH}/Check"):
        code, details = raw_call(served.grpc, MALFORMED[case], method)
        assert code not in FORBIDDEN, (method, code, details)
    assert raw_call(served.grpc, MALFORMED[case])[0] in (grpc.StatusCode.INVALID_ARGUMENT,)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_any_bytes_get_a_status_never_internal(served, body):
    code, details = raw_call(served.grpc, body)
    assert code not in FORBIDDEN, (body, details)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=12), st.lists(st.integers(-3, 70), max_size=3), st.lists(st.binary(max_size=20), max_size=4),
       st.booleans())
def test_any_tensor_gets_a_status_never_internal(served, datatype, shape, elements, raw):
    message = service_pb2.ModelInferRequest(model_name=MODEL)
    message.inputs.add(name="TEXT", datatype=datatype, shape=shape)
    if raw:
        message.raw_input_contents.append(b"".join(struct.pack("<I", len(e)) + e for e in elements))
    else:
        message.inputs[0].contents.bytes_contents.extend(elements)
    code, details = raw_call(served.grpc, message.SerializeToString())
    assert code not in FORBIDDEN, (datatype, shape, elements, details)


def test_oversize_messages_are_resource_exhausted(served):
    big = request(["x" * 1000] * 2000)  # about 2 MB, over SCS_MAX_BODY_BYTES (1 MiB)
    code, details = raw_call(served.grpc, big.SerializeToString())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert raw_call(served.grpc, request().SerializeToString())[0] == grpc.StatusCode.OK  # still serving


# --- the kserve package's gRPC client, in its own virtualenv -------------------------------------------------------

KSERVE_GRPC = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

async def main(target, texts):
    out = {}
    async with InferenceGRPCClient(target, timeout=30) as client:
        out["live"], out["ready"] = await client.is_server_live(), await client.is_server_ready()
        out["model_ready"] = await client.is_model_ready("test-model")
        for binary in (False, True):
            tensor = InferInput("TEXT", [len(texts)], "BYTES")
            tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_), binary_data=binary)
            result = await client.infer(InferRequest("test-model", [tensor], request_id="k1"))
            outputs = {o.name: o.as_numpy().tolist() for o in result.outputs}
            outputs["LABEL"] = [x.decode() if isinstance(x, bytes) else x for x in outputs["LABEL"]]
            out["binary" if binary else "typed"] = {"id": result.id, **outputs}
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
"""


@pytest.mark.slow
def test_the_kserve_grpc_client_works_unmodified(served, kserve_python):
    seen = kserve_client(kserve_python, KSERVE_GRPC, served.grpc, TEXTS)
    reference = classify(served, TEXTS)
    for kind in ("typed", "binary"):
        assert seen[kind]["id"] == "k1"
        assert seen[kind]["LABEL"] == [LABELS["2"][i] for i in reference.argmax(1)]
        assert np.abs(np.array(seen[kind]["PROBABILITIES"]) - reference).max() <= 1e-6


# --- workers and the drain -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_every_worker_serves_grpc_on_the_one_port(tmp_path):
    svc = start_service(TEST_ARTIFACT, tmp_path / "service.log", WORKERS=2, ACCESS_LOG="true")
    try:  # ready means one worker serves; the other joins the port's group once warm
        assert wait_for(lambda: svc.log.read_text().count('"message":"grpc serving"') == 2, 60)
        for index in range(16):  # a channel each: a connection each, spread by the kernel over the group
            with grpc.insecure_channel(svc.grpc, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                assert stub.ModelInfer(request([f"card {index}"]), timeout=30).model_version == "1"
    finally:
        assert svc.stop() == 0
    lines = [json.loads(line) for line in svc.log.read_text().splitlines() if line.startswith("{")]
    workers = {line["worker"] for line in lines if line.get("protocol") == "grpc"}
    assert workers == {0, 1}, workers


def grpc_load(target: str, clients: int, stop: threading.Event, outcomes: list) -> list[threading.Thread]:
    """``clients`` loops, each on a channel (a connection) of its own, one call at a time until ``stop`` or refused.
    Each call is answered (OK), refused (never reached a server: UNAVAILABLE at connect), cancelled (CANCELLED, or
    UNAVAILABLE "Socket closed": gRPC core's shutdown ends the calls it holds that no handler has taken yet) or lost
    (anything else)."""
    texts = sentences()

    def loop(index: int) -> None:
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            sent = 0
            while not stop.is_set():
                sent += 1
                try:
                    stub.ModelInfer(request([texts[(index * 7919 + sent) % len(texts)]]), timeout=30)
                    outcomes.append("answered")
                except grpc.RpcError as error:
                    details = error.details() or ""
                    refused = error.code() == grpc.StatusCode.UNAVAILABLE and any(
                        says in details for says in ("failed to connect", "Connection refused", "connections to all"))
                    if refused:
                        outcomes.append("refused")
                        return
                    # CANCELLED, or UNAVAILABLE "Socket closed" when the call raced the connection's close: gRPC
                    # core's shutdown ended a call no handler had taken (the access log check below proves it).
                    cancelled = error.code() == grpc.StatusCode.CANCELLED or (
                        error.code() == grpc.StatusCode.UNAVAILABLE and details == "Socket closed")
                    outcomes.append("cancelled" if cancelled else f"lost: {error.code().name} {details}")

    threads = [threading.Thread(target=loop, args=(index,), daemon=True) for index in range(clients)]
    for thread in threads:
        thread.start()
    return threads


def until_not_serving(target: str, stop: threading.Event) -> threading.Thread:
    """What a load balancer does: check health every 50 ms, and stop sending (``stop``) once it is NOT_SERVING."""
    def watch() -> None:
        with grpc.insecure_channel(target) as channel:
            check = channel.unary_unary(f"/{HEALTH}/Check")
            while not stop.is_set():
                answer = HealthCheckResponse.FromString(check(HealthCheckRequest().SerializeToString(), timeout=5))
                if answer.status != HealthCheckResponse.SERVING:
                    stop.set()
                time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def stop_under_load(svc, watch_health: bool) -> tuple[int, list[str]]:
    """16 clients (stopping when health says NOT_SERVING, with ``watch_health``), SIGTERM once 200 calls are
    answered: the exit code, and every call's outcome."""
    stop, outcomes = threading.Event(), []
    threads = grpc_load(svc.grpc, 16, stop, outcomes)
    if watch_health:
        threads.append(until_not_serving(svc.grpc, stop))
    try:
        assert wait_for(lambda: outcomes.count("answered") >= 200, 30)
        svc.process.send_signal(signal.SIGTERM)
        code = svc.process.wait(30)
    finally:
        stop.set()
        for thread in threads:
            thread.join(40)
        svc.stop(signal.SIGKILL)
    return code, outcomes


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_grpc_load_answers_every_call_it_took_and_exits_0(tmp_path, workers):
    """16 clients calling without pause, SIGTERM, each goes on until its connection is refused. Every call a
    handler took is answered, and the client got that answer (the access log's count is the clients' count);
    exit 0. The calls gRPC core cancels at shutdown (CANCELLED: they reached its transport, no handler had them
    yet) are counted, not failed: README, "Open Inference Protocol over gRPC"."""
    svc = start_service(TEST_ARTIFACT, tmp_path / "service.log", WORKERS=workers, ACCESS_LOG="true")
    code, outcomes = stop_under_load(svc, watch_health=False)
    lines = [json.loads(line) for line in svc.log.read_text().splitlines() if line.startswith("{")]
    taken = [line["status"] for line in lines if line.get("method") == INFER]
    assert code == 0, svc.log.read_text()[-2000:]
    assert [o for o in outcomes if o.startswith("lost")] == []
    assert set(taken) == {"OK"} and len(taken) == outcomes.count("answered")
    print(f"workers {workers}: {outcomes.count('answered')} answered, {outcomes.count('refused')} refused at "
          f"connect, {outcomes.count('cancelled')} cancelled by gRPC core at shutdown")


@pytest.mark.slow
def test_sigterm_behind_a_balancer_that_watches_health_loses_nothing(tmp_path):
    """As behind Kubernetes: SIGTERM turns health NOT_SERVING at once, the clients stop sending (the balancer
    watches it), the port closes SCS_DRAIN_SECONDS later (2 s: ample on a busy machine); every call is answered, none
    cancelled, exit 0."""
    svc = start_service(TEST_ARTIFACT, tmp_path / "service.log", WORKERS=2, DRAIN_SECONDS=2)  # >> its 50 ms period
    code, outcomes = stop_under_load(svc, watch_health=True)
    assert code == 0 and set(outcomes) == {"answered"}, (code, set(outcomes))


def test_committed_descriptors_and_the_status_table(tmp_path):
    """The status table covers every ServiceError status the service raises; the descriptor set holds the protocol's
    service with the names tritonclient calls."""
    from service import grpc_messages
    from service.errors import QueueFull, internal_error
    from service.grpc_v2 import CODES, status_of

    assert set(CODES) >= {400, 401, 403, 404, 409, 413, 415, 422, 500, 503, 504}
    assert status_of(QueueFull())[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(internal_error("x"))[0] == grpc.StatusCode.UNKNOWN
    methods = grpc_messages.methods(SERVICE)
    for name, descriptor in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name.items():
        if name in methods:  # the same messages on the wire: every field tritonclient sets has our number
            ours = methods[name][0].DESCRIPTOR
            for field in descriptor.input_type.fields:
                if field.name in ours.fields_by_name:
                    assert ours.fields_by_name[field.name].number == field.number, (name, field.name)
    assert set(methods) == {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
                            "ModelInfer", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"}


@pytest.mark.slow
def test_the_committed_descriptors_are_what_grpcio_tools_makes_of_the_protos(tmp_path):
    made = tmp_path / "descriptors.binpb"
    result = subprocess.run(["make", "-s", "grpc-descriptors", f"GRPC_TOOLS_VENV={tmp_path / 'tools'}",
                             f"GRPC_DESCRIPTORS={made}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert made.read_bytes() == (ROOT / "service" / "protos" / "descriptors.binpb").read_bytes(), \
        "service/protos/*.proto changed: run `make grpc-descriptors` and commit the result"
