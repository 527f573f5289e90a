"""compose/docker-compose.yml: valid for docker-compose and the compose spec, and the original design's
resource table, GPU reservations, sidecars, restarts, healthchecks and tuning exactly."""

from __future__ import annotations

import os
import re
import subprocess
from typing import Any

import pytest

from tests.support.deploy import (
    APP_SERVICES,
    COMPOSE_DIR,
    COMPOSE_FILE,
    GPU_SERVICES,
    POLICY_DIR,
    REPO,
    run_tool,
)
from tests.support.tools import require_tool

# service: (CPU limit, memory limit, memory reserved) — the original design's table, verbatim.
RESOURCE_TABLE = {
    "timescaledb": ("2.0", "2G", "1G"),
    "mlflow": ("1.0", "1G", "512M"),
    "redis": ("1.0", "2G", "512M"),
    "kafka": ("1.0", "1.5G", "1G"),
    "zookeeper": ("0.5", "768M", "512M"),
    "prometheus": ("1.0", "1G", "512M"),
    "grafana": ("0.5", "512M", "256M"),
    "data-service": ("1.0", "1G", "512M"),
    "regime-detection": ("1.0", "1G", "512M"),
    "meta-controller": ("2.0", "8G", "4G"),
    "training-orchestrator": ("4.0", "8G", "4G"),
    "risk-manager": ("1.0", "1G", "512M"),
    "inference-service": ("2.0", "2G", "1G"),
    "forensics-consumer": ("1.0", "1G", "512M"),
}

# Each app's dependencies on loopback, by the port plan every policy shares.
PORT_PLAN = {
    "timescaledb": 15432,
    "redis": 16379,
    "kafka": 19092,
    "mlflow": 15000,
    "data-service": 15001,
    "regime-detection": 15002,
    "meta-controller": 15003,
    "training-orchestrator": 15004,
    "risk-manager": 15005,
    "inference-service": 15006,
    "forensics-consumer": 15007,
}


def _clean_env() -> dict[str, str]:
    """The environment minus anything compose could interpolate: the file must work with its defaults alone
    (no .env, nothing exported)."""
    keep = ("PATH", "HOME")
    return {k: v for k, v in os.environ.items() if not re.fullmatch(r"[A-Z0-9_]+", k) or k in keep}


def test_docker_compose_config_accepts_the_file() -> None:
    tool = require_tool("docker-compose")
    argv = [tool, "-f", str(COMPOSE_FILE), "--project-directory", str(COMPOSE_DIR), "config", "-q"]
    result = subprocess.run(argv, cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    # Unset variables without a default would be warned about (and become empty strings).
    assert "variable is not set" not in result.stderr, result.stderr


def test_compose_spec_schema_accepts_the_file() -> None:
    tool = require_tool("check-jsonschema")
    result = run_tool(tool, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_resource_table_exactly(services: dict[str, Any]) -> None:
    for name, (cpus, memory, reserved) in RESOURCE_TABLE.items():
        resources = services[name]["deploy"]["resources"]
        assert str(resources["limits"]["cpus"]) == cpus, name
        assert str(resources["limits"]["memory"]) == memory, name
        assert str(resources["reservations"]["memory"]) == reserved, name


def test_every_service_has_limits(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        resources = svc["deploy"]["resources"]
        assert resources["limits"]["cpus"] and resources["limits"]["memory"], name
        assert resources["reservations"]["memory"], name


def test_gpu_services_reserve_one_nvidia_device_and_set_cuda_devices(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        devices = svc["deploy"]["resources"].get("reservations", {}).get("devices")
        if name in GPU_SERVICES:
            assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], name
            assert str(svc["environment"]["CUDA_VISIBLE_DEVICES"]) == "0", name
        else:
            assert devices is None, f"{name} must not reserve a GPU"


def test_a_sidecar_beside_every_app_service(services: dict[str, Any]) -> None:
    for app in APP_SERVICES:
        sidecar = services[f"{app}-sidecar"]
        assert sidecar["network_mode"] == f"service:{app}"
        assert sidecar["command"] == ["run", "--config", "/etc/seawall/policy.yaml"]
        assert sidecar["volumes"] == [f"../config/services/{app}.yaml:/etc/seawall/policy.yaml:ro"]
        assert (POLICY_DIR / f"{app}.yaml").is_file()
        assert sidecar["build"] == {"context": "..", "dockerfile": "compose/sidecar.Dockerfile"}
        test = " ".join(sidecar["healthcheck"]["test"])
        assert "http://127.0.0.1:9901/health" in test
        # Its own small limits, far below the app's.
        assert sidecar["deploy"]["resources"]["limits"] == {"cpus": "0.25", "memory": "128M"}
        # A sidecar cannot publish ports (it has no network of its own); its app publishes the admin port
        # on the host's loopback only.
        assert "ports" not in sidecar
        assert [p for p in services[app]["ports"] if p.endswith(":9901")], app
        assert all(p.startswith("127.0.0.1:") for p in services[app]["ports"]), app


def test_restart_healthcheck_and_stop_grace_period_everywhere(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        assert svc["restart"] == "on-failure:3", name
        assert re.fullmatch(r"\d+s", svc["stop_grace_period"]), name
        check = svc["healthcheck"]
        assert check["test"], name
        for key in ("interval", "timeout", "retries", "start_period"):
            assert key in check, f"{name}: healthcheck.{key}"


def test_dependencies_wait_for_healthy(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        for dep, spec in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if name == f"{dep}-sidecar":
                # The one exception, on purpose: a sidecar needs its app's namespace, and the app's health
                # needs the sidecar — waiting for "healthy" here would deadlock.
                assert spec == {"condition": "service_started"}, name
            else:
                assert spec == {"condition": "service_healthy"}, f"{name} → {dep}"
    for app in APP_SERVICES:
        assert services[app].get("depends_on"), f"{app} starts after its dependencies"


def test_apps_reach_dependencies_through_loopback_only(services: dict[str, Any], policies: dict[str, Any]) -> None:
    for app in APP_SERVICES:
        env = services[app]["environment"]
        for key, value in env.items():
            if key.endswith(("_URL", "_URI", "_SERVERS")):
                assert "127.0.0.1:" in str(value), f"{app}: {key}={value} bypasses the sidecar"
        # Every dependency the app depends_on (other than its own infrastructure-free start) has a listener
        # in its policy on the shared port plan.
        upstreams = policies[app]["upstreams"]
        for dep in services[app]["depends_on"]:
            assert dep in upstreams, f"{app} depends on {dep} but its policy has no upstream for it"
        for upstream, spec in upstreams.items():
            assert spec["listen"] == f"127.0.0.1:{PORT_PLAN[upstream]}", f"{app}/{upstream}"


def test_original_tuning_is_in_place(services: dict[str, Any]) -> None:
    pg = " ".join(services["timescaledb"]["command"])
    for setting in (
        "shared_preload_libraries=timescaledb",
        "max_connections=200",
        "shared_buffers=512MB",
        "effective_cache_size=1536MB",
    ):
        assert setting in pg
    kafka = services["kafka"]["environment"]
    assert kafka["KAFKA_HEAP_OPTS"] == "-Xmx1G -Xms1G"
    assert "-XX:+UseG1GC" in kafka["KAFKA_JVM_PERFORMANCE_OPTS"]
    assert "-XX:MaxGCPauseMillis=20" in kafka["KAFKA_JVM_PERFORMANCE_OPTS"]
    redis = services["redis"]["command"]
    assert redis[redis.index("--maxmemory") + 1] == "${REDIS_MAXMEMORY:-2gb}"
    assert redis[redis.index("--maxmemory-policy") + 1] == "allkeys-lru"
    saves = [redis[i + 1] for i, arg in enumerate(redis) if arg == "--save"]
    assert saves == ["900 1", "300 10", "60 10000"]
    prom = services["prometheus"]["command"]
    assert "--storage.tsdb.retention.time=30d" in prom
    assert "--storage.tsdb.retention.size=10GB" in prom


def test_cleanup_container(services: dict[str, Any]) -> None:
    cleanup = services["checkpoint-cleanup"]
    args = cleanup["command"]
    assert "--schedule=0 2 * * *" in args
    assert "--tracking-uri=http://mlflow:5000" in args
    assert "--archive-path=/archive" in args
    assert "--metrics-port=9102" in args
    assert "checkpoint-archive:/archive" in cleanup["volumes"]
    assert cleanup["depends_on"] == {"mlflow": {"condition": "service_healthy"}}
    assert cleanup["build"] == {"context": "..", "dockerfile": "compose/cleanup.Dockerfile"}


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_images_are_parameters(services: dict[str, Any], service: str) -> None:
    variable = service.upper().replace("-", "_") + "_IMAGE"
    assert services[service]["image"].startswith("${" + variable + ":-"), services[service]["image"]


def test_infrastructure_images_are_pinned(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        image = svc["image"]
        tag = image.rsplit(":", 1)[-1].rstrip("}")
        assert tag not in ("latest", "") and re.search(r"\d", tag), f"{name}: {image} is not pinned"
