"""The model repository on real servers: several models and versions at once, routing by model and version on
/classify and V2, version policies, a broken model among good ones, versions appearing (poll) and loaded or
unloaded through the API, and swaps under load that fail no request."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import (BROKEN_ARTIFACTS, TEST_ARTIFACT, TEXT, alone, assert_error, assert_one_line_error, run_cli,
                      start_service, wait_for)
from service.settings import VersionPolicy

TEXTS = [TEXT, "How do I top up by card?", "my card was stolen", "what is the exchange rate"]
KEY = "repository-key-0123456789"


def build(root: Path, layout: dict[str, list[int]], policies: dict[str, str] | None = None) -> Path:
    """A repository: model name -> versions, each a copy of the test model's version of that number (1 or 2)."""
    for name, versions in layout.items():
        for version in versions:
            shutil.copytree(TEST_ARTIFACT.parent / str(min(version, 2)), root / name / str(version))
            if version > 2:  # a third "version": the manifest must say so
                manifest = json.loads((root / name / str(version) / "manifest.json").read_text())
                (root / name / str(version) / "manifest.json").write_text(json.dumps(manifest | {"version": str(version)}))
    for name, policy in (policies or {}).items():
        (root / name / "model.json").write_text(json.dumps({"version_policy": policy}))
    return root


def publish(source: Path, target: Path) -> None:
    """As model_export publishes: copied under a hidden name, renamed into place."""
    staging = target.with_name(f".staging-{target.name}")
    shutil.copytree(source, staging)
    staging.rename(target)


def probabilities(answer: dict, labels: list[str]) -> np.ndarray:
    return np.array([[p["probabilities"][label] for label in labels] for p in answer["predictions"]])


def served_versions(url: str, model: str, headers: dict | None = None) -> list[str]:
    models = httpx.get(f"{url}/v1/models", headers=headers or {}).json()["models"]
    return [v["version"] for m in models if m["name"] == model for v in m["versions"]]


@pytest.mark.parametrize("text, available, chosen", [
    ("latest", [1, 2, 10], [10]), ("latest:2", [1, 2, 10], [2, 10]), ("latest:5", [3], [3]),
    ("all", [1, 4], [1, 4]), ("specific:1,4", [1, 2, 4], [1, 4]), ("specific:7", [1], []),
])
def test_version_policies(text, available, chosen):
    assert VersionPolicy.parse(text).select(available) == chosen


@pytest.mark.parametrize("text", ["newest", "latest:0", "specific:", "specific:a", "all:2", ""])
def test_a_bad_version_policy_is_a_one_line_error(text, test_artifact):
    with pytest.raises(ValueError):
        VersionPolicy.parse(text)
    assert_one_line_error(run_cli("service", "--model-dir", str(test_artifact.parent), SCS_VERSION_POLICY=text),
                          "version_policy")


@pytest.mark.slow
def test_two_models_and_two_versions_are_served_and_routed(tmp_path):
    root = build(tmp_path / "models", {"test-model": [1, 2], "other": [1]}, {"test-model": "all"})
    svc = start_service(root, tmp_path / "service.log")
    try:
        listing = httpx.get(f"{svc.url}/v1/models").json()
        assert listing["default"] == "other"  # the first by name
        assert {m["name"]: [v["version"] for v in m["versions"]] for m in listing["models"]} == {
            "test-model": ["1", "2"], "other": ["1"]}
        assert all(v["memory_bytes"] >= 0 and v["provider"] == "CPUExecutionProvider"
                   for m in listing["models"] for v in m["versions"])
        labels = json.loads((TEST_ARTIFACT / "labels.json").read_text())
        for model, version, folder in (("test-model", "1", root / "test-model" / "1"),
                                       ("test-model", "2", root / "test-model" / "2"),
                                       ("test-model", None, root / "test-model" / "2"), ("other", "1", root / "other" / "1"),
                                       (None, None, root / "other" / "1")):
            body = {"texts": TEXTS, "top_k": 77} | ({"model": model} if model else {}) | (
                {"version": version} if version else {})
            answer = httpx.post(f"{svc.url}/classify", json=body).json()
            assert answer["model"] == (model or "other") and answer["version"] == folder.name
            expected = alone(folder, TEXTS)
            assert np.abs(probabilities(answer, labels) - expected).max() <= 1e-5
            v2_path = f"/v2/models/{model or 'other'}" + (f"/versions/{version}" if version else "") + "/infer"
            v2 = httpx.post(f"{svc.url}{v2_path}", json={"inputs": [
                {"name": "TEXT", "datatype": "BYTES", "shape": [4], "data": TEXTS}]}).json()
            assert v2["model_version"] == folder.name
            assert np.abs(np.array(v2["outputs"][0]["data"]).reshape(4, 77) - expected).max() <= 1e-5
        versions = {v: alone(root / "test-model" / v, TEXTS) for v in ("1", "2")}
        assert np.abs(versions["1"] - versions["2"]).max() > 1e-3  # the versions really differ
        assert_error(httpx.post(f"{svc.url}/classify", json={"text": TEXT, "model": "nobody"}), 404, "not_found")
        assert_error(httpx.post(f"{svc.url}/classify", json={"text": TEXT, "model": "other", "version": "2"}), 404)
        assert_error(httpx.post(f"{svc.url}/classify", json={"text": TEXT, "top_k": 78}), 422, "invalid_request")
        metrics = httpx.get(f"{svc.url}/metrics").text
        for model, version in (("test-model", "1"), ("test-model", "2"), ("other", "1")):
            assert f'scs_model_info{{name="{model}",provider="CPUExecutionProvider",version="{version}"}} 1.0' in metrics
        assert 'scs_batch_size_sentences_count{model="test-model",version="1"}' in metrics
    finally:
        svc.stop()


@pytest.mark.slow
def test_a_broken_model_does_not_stop_the_others_unless_it_was_asked_for(tmp_path):
    root = build(tmp_path / "models", {"good": [1], "bad": [1]})
    break_it, says = BROKEN_ARTIFACTS["model.onnx truncated"]
    break_it(root / "bad" / "1")
    svc = start_service(root, tmp_path / "service.log")
    try:
        listing = {m["name"]: m for m in httpx.get(f"{svc.url}/v1/models").json()["models"]}
        assert listing["good"]["versions"] and not listing["bad"]["versions"]
        assert says in listing["bad"]["refused"][0]["reason"]
        assert svc.metric("scs_model_load_failures_total", model="bad", version="1") == 1
        assert httpx.post(f"{svc.url}/classify", json={"text": TEXT}).json()["model"] == "good"
    finally:
        svc.stop()
    assert_one_line_error(run_cli("service", "--model-dir", str(root), SCS_MODELS="good,bad"), says)
    assert_one_line_error(run_cli("service", "--model-dir", str(root), SCS_MODELS="good,absent"),
                          "SCS_MODELS names absent")
    only = start_service(root, tmp_path / "only.log", MODELS="good")
    try:
        assert [m["name"] for m in httpx.get(f"{only.url}/v1/models").json()["models"]] == ["good"]
    finally:
        only.stop()
    shutil.rmtree(root / "good")
    assert_one_line_error(run_cli("service", "--model-dir", str(root)), "no model could be loaded")


@pytest.mark.slow
def test_polling_serves_new_versions_refuses_broken_ones_and_retries_them_once_fixed(tmp_path):
    root = build(tmp_path / "models", {"test-model": [1]})
    svc = start_service(root, tmp_path / "service.log", REPOSITORY_POLL_S=0.2)
    try:
        publish(TEST_ARTIFACT.parent / "2", root / "test-model" / "2")
        assert wait_for(lambda: served_versions(svc.url, "test-model") == ["2"])
        assert httpx.post(f"{svc.url}/classify", json={"text": TEXT}).json()["version"] == "2"
        assert wait_for(lambda: 'version="1"' not in httpx.get(f"{svc.url}/metrics").text)  # v1's series are gone

        broken = tmp_path / "broken"
        build(broken, {"m": [3]})
        BROKEN_ARTIFACTS["tokenizer.json not a tokenizer"][0](broken / "m" / "3")
        publish(broken / "m" / "3", root / "test-model" / "3")
        assert wait_for(lambda: svc.metric("scs_model_load_failures_total", model="test-model", version="3") == 1)
        time.sleep(1)  # several more polls: refused once, not again while its files stay the same
        assert svc.metric("scs_model_load_failures_total", model="test-model", version="3") == 1
        assert served_versions(svc.url, "test-model") == ["2"]
        assert httpx.post(f"{svc.url}/classify", json={"text": TEXT}).json()["version"] == "2"

        shutil.rmtree(root / "test-model" / "3")
        build(broken / "fixed", {"m": [3]})
        publish(broken / "fixed" / "m" / "3", root / "test-model" / "3")
        assert wait_for(lambda: served_versions(svc.url, "test-model") == ["3"])
    finally:
        svc.stop()


@pytest.mark.slow
def test_the_load_api_needs_the_key_or_an_explicit_switch(tmp_path):
    root = build(tmp_path / "models", {"test-model": [1], "other": [1]})
    closed = start_service(root, tmp_path / "closed.log")
    try:
        refused = httpx.post(f"{closed.url}/v2/repository/models/other/unload")
        assert refused.status_code == 403 and "SCS_API_KEY" in refused.json()["error"]
    finally:
        closed.stop()
    svc = start_service(root, tmp_path / "service.log", API_KEY=KEY)
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        assert httpx.post(f"{svc.url}/v2/repository/models/other/unload").status_code == 401
        assert httpx.post(f"{svc.url}/v2/repository/models/nobody/load", headers=auth).status_code == 404
        gone = httpx.post(f"{svc.url}/v2/repository/models/other/unload", headers=auth)
        assert gone.status_code == 200 and gone.json()["retired"] == [{"model": "other", "version": 1}]
        assert httpx.post(f"{svc.url}/classify", headers=auth, json={"text": TEXT, "model": "other"}).status_code == 404
        assert httpx.get(f"{svc.url}/v2/models/other/ready", headers=auth).status_code == 404
        back = httpx.post(f"{svc.url}/v2/repository/models/other/load", headers=auth)
        assert back.status_code == 200 and back.json()["loaded"] == [{"model": "other", "version": 1}]
        assert httpx.post(f"{svc.url}/classify", headers=auth, json={"text": TEXT, "model": "other"}).status_code == 200
    finally:
        svc.stop()
    allowed = start_service(root, tmp_path / "allowed.log", ALLOW_REPOSITORY_CONTROL="true")
    try:
        assert httpx.post(f"{allowed.url}/v2/repository/models/other/load").status_code == 200
    finally:
        allowed.stop()


@pytest.mark.slow
def test_swaps_under_load_fail_no_request(tmp_path):
    """`python -m loadtest.swap`, short: a new version by poll and by the load API, then a broken one, under load."""
    result = run_cli("loadtest.swap", "--old", str(TEST_ARTIFACT.parent / "1"), "--new", str(TEST_ARTIFACT.parent / "2"),
                     "--seconds", "6", "--clients", "16", "--log", str(tmp_path / "service.log"), timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    figures = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    for phase in figures["results"]:
        assert phase["failed"] == 0 and phase["answers_not_matching_their_version"] == 0, phase
        assert set(phase["answers_by_version"]) == {"1", "2"}, phase


def test_a_version_completed_after_a_failed_check_is_loaded_at_the_next_poll(tmp_path, monkeypatch):
    """A non-atomic copy whose last write lands while the check is reading (deterministically: right after the check
    read the half-copied folder and failed) is loaded at the next poll: the folder's state is taken before the
    check reads it, so the finished copy counts as a change. (It used to be taken after: refused for good.)"""
    import asyncio

    from service.metrics import Metrics
    from service.repository import Repository
    from service.settings import Settings

    root = build(tmp_path / "models", {"test-model": [1]})
    repository = Repository(Settings(model_dir=root), Metrics())
    repository.load_at_start()
    target = root / "test-model" / "2"
    shutil.copytree(TEST_ARTIFACT.parent / "2", target)
    complete = (target / "model.onnx").read_bytes()
    (target / "model.onnx").write_bytes(complete[: len(complete) // 2])  # the copy is still under way
    original = Repository.load

    def load_then_the_copy_completes(self, name, version, runtime=None):
        try:
            return original(self, name, version, runtime)
        finally:
            if not target.joinpath("done").exists():
                (target / "model.onnx").write_bytes(complete)
                (target / "done").write_text("the copy's last write landed while the check ran")

    monkeypatch.setattr(Repository, "load", load_then_the_copy_completes)

    async def two_polls() -> tuple[dict, dict]:
        first = await repository.sync()
        second = await repository.sync()
        await repository.close(10)
        return first, second

    first, second = asyncio.run(two_polls())
    assert [r["version"] for r in first["refused"]] == [2] and "model.onnx" in first["refused"][0]["reason"]
    assert second["loaded"] == [{"model": "test-model", "version": 2}] and not second["refused"]


@pytest.mark.slow
def test_refused_versions_are_forgotten_with_their_folder_and_warned_about_once(tmp_path):
    root = build(tmp_path / "models", {"test-model": [1]})
    svc = start_service(root, tmp_path / "service.log", REPOSITORY_POLL_S=0.1)
    try:
        broken = tmp_path / "broken"
        build(broken, {"m": [2]})
        BROKEN_ARTIFACTS["tokenizer.json not a tokenizer"][0](broken / "m" / "2")
        publish(broken / "m" / "2", root / "test-model" / "2")

        def refused() -> list:
            models = httpx.get(f"{svc.url}/v1/models").json()["models"]
            return [r["version"] for m in models for r in m["refused"]]

        assert wait_for(lambda: refused() == ["2"])
        time.sleep(1)  # ten polls
        assert svc.log.read_text().count("no wanted version of test-model loads") == 1
        shutil.rmtree(root / "test-model" / "2")
        assert wait_for(lambda: refused() == [])
        assert served_versions(svc.url, "test-model") == ["1"]
    finally:
        svc.stop()


@pytest.mark.slow
def test_after_the_only_model_is_unloaded_the_404_names_it(tmp_path):
    """A refused model sorts first ("a-broken"); unloading the one served must not make it the default."""
    root = build(tmp_path / "models", {"test-model": [1], "a-broken": [1]})
    BROKEN_ARTIFACTS["model.onnx truncated"][0](root / "a-broken" / "1")
    svc = start_service(root, tmp_path / "service.log", ALLOW_REPOSITORY_CONTROL="true")
    try:
        assert httpx.post(f"{svc.url}/v2/repository/models/test-model/unload").status_code == 200
        missing = httpx.post(f"{svc.url}/classify", json={"text": TEXT})
        assert_error(missing, 404, "not_found")
        assert "'test-model'" in missing.json()["error"]["message"]
        assert httpx.get(f"{svc.url}/v1/models").json()["default"] == "test-model"
    finally:
        svc.stop()


@pytest.mark.slow
def test_load_and_unload_churn_under_traffic_keeps_memory_flat(tmp_path):
    """`python -m loadtest.swap --phases churn`, short: rounds of 10 concurrent unload/load calls under load. It
    used to grow the process round after round (glibc kept what released versions freed) and read 0 for the
    version's memory; now nothing but 200 and 404, memory_bytes at least the model's size, and a flat RSS."""
    result = run_cli("loadtest.swap", "--old", str(TEST_ARTIFACT.parent / "1"), "--new", str(TEST_ARTIFACT.parent / "1"),
                     "--phases", "churn", "--rounds", "12", "--clients", "8", "--log", str(tmp_path / "service.log"),
                     timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    figures = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    [churn] = figures["results"]
    assert churn["failed"] == 0 and churn["rounds"] == 12 and churn["statuses"] == ["200", "404"], churn


@pytest.mark.slow
def test_each_version_reports_the_memory_it_holds_across_reloads(tmp_path):
    """``memory_bytes`` is the heap the version's load allocated and still holds (not RSS growth, which a reload
    into pages a released version freed does not show: it read 0)."""
    root = build(tmp_path / "models", {"test-model": [1]})
    svc = start_service(root, tmp_path / "service.log", ALLOW_REPOSITORY_CONTROL="true")
    try:
        def memory() -> int:
            [model] = httpx.get(f"{svc.url}/v1/models").json()["models"]
            return model["versions"][0]["memory_bytes"]

        onnx_bytes = (root / "test-model" / "1" / "model.onnx").stat().st_size
        sizes = [memory()]
        for _ in range(3):
            assert httpx.post(f"{svc.url}/v2/repository/models/test-model/unload").status_code == 200
            assert httpx.post(f"{svc.url}/v2/repository/models/test-model/load").status_code == 200
            sizes.append(memory())
        assert all(size >= onnx_bytes for size in sizes), (sizes, onnx_bytes)
        assert svc.metric("scs_model_memory_bytes", model="test-model", version="1") == sizes[-1]
    finally:
        svc.stop()
