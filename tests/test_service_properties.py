"""No input reaches a 5xx: property-based tests (hypothesis) over every route's path, query and body parameters, with
arbitrary Unicode, huge numbers and deep nesting, against a real service on 127.0.0.1; and the inputs that once did.

A schema-driven fuzzer (tests/test_service_fuzz.py) generates what the OpenAPI document describes; these generate
what it does not: Unicode digits as versions, integers past any bound, JSON nested as deep as the parser allows.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ServiceProcess, start_service

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
MODEL = "test-model"


@pytest.fixture(scope="module")
def svc(test_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """Two models (one to load and unload as the tests like), repository control on, small text limits."""
    root = tmp_path_factory.mktemp("properties")
    for name in (MODEL, "spare"):
        shutil.copytree(test_artifact, root / "models" / name / "1")
    service = start_service(root / "models", root / "service.log", ALLOW_REPOSITORY_CONTROL="true",
                            DEFAULT_MODEL=MODEL, MAX_TEXT_CHARS=200, MAX_TEXTS=8)
    yield service
    service.stop()
    log = (root / "service.log").read_text()
    assert "Traceback" not in log and '"level":"error"' not in log, log[-3000:]


def ok(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.request.method, response.request.url, response.status_code,
                                        response.text[:500])


def nested(depth: int, leaf: str = '"card"') -> str:
    return "[" * depth + leaf + "]" * depth


# Values a JSON field may take: anything, including what no schema admits.
scalars = (st.none() | st.booleans() | st.integers(min_value=-(10**40), max_value=10**40)
           | st.floats(allow_nan=False) | st.text(max_size=40))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                                          inner, max_size=4),
                      max_leaves=12)
versions = (st.text(max_size=12) | st.sampled_from(["1", "²", "١", "01", "-1", "1.0", " 1", "1\n", "9" * 10_000])
            | st.integers(min_value=0, max_value=10**30).map(str))
names = st.text(max_size=20) | st.sampled_from([MODEL, "spare", "..", "%2e%2e", "a/b", "\x00"])


def segment(value: str) -> str:
    return quote(value, safe="")


@SETTINGS
@given(model=names, version=versions, suffix=st.sampled_from(["", "/ready", "/infer"]))
def test_v2_model_routes_never_5xx(svc, model, version, suffix):
    with httpx.Client(base_url=svc.url, timeout=30) as client:
        for path in (f"/v2/models/{segment(model)}{suffix}",
                     f"/v2/models/{segment(model)}/versions/{segment(version)}{suffix}",
                     f"/v2/models/{MODEL}/versions/{segment(version)}{suffix}"):
            if suffix == "/infer":
                ok(client.post(path, json={"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1],
                                                       "data": ["card"]}]}))
            else:
                ok(client.get(path))


@SETTINGS
@given(model=names, version=versions)
def test_drift_and_repository_routes_never_5xx(svc, model, version):
    with httpx.Client(base_url=svc.url, timeout=30) as client:
        ok(client.get(f"/v1/models/{segment(model)}/drift", params={"version": version}))
        ok(client.get(f"/v1/models/{MODEL}/drift", params={"version": version}))
        ok(client.post(f"/v2/repository/models/{segment(model)}/unload"))
        ok(client.post(f"/v2/repository/models/{segment(model)}/load"))
        ok(client.post("/v2/repository/models/spare/load"))  # whatever was unloaded comes back


@SETTINGS
@given(body=st.dictionaries(st.sampled_from(["text", "texts", "top_k", "model", "version", "min_score",
                                             "min_precision", "other"]), values, max_size=5))
def test_classify_bodies_never_5xx(svc, body):
    ok(httpx.post(f"{svc.url}/classify", content=json.dumps(body), timeout=30))


@SETTINGS
@given(tensor=st.fixed_dictionaries({"name": st.sampled_from(["TEXT"]) | values,
                                     "datatype": st.sampled_from(["BYTES"]) | values,
                                     "shape": st.lists(st.integers(min_value=-2, max_value=10**20), max_size=3)
                                     | values,
                                     "data": values, "parameters": values}),
       request=st.dictionaries(st.sampled_from(["id", "parameters", "outputs"]), values, max_size=3),
       version=versions)
def test_v2_infer_bodies_never_5xx(svc, tensor, request, version):
    body = json.dumps(request | {"inputs": [tensor]})
    ok(httpx.post(f"{svc.url}/v2/models/{MODEL}/infer", content=body, timeout=30))
    ok(httpx.post(f"{svc.url}/v2/models/{MODEL}/versions/{segment(version)}/infer", content=body, timeout=30))


@SETTINGS
@given(header=st.text(max_size=30) | st.integers(min_value=0, max_value=10**40).map(str),
       raw=st.binary(max_size=300))
def test_v2_binary_headers_and_raw_bodies_never_5xx(svc, header, raw):
    try:
        headers = {"Inference-Header-Content-Length": header}
        httpx.Headers(headers)
    except (UnicodeEncodeError, ValueError):
        headers = {}
    ok(httpx.post(f"{svc.url}/v2/models/{MODEL}/infer", content=raw, headers=headers, timeout=30))
    ok(httpx.post(f"{svc.url}/classify", content=raw, timeout=30))


@pytest.mark.parametrize("version", ["²", "١", "9" * 10_000, "1" * 19])
def test_unicode_and_huge_versions_are_404(svc, version):
    """Once 500s (``str.isdigit`` is true for "²", ``int`` refuses it; 10,000 digits pass int's limit), and "١"
    (an Arabic-Indic one) was served as version 1: a version is ASCII digits, within int64."""
    urls = [("POST", "/classify", {"text": "card", "version": version}),
            ("POST", f"/v2/models/{MODEL}/versions/{segment(version)}/infer",
             {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["card"]}]}),
            ("GET", f"/v2/models/{MODEL}/versions/{segment(version)}", None),
            ("GET", f"/v2/models/{MODEL}/versions/{segment(version)}/ready", None),
            ("GET", f"/v1/models/{MODEL}/drift?version={segment(version)}", None)]
    for method, path, body in urls:
        response = httpx.request(method, f"{svc.url}{path}", json=body, timeout=30)
        assert response.status_code == 404, (path, response.status_code, response.text[:300])


@pytest.mark.parametrize("depth", [2, 3, 985, 1000, 1023, 1100])
def test_deeply_nested_data_is_400(svc, depth):
    """V2 JSON ``data`` nested 985-1023 levels once reached a RecursionError; orjson refuses from about 1,024."""
    body = '{"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": %s}]}' % nested(depth)
    response = httpx.post(f"{svc.url}/v2/models/{MODEL}/infer", content=body, timeout=30)
    assert response.status_code == 400 and "error" in response.json(), response.text[:300]
    body = '{"texts": %s}' % nested(depth)
    assert httpx.post(f"{svc.url}/classify", content=body, timeout=30).status_code in (400, 422)


@pytest.mark.parametrize("text", ["\u200b", "\ufeff", " \u200b\u200c\u200d\u2060 ", "\ufeff\n"])
def test_invisible_only_text_is_empty_text(svc, text):
    """Zero-width characters and the byte-order mark alone are nothing to classify (they were, as [UNK])."""
    response = httpx.post(f"{svc.url}/classify", json={"text": text}, timeout=30)
    assert response.status_code == 422 and response.json()["error"]["details"][0]["type"] == "empty_text"
    v2 = httpx.post(f"{svc.url}/v2/models/{MODEL}/infer", timeout=30, json={
        "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [text]}]})
    assert v2.status_code == 400 and "empty" in v2.json()["error"]


def test_classification_0_is_refused_as_its_message_says(svc):
    response = httpx.post(f"{svc.url}/v2/models/{MODEL}/infer", timeout=30, json={
        "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["card"]}],
        "outputs": [{"name": "PROBABILITIES", "parameters": {"classification": 0}}]})
    assert response.status_code == 400 and "from 1 to" in response.json()["error"]
