"""Confidence you can act on: temperature scaling and thresholds fitted on validation (model_export.calibration),
baked into the exported graph, and abstention in the service (min_score, min_precision, SCS_MIN_SCORE)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import onnx
from onnx import numpy_helper
import pytest

from conftest import SHIPPED, TEST_ARTIFACT, TEXT, assert_error, assert_one_line_error, run_cli
from model_export import calibration

TEXTS = [TEXT, "How do I top up by card?", "my card was stolen", "what is the exchange rate", "refund please"]


def synthetic(n: int = 6000, classes: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from those logits' own softmax: calibrated at temperature 1 by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * 2.5
    probabilities = calibration.softmax(logits)
    targets = np.array([rng.choice(classes, p=row) for row in probabilities])
    return logits, targets


def temperature_in(path) -> float:
    """The divisor of the logits just before the graph's final Softmax."""
    graph = onnx.load(str(path)).graph
    softmax = graph.node[-1]
    div = next(node for node in graph.node if node.op_type == "Div" and softmax.input[0] in node.output)
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    constants |= {node.output[0]: numpy_helper.to_array(node.attribute[0].t) for node in graph.node
                  if node.op_type == "Constant"}
    assert softmax.op_type == "Softmax"
    return float(constants[div.input[1]])


def test_temperature_scaling_recovers_how_overconfident_a_model_is():
    logits, targets = synthetic()
    for factor in (0.5, 3.0):  # under- and overconfident versions of a calibrated model
        temperature = calibration.fit_temperature(logits * factor, targets)
        assert temperature == pytest.approx(factor, rel=0.1)
        before = calibration.ece(calibration.softmax(logits * factor), targets)
        after = calibration.ece(calibration.softmax(logits * factor, temperature), targets)
        assert after < 0.03 < before
        assert calibration.nll(logits * factor, targets, temperature) <= calibration.nll(logits * factor, targets)
        assert (calibration.softmax(logits * factor, temperature).argmax(1) == (logits * factor).argmax(1)).all()


def test_ece_measures_the_gap_between_confidence_and_accuracy():
    targets = np.zeros(100, dtype=int)
    confident = np.tile([0.75, 0.25], (100, 1))
    half_right = np.r_[targets[:75], np.ones(25, dtype=int)]  # 75% right at confidence 0.75: calibrated
    assert calibration.ece(confident, half_right) == pytest.approx(0.0)
    coin = np.r_[targets[:50], np.ones(50, dtype=int)]  # 50% right at confidence 0.75
    assert calibration.ece(confident, coin) == pytest.approx(0.25)


def test_thresholds_take_the_widest_coverage_that_reaches_each_precision():
    # Confidences 0.9 .. 0.5; right, right, wrong, right, wrong: precision 1, 1, 2/3, 3/4, 3/5.
    probabilities = np.array([[c, 1 - c] for c in (0.9, 0.8, 0.7, 0.6, 0.5)])
    targets = np.array([0, 0, 1, 0, 1])
    by_target = {row["precision"]: row for row in calibration.thresholds(probabilities, targets, (0.7, 0.75, 0.99, 1.0))}
    assert by_target[0.75]["min_score"] == 0.6 and by_target[0.75]["coverage"] == 0.8
    assert by_target[0.7]["min_score"] == 0.6  # 3/4 >= 0.7 at 0.6; 3/5 < 0.7 at 0.5
    assert by_target[1.0]["min_score"] == 0.8 and by_target[1.0]["coverage"] == 0.4
    assert by_target[0.99]["min_score"] == 0.8
    assert calibration.at_threshold(probabilities, targets, 0.6) == {"coverage": 0.8, "precision": 0.75}


def test_the_artifact_is_calibrated_on_validation_and_records_it():
    manifest = json.loads((TEST_ARTIFACT / "manifest.json").read_text())
    record = manifest["calibration"]
    assert record["enabled"] and record["fitted_on"] == "validation" and record["temperature"] > 0
    assert record["validation_nll_after"] <= record["validation_nll_before"]
    assert record["argmax_changes"] == 0
    assert {"test_ece_before", "test_ece_after", "validation_ece_before", "validation_ece_after"} <= set(record)
    rows = manifest["selective"]["thresholds"]
    assert [row["precision"] for row in rows] == [0.9, 0.95, 0.99]
    assert all(row["validation_precision"] >= row["precision"] for row in rows if row["min_score"] is not None)
    # logits / T, then the softmax, in the graph: the contract (probabilities out) is unchanged
    assert temperature_in(TEST_ARTIFACT / "model.onnx") == pytest.approx(record["temperature"])
    for picture in ("reliability_diagram.png", "coverage_curve.png"):
        assert (TEST_ARTIFACT / picture).stat().st_size > 10_000, picture


@pytest.mark.slow
def test_calibration_can_be_turned_off(tmp_path):
    out = tmp_path / "m" / "1"
    result = run_cli("model_export", "train", "data/banking77", "--label-column", "category", "--limit", "800",
                     "--epochs", "1", "--embedding-dim", "16", "--hidden-size", "16", "--vocab-size", "300",
                     "--threads", "1", "--no-progress", "--calibrate", "false", "--out", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"] == {"enabled": False} and manifest["training"]["config"]["calibrate"] is False
    assert temperature_in(out / "model.onnx") == 1.0
    assert len(manifest["selective"]["thresholds"]) == 3  # thresholds still come from validation


def classify(service, **body) -> httpx.Response:
    return httpx.post(f"{service.url}/classify", json={"texts": TEXTS} | body, timeout=30)


def test_min_score_abstains_below_it_and_still_lists_the_probabilities(service, metric):
    plain = classify(service).json()["predictions"]
    assert all(p["abstained"] is False and p["label"] for p in plain)
    middle = sorted(p["score"] for p in plain)[2]
    before = metric(service.url, "scs_abstentions_total", model="test-model", version="1")
    answer = classify(service, min_score=middle).json()["predictions"]
    for given, was in zip(answer, plain):
        assert given["abstained"] is (was["score"] < middle)
        assert given["label"] == (None if given["abstained"] else was["label"])
        assert given["score"] == was["score"] and given["probabilities"] == was["probabilities"]
    assert metric(service.url, "scs_abstentions_total", model="test-model", version="1") - before == 2
    assert all(not p["abstained"] for p in classify(service, min_score=0).json()["predictions"])
    assert all(p["abstained"] for p in classify(service, min_score=1).json()["predictions"])


def test_min_precision_uses_the_threshold_chosen_on_validation(service):
    rows = json.loads((TEST_ARTIFACT / "manifest.json").read_text())["selective"]["thresholds"]
    at_95 = next(row["min_score"] for row in rows if row["precision"] == 0.95)
    for asked in (0.95, 0.93):  # 0.93 takes the nearest stored precision above it
        for p in classify(service, min_precision=asked).json()["predictions"]:
            assert p["abstained"] is (p["score"] < at_95)


@pytest.mark.parametrize("body, problem", [
    ({"min_precision": 0.995}, "less_than_equal"),  # above the highest precision the exporter stores
    ({"min_score": 0.5, "min_precision": 0.9}, "min_score_or_min_precision"),
    ({"min_score": 1.5}, "less_than_equal"),
    ({"min_precision": 0}, "greater_than"),
    ({"min_score": "0.5"}, "float_type"),
])
def test_bad_thresholds_are_422_naming_the_problem(service, body, problem):
    assert_error(classify(service, **body), 422, "invalid_request")
    assert problem in {d["type"] for d in classify(service, **body).json()["error"]["details"]}


def test_a_version_without_thresholds_refuses_min_precision_naming_it(service_factory, artifact_copy):
    manifest = json.loads((artifact_copy / "manifest.json").read_text())
    manifest["selective"] = {}  # as an artifact exported before thresholds existed
    (artifact_copy / "manifest.json").write_text(json.dumps(manifest))
    svc = service_factory(artifact_copy)
    refused = assert_error(classify(svc, min_precision=0.9), 422, "invalid_request")
    assert [d["type"] for d in refused["details"]] == ["min_precision_unavailable"]
    assert "has: none" in refused["details"][0]["msg"]
    assert classify(svc, min_score=0.5).status_code == 200


def test_the_default_threshold_comes_from_settings(service_factory, test_artifact):
    svc = service_factory(test_artifact, MIN_SCORE="1")
    assert all(p["abstained"] for p in classify(svc).json()["predictions"])
    assert not any(p["abstained"] for p in classify(svc, min_score=0).json()["predictions"])


def test_v2_abstains_with_an_empty_label(service):
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}],
            "outputs": [{"name": "LABEL"}], "parameters": {"min_score": 1}}
    url = f"{service.url}/v2/models/test-model/infer"
    answer = httpx.post(url, json=body, timeout=30).json()
    assert answer["outputs"][0]["data"] == [""] * len(TEXTS)
    body["parameters"] = {"min_precision": 0.999}
    refused = httpx.post(url, json=body, timeout=30)
    message = refused.json()["error"]
    assert refused.status_code == 400 and "parameters.min_precision" in message and "0.99" in message, message


HELD_OUT = ["Refund_not_showing_up", "beneficiary_not_allowed", "card_payment_fee_charged", "contactless_not_working",
            "exchange_charge"]


def test_the_out_of_scope_threshold_is_the_lowest_that_reaches_the_recall():
    from model_export import openset

    oos = np.array([[c, 1 - c] for c in (0.55, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.999)])
    threshold = openset.choose(oos, 0.8)
    assert threshold == np.nextafter(0.98, np.inf)  # the 8th lowest of 10, just above it
    assert (oos.max(1) < threshold).mean() >= 0.8 and (oos.max(1) < 0.98).mean() < 0.8
    in_scope = np.array([[0.99, 0.01], [0.6, 0.4]])
    assert openset.at(in_scope, np.array([0, 1]), oos, threshold) == {
        "in_scope_accuracy": 0.5, "in_scope_coverage": 0.5, "oos_recall": 0.8}


@pytest.mark.slow
def test_open_set_protocol_holds_classes_out_and_the_service_abstains_by_default(tmp_path, service_factory):
    out = tmp_path / "m" / "1"
    result = run_cli("model_export", "train", "data/banking77", "--label-column", "category", "--limit", "1600",
                     "--epochs", "2", "--embedding-dim", "16", "--hidden-size", "16", "--vocab-size", "400",
                     "--threads", "1", "--no-progress", "--oos-classes", ",".join(HELD_OUT), "--oos-recall", "0.8",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "out of scope: threshold" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["open_set"]
    labels = json.loads((out / "labels.json").read_text())
    assert len(labels) == 72 and not set(HELD_OUT) & set(labels)
    assert record["held_out_classes"] == sorted(HELD_OUT) and record["test_oos_rows"] == 200
    assert record["validation"]["oos_recall"] >= 0.8 and 0 < record["min_score"] < 1
    assert record["test"]["in_scope_accuracy"] <= record["test_without_threshold"]["in_scope_accuracy"]
    assert (out / "open_set_curve.png").stat().st_size > 10_000
    svc = service_factory(out)
    default = classify(svc).json()["predictions"]
    assert [p["abstained"] for p in default] == [p["score"] < record["min_score"] for p in default]
    assert not any(p["abstained"] for p in classify(svc, min_score=0).json()["predictions"])


@pytest.mark.parametrize("args, says", [
    (["--oos-label", "nothing_like_this"], "--oos-label 'nothing_like_this': no training row has this label"),
    (["--oos-classes", "card_arrival,not_a_class"], "--oos-classes: not a label of the training data: not_a_class"),
    (["--oos-classes", "card_arrival", "--oos-recall", "1.5"], "--oos-recall must be between 0 and 1"),
    (["--oos-classes", "card_arrival", "--oos-label", "top_up_failed"], "is already a label of the data"),
])
def test_out_of_scope_options_are_one_line_errors(tmp_path, args, says):
    result = run_cli("model_export", "train", "data/banking77", "--label-column", "category", "--out",
                     str(tmp_path / "m" / "1"), *args)
    assert_one_line_error(result, says)


def shifted_sentences() -> list[str]:
    """Real text from another domain: this project's own README, one sentence-sized line each."""
    lines = [line.strip(" -*#|`>") for line in (TEST_ARTIFACT.parents[2] / "README.md").read_text().splitlines()]
    return [line[:300] for line in lines if len(line) > 20 and line.isascii() and not line.startswith("http")]


def in_distribution(count: int) -> list[str]:
    import csv

    import random

    with open(TEST_ARTIFACT.parents[2] / "data" / "banking77" / "test.csv", newline="") as handle:
        texts = [row["text"] for row in csv.DictReader(handle)]
    return random.Random(0).sample(texts, count)  # the file is sorted by class: a sample, not its first rows


def drift(svc, model: str) -> dict:
    response = httpx.get(f"{svc.url}/v1/models/{model}/drift", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["test-artifact", "shipped"])
def test_drift_stays_quiet_on_test_traffic_and_alerts_on_another_domain(service_factory, test_artifact, which):
    folder, model = (test_artifact, "test-model") if which == "test-artifact" else (SHIPPED, "banking77")
    svc = service_factory(folder)
    assert drift(svc, model)["sentences"] == 0 and not drift(svc, model)["alert"]
    texts = in_distribution(1000)
    for start in range(0, len(texts), 16):
        assert classify(svc, texts=texts[start:start + 16]).status_code == 200
    quiet = drift(svc, model)
    assert quiet["sentences"] == 1000 and quiet["enough"]
    assert not quiet["alert"], {name: s["psi"] for name, s in quiet["signals"].items()}
    gauges = {name: svc.metric("scs_drift_psi", model=model, signal=name) for name in quiet["signals"]}
    assert gauges == pytest.approx({name: s["psi"] for name, s in quiet["signals"].items()}, abs=1e-3)
    shifted, sent = shifted_sentences(), 0
    while not drift(svc, model)["alert"]:
        assert sent < 1000, "a window's worth of another domain's text never alerted"
        assert classify(svc, texts=[shifted[sent % len(shifted)]]).status_code == 200
        sent += 1
    alerted = drift(svc, model)
    print(f"\n{which}: in-distribution PSI " + ", ".join(f"{n} {s['psi']:.3f}" for n, s in quiet["signals"].items())
          + f"; alert after {sent} requests of README text: "
          + ", ".join(f"{n} {s['psi']:.3f}" for n, s in alerted["signals"].items() if s["alert"]))


def test_drift_of_an_unknown_model_is_404(service):
    assert httpx.get(f"{service.url}/v1/models/nobody/drift", timeout=10).status_code == 404


def test_drift_bins_take_any_sentence_and_any_score():
    import contract

    sizes = list(contract.drift_sizes(5).values())
    for ids, score in (([], 0.5), ([3], float("nan")), ([3, 3], float("inf")), ([1], -0.5), ([1] * 200, 1.0)):
        bins = contract.drift_bins(ids, 3, 4, score)
        assert all(0 <= b < size for b, size in zip(bins, sizes)), (ids, score, bins)


def test_a_broken_drift_reference_refuses_the_version_naming_the_field_and_the_gauge_waits_for_data():
    import contract
    from service.drift import DriftMonitor

    manifest = contract.read_manifest(TEST_ARTIFACT)
    for broken, says in (({"rows": 1}, "drift.reference.length is missing"),
                         ({"reference": manifest.drift["reference"] | {"top_score": [0.5] * 3}}, "must hold 10 shares"),
                         ({"reference": manifest.drift["reference"] | {"length": None}}, "not a list of numbers")):
        with pytest.raises(contract.ArtifactError, match=says):
            DriftMonitor(manifest.model_copy(update={"drift": broken}), 1000, 0.25)
    monitor = DriftMonitor(manifest, 1000, 0.25)
    monitor.observe(monitor.bins([[5] * 8], [0], [0.99]))
    assert monitor.psi(0) > 1 and monitor.gauge(0) == 0.0  # one sentence: a huge PSI that means nothing yet
    small = DriftMonitor(manifest, 20, 0.25)
    small.observe(small.bins([[5] * 8] * 20, [0] * 20, [0.99] * 20))
    assert small.enough and small.gauge(0) == small.psi(0)  # a window smaller than 100 counts once it is full


def test_v2_refuses_a_threshold_with_the_classification_extension(service):
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [TEXT]}],
            "outputs": [{"name": "LABEL", "parameters": {"classification": 1}}], "parameters": {"min_score": 0.5}}
    refused = httpx.post(f"{service.url}/v2/models/test-model/infer", json=body, timeout=30)
    assert refused.status_code == 400 and "classification extension" in refused.json()["error"]
