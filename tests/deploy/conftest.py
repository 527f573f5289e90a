"""Shared helpers for the deployment tests (tests/deploy).

These tests run the real validators — docker-compose, check-jsonschema, promtool, kubernetes-validate,
hadolint — against the files in compose/, config/services/ and RUNBOOK.md. None needs a Docker engine or the
network. A test whose tool is missing is skipped with a reason naming the tool (CI installs all of them).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
POLICY_DIR = REPO / "config" / "services"
RUNBOOK = REPO / "RUNBOOK.md"

APP_SERVICES = (
    "data-service",
    "regime-detection",
    "meta-controller",
    "training-orchestrator",
    "risk-manager",
    "inference-service",
    "forensics-consumer",
)
GPU_SERVICES = ("meta-controller", "training-orchestrator", "inference-service")


def require_tool(name: str) -> str:
    """The tool's path, or skip the test saying which tool is absent."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (CI installs it; see tests/deploy/conftest.py)")
    return path


def run_tool(*argv: str, cwd: Path = REPO, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a tool; the returned result carries stdout+stderr for assertion messages."""
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    """compose/docker-compose.yml as YAML (anchors and merge keys resolved, ${VAR} left as written)."""
    data = load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="session")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def policies() -> dict[str, dict[str, Any]]:
    return {service: load_yaml(POLICY_DIR / f"{service}.yaml") for service in APP_SERVICES}
