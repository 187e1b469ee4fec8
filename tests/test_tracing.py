"""OpenTelemetry traces from a real service process to a real OTLP/HTTP receiver on 127.0.0.1, decoded with
opentelemetry-proto: the span tree of requests that share a batch, the caller's traceparent, sampling, exemplars,
and that a dead collector costs requests nothing (they all answer; spans are counted as failed or dropped)."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from conftest import free_port, sentences
from loadtest.otlp_receiver import Receiver

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def receiver():
    receiver = Receiver().start()
    yield receiver
    receiver.stop()


def wait_for(receiver: Receiver, done, timeout: float = 20.0) -> list[Span]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spans = receiver.received()
        if done(spans):
            return spans
        time.sleep(0.1)
    raise AssertionError(f"the receiver did not get the spans in {timeout}s: {[s.name for s in receiver.received()]}")


def attributes(span: Span) -> dict:
    values = {}
    for attribute in span.attributes:
        value = attribute.value
        values[attribute.key] = getattr(value, value.WhichOneof("value"))
    return values


def traceparent(number: int) -> tuple[str, str]:
    """A sampled W3C traceparent with its parent span id."""
    parent = f"{number + 1:016x}"
    return f"00-{TRACE_ID[:-4]}{number:04x}-{parent}-01", parent


async def concurrent(url: str, bodies: list[dict], headers: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await asyncio.gather(*(client.post("/classify", json=b, headers=h) for b, h in zip(bodies, headers)))


def test_requests_that_share_a_batch_link_the_same_model_run_span(test_artifact: Path, service_factory, receiver):
    """8 concurrent requests (one of 3 sentences) fill one batch: each request span is the child of its
    traceparent, has one queue-wait child per sentence, and links the one model-run span, which links them all."""
    service = service_factory(test_artifact, OTEL_ENDPOINT=receiver.url, OTEL_SAMPLE_RATIO=0,
                              MAX_BATCH_SIZE=10, MAX_WAIT_MS=2000, MAX_PADDING_RATIO=50)
    texts = sentences()
    bodies = [{"text": texts[i]} for i in range(7)] + [{"texts": texts[7:10]}]
    parents = [traceparent(i) for i in range(8)]
    answers = asyncio.run(concurrent(service.url, bodies, [{"traceparent": t} for t, _ in parents]))
    assert [a.status_code for a in answers] == [200] * 8

    def complete(spans: list[Span]) -> bool:
        return sum(s.name == "POST /classify" for s in spans) == 8 and sum(s.name == "queue wait" for s in spans) == 10
    spans = wait_for(receiver, complete)
    requests = {s.span_id: s for s in spans if s.name == "POST /classify"}
    runs = [s for s in spans if s.name == "model run"]
    assert len(runs) == 1, [attributes(r) for r in runs]
    run = runs[0]
    assert attributes(run)["scs.batch.size"] == 10 and attributes(run)["scs.batch.requests"] == 8
    assert attributes(run)["scs.batch.padded_tokens"] >= attributes(run)["scs.batch.real_tokens"] > 0
    assert attributes(run)["scs.provider"] == "CPUExecutionProvider"
    assert {link.span_id for link in run.links} == set(requests)
    for (header, parent), body in zip(parents, bodies):
        trace_id = bytes.fromhex(header.split("-")[1])
        [request] = [s for s in requests.values() if s.trace_id == trace_id]
        assert request.parent_span_id == bytes.fromhex(parent) and request.kind == Span.SPAN_KIND_SERVER
        values = attributes(request)
        assert values["http.response.status_code"] == 200 and values["scs.model"] == "test-model"
        assert values["scs.sentences"] == len(body.get("texts", [None]))
        assert [(link.trace_id, link.span_id) for link in request.links] == [(run.trace_id, run.span_id)]
        waits = [s for s in spans if s.name == "queue wait" and s.parent_span_id == request.span_id]
        assert sorted(attributes(w)["scs.sentence.index"] for w in waits) == list(range(values["scs.sentences"]))
        for wait in waits:
            assert wait.trace_id == trace_id
            assert request.start_time_unix_nano <= wait.start_time_unix_nano <= wait.end_time_unix_nano
            assert wait.end_time_unix_nano == run.start_time_unix_nano <= run.end_time_unix_nano
            assert run.end_time_unix_nano <= request.end_time_unix_nano


def test_sampling_ratio_and_probes(test_artifact: Path, service_factory, receiver):
    """Ratio 0 traces nothing the caller did not ask for; ratio 1 traces every request; probes and scrapes are
    never traced; a refused request's span carries its status."""
    quiet = service_factory(test_artifact, OTEL_ENDPOINT=receiver.url, OTEL_SAMPLE_RATIO=0)
    for _ in range(5):
        assert httpx.post(f"{quiet.url}/classify", json={"text": "hello"}).status_code == 200
    assert quiet.stop() == 0  # shutdown exports what is queued
    assert receiver.received() == []

    loud = service_factory(test_artifact, OTEL_ENDPOINT=receiver.url)
    for _ in range(5):
        assert httpx.post(f"{loud.url}/classify", json={"text": "hello"}).status_code == 200
    httpx.get(f"{loud.url}/healthz"), httpx.get(f"{loud.url}/metrics")
    assert httpx.post(f"{loud.url}/classify", json={"text": ""}).status_code == 422
    v2 = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2], "data": ["lost card", "top up"]}]}
    assert httpx.post(f"{loud.url}/v2/models/test-model/infer", json=v2).status_code == 200
    infer = "POST /v2/models/{model}/infer"
    spans = wait_for(receiver, lambda spans: sum(s.name == "POST /classify" for s in spans) == 6
                     and any(s.name == infer for s in spans))
    assert not [s for s in spans if s.name.startswith("GET")]
    statuses = sorted(attributes(s)["http.response.status_code"] for s in spans if s.name == "POST /classify")
    assert statuses == [200] * 5 + [422]
    [v2_span] = [s for s in spans if s.name == infer]
    assert attributes(v2_span)["scs.sentences"] == 2 and attributes(v2_span)["scs.model"] == "test-model"
    assert sum(s.name == "queue wait" and s.parent_span_id == v2_span.span_id for s in spans) == 2
    assert loud.metric("scs_trace_spans_total", outcome="dropped") == 0


def test_a_grpc_call_is_a_server_span_child_of_its_traceparent_metadata(test_artifact: Path, service_factory, receiver):
    import grpc
    import numpy as np
    import tritonclient.grpc as triton

    service = service_factory(test_artifact, OTEL_ENDPOINT=receiver.url, OTEL_SAMPLE_RATIO=0)
    header, parent = traceparent(41)
    text = triton.InferInput("TEXT", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"lost card", b"top up"], dtype=np.object_))
    with triton.InferenceServerClient(service.grpc) as client:
        client.infer("test-model", [text], headers={"traceparent": header})
        client.infer("test-model", [text])  # ratio 0 and no traceparent: not traced
        client.is_server_ready(headers={"traceparent": header})  # a probe: never traced
    name = "inference.GRPCInferenceService/ModelInfer"
    spans = wait_for(receiver, lambda spans: any(s.name == name for s in spans)
                     and sum(s.name == "queue wait" for s in spans) == 2)
    [call] = [s for s in spans if s.name.startswith("inference.")]
    assert call.trace_id == bytes.fromhex(header.split("-")[1]) and call.parent_span_id == bytes.fromhex(parent)
    values = attributes(call)
    assert (values["rpc.system"], values["rpc.method"], values["rpc.grpc.status_code"]) == ("grpc", "ModelInfer",
                                                                                           grpc.StatusCode.OK.value[0])
    assert values["scs.sentences"] == 2 and call.kind == Span.SPAN_KIND_SERVER
    assert sum(s.name == "queue wait" and s.parent_span_id == call.span_id for s in spans) == 2


def test_latency_exemplars_carry_the_trace_id(test_artifact: Path, service_factory, receiver):
    service = service_factory(test_artifact, OTEL_ENDPOINT=receiver.url)
    header, _ = traceparent(77)
    assert httpx.post(f"{service.url}/classify", json={"text": "my card"}, headers={"traceparent": header}).is_success
    plain = httpx.get(f"{service.url}/metrics")
    assert "# {" not in plain.text  # the Prometheus text format has no exemplars
    scrape = httpx.get(f"{service.url}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert scrape.headers["content-type"].startswith("application/openmetrics-text")
    assert scrape.text.rstrip().endswith("# EOF")
    found = re.findall(r'^scs_request_duration_seconds_bucket\{(?=[^}]*protocol="http")[^}]*endpoint="/classify".*'
                       r'# \{trace_id="([0-9a-f]{32})"\}',
                       scrape.text, re.MULTILINE)
    assert found == [header.split("-")[1]]


def test_a_dead_collector_costs_requests_nothing(test_artifact: Path, service_factory):
    """Pointed at a closed port with a tiny export queue: every request answers 200; the spans that could not go
    are counted as failed, and while the queue is full or the collector failing requests are not traced at all
    (counted as skipped), so they do not pay for spans that cannot go."""
    service = service_factory(test_artifact, OTEL_ENDPOINT=f"http://127.0.0.1:{free_port()}", OTEL_QUEUE_SIZE=16,
                              OTEL_EXPORT_TIMEOUT_S=1)
    with httpx.Client(base_url=service.url, timeout=30) as client:
        statuses = [client.post("/classify", json={"text": f"sentence {i}"}).status_code for i in range(300)]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and service.metric("scs_trace_spans_total", outcome="failed") == 0:
            time.sleep(0.2)
        statuses += [client.post("/classify", json={"text": f"sentence {i}"}).status_code for i in range(100)]
    assert statuses == [200] * 400
    assert service.metric("scs_trace_spans_total", outcome="failed") >= 16  # the first full queue, tried and lost
    assert service.metric("scs_trace_spans_total", outcome="exported") == 0
    skipped = service.metric("scs_traces_skipped_total")
    assert skipped >= 300  # a 16-span queue holds at most 8 requests; the rest were never traced
    assert service.stop() == 0


def test_tracing_settings_refuse_bad_values(test_artifact: Path, tmp_path: Path):
    from conftest import assert_one_line_error, run_cli

    result = run_cli("service", "--model-dir", str(test_artifact), SCS_OTEL_ENDPOINT="collector:4318")
    assert_one_line_error(result, "otel_endpoint", code=2)
    result = run_cli("service", "--model-dir", str(test_artifact), SCS_OTEL_SAMPLE_RATIO="1.5")
    assert_one_line_error(result, "otel_sample_ratio", code=2)


def test_tracing_off_loads_no_sdk(test_artifact: Path):
    """Off (no endpoint anywhere), the service never imports the OpenTelemetry SDK or exporter: nothing of tracing
    is on the hot path. (FastAPI imports the OpenTelemetry API itself; with no provider set it records nothing.)"""
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys; from service.app import create_app; from service.settings import Settings; "
            f"create_app(Settings(model_dir={str(test_artifact)!r})); "
            "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter', "
            "'service.tracing'))))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and not k.startswith("SCS_")}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_where_traces_go(monkeypatch):
    from pydantic import ValidationError

    from service.settings import Settings

    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED",
                 "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "SCS_OTEL_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert Settings().traces_endpoint() is None
    assert Settings(otel_endpoint="http://c:4318/").traces_endpoint() == "http://c:4318/v1/traces"
    assert Settings(otel_endpoint="http://c:4318/v1/traces").traces_endpoint() == "http://c:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector.example:4318")
    assert Settings().traces_endpoint() == "https://collector.example:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://other:4318/custom/path")
    assert Settings().traces_endpoint() == "http://other:4318/custom/path"  # the full URL, as the standard says
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert Settings().traces_endpoint() is None
    assert Settings(otel_endpoint="http://c:4318").traces_endpoint() == "http://c:4318/v1/traces"  # ours wins
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ValidationError, match="http/protobuf only"):
        Settings()
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "collector:4318")
    with pytest.raises(ValidationError, match="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT='collector:4318' is not an http"):
        Settings()


def test_the_callers_sampled_flag_decides(test_artifact: Path, service_factory, receiver):
    """At ratio 1 a caller's unsampled traceparent is not traced; at ratio 0 a sampled one is; a malformed one
    starts a new trace (traced at ratio 1)."""
    service = service_factory(test_artifact, OTEL_ENDPOINT=receiver.url)
    unsampled = f"00-{TRACE_ID}-00f067aa0ba902b7-00"
    malformed = "00-zz-nothex-01"
    for header in (unsampled, malformed):
        assert httpx.post(f"{service.url}/classify", json={"text": "card"}, headers={"traceparent": header}).is_success
    spans = wait_for(receiver, lambda spans: any(s.name == "POST /classify" for s in spans))
    time.sleep(1.5)  # an export round more: nothing else may come
    requests = [s for s in receiver.received() if s.name == "POST /classify"]
    assert len(requests) == 1 and requests[0].trace_id != bytes.fromhex(TRACE_ID)
    assert requests[0].parent_span_id == b""
