"""compose/kubernetes: valid manifests, native sidecar, probes, GPU limits, the cleanup CronJob."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.deploy import COMPOSE_DIR, POLICY_DIR, load_yaml_all, run_tool
from tests.support.tools import require_tool

K8S_DIR = COMPOSE_DIR / "kubernetes"
MANIFESTS = sorted(K8S_DIR.glob("*.yaml"))


def _objects(kind: str) -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in load_yaml_all(path) if doc["kind"] == kind]


def _deployment(name: str) -> dict[str, Any]:
    (deployment,) = [d for d in _objects("Deployment") if d["metadata"]["name"] == name]
    return deployment


def test_kubernetes_validate_accepts_the_manifests() -> None:
    tool = require_tool("kubernetes-validate")
    # 1.29 is the first release with native sidecars on by default; --strict rejects unknown fields.
    for version in ("1.29.0", None):
        argv = [tool, "--strict", "--quiet", *map(str, MANIFESTS)]
        if version:
            argv[1:1] = ["--kubernetes-version", version]
        result = run_tool(*argv)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["data-service", "inference-service"])
def test_native_sidecar_with_policy_configmap_and_probes(name: str) -> None:
    spec = _deployment(name)["spec"]["template"]["spec"]
    (sidecar,) = spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # native sidecar
    assert sidecar["args"] == ["run", "--config", "/etc/seawall/policy.yaml"]
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/live"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/live"
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    (volume,) = [v for v in spec["volumes"] if v["name"] == "policy"]
    configmap_name = volume["configMap"]["name"]
    (configmap,) = [c for c in _objects("ConfigMap") if c["metadata"]["name"] == configmap_name]
    # The ConfigMap carries the very policy file compose mounts — not a drifting copy.
    assert configmap["data"]["policy.yaml"] == (POLICY_DIR / f"{name}.yaml").read_text(encoding="utf-8")


def test_gpu_deployment_requests_an_nvidia_gpu() -> None:
    spec = _deployment("inference-service")["spec"]["template"]["spec"]
    (app,) = spec["containers"]
    assert app["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "CUDA_VISIBLE_DEVICES", "value": "0"} in app["env"]
    assert app["resources"]["limits"]["memory"] == "2Gi"
    assert app["resources"]["requests"]["memory"] == "1Gi"
    cpu_app = _deployment("data-service")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu_app["resources"]["limits"]


def test_cleanup_cronjob() -> None:
    (cronjob,) = _objects("CronJob")
    spec = cronjob["spec"]
    assert spec["schedule"] == "0 2 * * *"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0
    assert spec["successfulJobsHistoryLimit"] >= 1
    assert spec["failedJobsHistoryLimit"] >= 1
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # Kubernetes does the scheduling; the container runs once.
    assert not any(arg.startswith("--schedule") for arg in container["args"])
    assert "--tracking-uri=http://mlflow:5000" in container["args"]


def test_every_manifest_is_namespaced_to_seawall() -> None:
    for path in MANIFESTS:
        for doc in load_yaml_all(path):
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == "seawall", f"{path.name}: {doc['kind']}"
