"""Rollouts on real servers (service/rollout.py): a candidate in shadow compared with the live version on live
traffic and promoted or refused by its gate, the canary split, manual promote and abort, and bad policies and
parameters answered 4xx. Live traffic runs throughout; every answer must be 200 and come whole from the version it
names (each prediction equal to that version's own answer)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import TEST_ARTIFACT, alone, assert_error, sentences, start_service, wait_for
from service.rollout import Rollout, load_body
from service.errors import ServiceError

SEED_0, SEED_1 = TEST_ARTIFACT.parent / "1", TEST_ARTIFACT.parent / "2"  # `make test-artifact`: two seeds
STRICT = {"shadow": {"share": 1.0}, "gate": {"min_sentences": 200, "min_agreement": 0.99,
                                             "max_abstention_increase": 0.05}}


def place(source: Path, root: Path, version: int) -> None:
    """``source`` as version ``version`` of model ``m`` (the manifest says its folder's version), renamed into place."""
    staging = root / "m" / f".staging-{version}"
    shutil.copytree(source, staging)
    manifest = json.loads((staging / "manifest.json").read_text())
    (staging / "manifest.json").write_text(json.dumps(manifest | {"version": str(version)}))
    staging.rename(root / "m" / str(version))


class Clients:
    """A few closed-loop clients sending 4-sentence requests (half with a min_score) until stopped; every answer kept."""

    def __init__(self, url: str, texts: list[str], clients: int = 4) -> None:
        self.url, self.texts = url, texts
        self.answers: list[tuple[int, int, dict | str]] = []  # (status, first sentence's index, body)
        self.stopping, self.sending = threading.Event(), threading.Event()
        self.sending.set()
        self.threads = [threading.Thread(target=self._send, args=(i,), daemon=True) for i in range(clients)]
        for thread in self.threads:
            thread.start()

    def _send(self, seed: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            n = seed
            while not self.stopping.is_set():
                if not self.sending.wait(0.1):  # paused: at most the request in flight goes on
                    continue
                start = (n * 4) % (len(self.texts) - 4)
                body = {"texts": self.texts[start:start + 4], "top_k": 1} | ({"min_score": 0.3} if n % 2 else {})
                try:
                    response = client.post("/classify", json=body)
                    self.answers.append((response.status_code, start, response.json()))
                except httpx.HTTPError as error:
                    self.answers.append((0, start, repr(error)))
                n += len(self.threads)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)

    def check(self, references: dict[str, np.ndarray], labels: list[str]) -> dict[str, int]:
        """0 failed and 0 mixed answers: each prediction is the named version's own; answers per version."""
        failed = [a for a in self.answers if a[0] != 200]
        assert not failed, failed[:3]
        by_version: dict[str, int] = {}
        for _, start, answer in self.answers:
            truth = references[answer["version"]][start:start + 4]
            assert [p["score"] for p in answer["predictions"]] == pytest.approx(truth.max(axis=1).tolist(), abs=1e-5)
            assert [p["label"] or labels[int(row.argmax())] for p, row in zip(answer["predictions"], truth)] == [
                labels[int(row.argmax())] for row in truth]
            by_version[answer["version"]] = by_version.get(answer["version"], 0) + 1
        return by_version


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return sentences()[:400]


@pytest.fixture(scope="module")
def references(texts) -> dict[str, np.ndarray]:
    """Each sentence alone through each seed's model."""
    return {"seed0": alone(SEED_0, texts), "seed1": alone(SEED_1, texts)}


def report(url: str, version: int) -> dict:
    return httpx.get(f"{url}/v1/models/m/versions/{version}/shadow").json()


def served(url: str) -> list[str]:
    [model] = httpx.get(f"{url}/v1/models").json()["models"]
    return [v["version"] for v in model["versions"]]


@pytest.mark.slow
def test_a_shadow_gate_promotes_the_same_weights_and_refuses_another_seed(tmp_path, texts, references, test_artifact):
    root = tmp_path / "models"
    place(SEED_0, root, 1)
    (root / "m" / "model.json").write_text(json.dumps({"version_policy": "latest:1", "rollout": STRICT}))
    svc = start_service(root, tmp_path / "service.log", ALLOW_REPOSITORY_CONTROL="true")
    labels = json.loads((SEED_0 / "labels.json").read_text())
    clients = Clients(svc.url, texts)
    try:
        # The same weights as version 2: a candidate in shadow, answering no client, promoted once 200 are compared.
        place(SEED_0, root, 2)
        loaded = httpx.post(f"{svc.url}/v2/repository/models/m/load")
        assert loaded.status_code == 200 and loaded.json()["candidates"] == [{"model": "m", "version": 2,
                                                                              "stage": "shadow"}], loaded.text
        assert wait_for(lambda: served(svc.url) == ["2"], 60), report(svc.url, 2)
        same = report(svc.url, 2)
        assert same["verdict"] == "promoted" and same["sentences"]["compared"] >= 200, same
        assert same["agreement"] == 1.0 and same["probability_shift"]["p99"] <= 1e-5, same
        assert same["abstention_rate"]["increase"] == 0 and same["gate"]["failed"] == [], same
        assert svc.metric("scs_rollout_decisions_total", model="m", version="2", decision="promoted") == 1
        assert svc.metric("scs_shadow_sentences_total", model="m", version="2", outcome="compared") >= 200
        assert svc.metric("scs_shadow_agreement", model="m", version="2") == 1.0

        # Another seed as version 3 under min_agreement 0.99: refused, version 2 keeps serving, the route and the
        # log say which criterion failed and by how much.
        place(SEED_1, root, 3)
        clients.sending.clear()  # while paused the candidate cannot reach its verdict (at most 16 sentences copied)
        assert httpx.post(f"{svc.url}/v2/repository/models/m/load").json()["candidates"][0]["version"] == 3
        shadowed = httpx.post(f"{svc.url}/classify", json={"text": texts[0], "version": "3"})
        assert_error(shadowed, 404, "not_found")
        assert "candidate in shadow" in shadowed.json()["error"]["message"]
        clients.sending.set()
        assert wait_for(lambda: report(svc.url, 3)["verdict"] is not None, 60), report(svc.url, 3)
        other = report(svc.url, 3)
        assert other["verdict"] == "refused" and other["agreement"] < 0.99, other
        assert any(f.startswith("min_agreement: ") and "short by" in f for f in other["gate"]["failed"]), other
        assert served(svc.url) == ["2"]
        [model] = httpx.get(f"{svc.url}/v1/models").json()["models"]
        assert model["refused"][0]["version"] == "3" and "min_agreement" in model["refused"][0]["reason"]
        assert "min_agreement" in svc.log.read_text() and "candidate model version not promoted" in svc.log.read_text()

        # The load call's parameter, with a bar below the agreement it measured: evaluated again and promoted.
        lenient = {"shadow": {"share": 1.0}, "gate": {"min_sentences": 200, "min_agreement": other["agreement"] - 0.15,
                                                     "max_abstention_increase": 0.2}}
        again = httpx.post(f"{svc.url}/v2/repository/models/m/load", json={"parameters": {"rollout": lenient}})
        assert again.status_code == 200, again.text
        assert wait_for(lambda: served(svc.url) == ["3"], 60), report(svc.url, 3)
        assert report(svc.url, 3)["verdict"] == "promoted"
    finally:
        clients.stop()
        svc.stop()
    by_version = clients.check({"1": references["seed0"], "2": references["seed0"], "3": references["seed1"]}, labels)
    assert set(by_version) == {"1", "2", "3"}, by_version


@pytest.mark.slow
def test_a_canary_answers_whole_requests_and_promote_and_abort_go_through_the_api(tmp_path, texts, references,
                                                                                   test_artifact):
    root = tmp_path / "models"
    place(SEED_0, root, 1)
    svc = start_service(root, tmp_path / "service.log", ALLOW_REPOSITORY_CONTROL="true")
    labels = json.loads((SEED_0 / "labels.json").read_text())
    load = f"{svc.url}/v2/repository/models/m/load"
    clients = Clients(svc.url, texts)
    try:
        for body, says in (("{not json", "not valid JSON"), ('{"parameters": {"config": "{}"}}', "unknown load "),
                           ('{"parameters": {"rollout": {"canary": {"weight": 1.5}}}}', "canary.weight"),
                           ('{"parameters": {"rollout": {"gate": {"min_sentences": 1, "min_agreement": 1, '
                            '"max_abstention_increase": 0}}}}', "a gate judges a shadow"),
                           ('{"parameters": {"rollout": "{\\"shadow\\": {\\"share\\": 0}}"}}', "shadow.share"),
                           ('[1]', "must be")):
            refused = httpx.post(load, content=body)
            assert refused.status_code == 400 and says in refused.json()["error"], (body, refused.text)
        for action in ("promote", "abort"):
            assert httpx.post(f"{svc.url}/v2/repository/models/m/{action}").status_code == 404
        assert httpx.post(f"{svc.url}/v2/repository/models/nobody/promote").status_code == 404
        assert_error(httpx.get(f"{svc.url}/v1/models/m/versions/1/shadow"), 404, "not_found")
        assert_error(httpx.get(f"{svc.url}/v1/models/m/versions/x/shadow"), 404, "not_found")

        place(SEED_1, root, 2)
        canary = {"parameters": {"rollout": {"canary": {"weight": 0.5}}}}
        assert httpx.post(load, json=canary).json()["candidates"] == [{"model": "m", "version": 2, "stage": "canary"}]
        assert wait_for(lambda: min(report(svc.url, 2)["canary"]["requests"].values()) >= 20, 60)
        assert httpx.post(f"{svc.url}/classify", json={"text": texts[0], "version": "2"}).json()["version"] == "2"
        aborted = httpx.post(f"{svc.url}/v2/repository/models/m/abort")
        assert aborted.status_code == 200 and aborted.json()["retired"][0]["version"] == 2, aborted.text
        assert report(svc.url, 2)["verdict"] == "aborted" and served(svc.url) == ["1"]
        assert svc.metric("scs_canary_requests_total", model="m", version="2") >= 20

        # Shadow first, canary second: the gate passes into a canary, then the manual promote swaps it in.
        both = {"shadow": {"share": 1.0}, "gate": {"min_sentences": 40, "min_agreement": 0.0,
                                                    "max_abstention_increase": 1.0, "max_latency_ratio": 100},
                "canary": {"weight": 0.5}}
        assert httpx.post(load, json={"parameters": {"rollout": json.dumps(both)}}).status_code == 200
        assert wait_for(lambda: report(svc.url, 2)["stage"] == "canary", 60), report(svc.url, 2)
        assert report(svc.url, 2)["model_time"]["latency_ratio"] > 0
        promoted = httpx.post(f"{svc.url}/v2/repository/models/m/promote")
        assert promoted.status_code == 200 and promoted.json()["retired"] == [{"model": "m", "version": 1}]
        assert served(svc.url) == ["2"] and report(svc.url, 2)["verdict"] == "promoted"

        # A model.json whose rollout is wrong: the load call says why (400), the service keeps serving.
        (root / "m" / "model.json").write_text(json.dumps({"rollout": {"shadow": {"share": "all"}}}))
        bad = httpx.post(load)
        assert bad.status_code == 400 and "model.json: rollout: shadow.share" in bad.json()["error"], bad.text
        (root / "m" / "model.json").write_text("{oops")
        assert httpx.post(load).status_code == 400
    finally:
        clients.stop()
        svc.stop()
    by_version = clients.check({"1": references["seed0"], "2": references["seed1"]}, labels)
    assert set(by_version) == {"1", "2"}, by_version


@pytest.mark.parametrize("value, says", [
    ({}, "needs a shadow, a canary or both"), ({"shadow": {"share": 2}}, "shadow.share"),
    ({"shadow": {}, "gate": {"min_agreement": 0.9, "max_abstention_increase": 0}}, "gate.min_sentences"),
    ({"shadow": {}, "surprise": 1}, "surprise"), ({"canary": {"weight": 1}}, "canary.weight"),
    ("{not json", "not valid JSON"), (["shadow"], "rollout"),
    ({"shadow": {}, "gate": {"min_sentences": True, "min_agreement": 0.9, "max_abstention_increase": 0}},
     "gate.min_sentences"),
])
def test_a_bad_rollout_policy_names_its_problem(value, says):
    with pytest.raises(ValueError, match="where: .*" + says.replace(".", r"\.")):
        Rollout.parse(value, "where")


def test_load_bodies():
    assert load_body(b"") is None and load_body(b'{"parameters": {}}') is None
    assert load_body(b'{"parameters": {"rollout": {"canary": {"weight": 0.2}}}}').canary.weight == 0.2
    for body in (b"nope", b'{"parameters": 3}', b'{"params": {}}', b'{"parameters": {"rollout": 5}}'):
        with pytest.raises(ServiceError) as refused:
            load_body(body)
        assert refused.value.status == 400
