"""Shared helpers for the deployment tests (tests/deploy): where the files are, running the real validators.

These tests run the real validators — docker-compose, check-jsonschema, promtool, kubernetes-validate,
hadolint — against the files in compose/, config/services/ and RUNBOOK.md. None needs a Docker engine or the
network. A test whose tool is missing is skipped with a reason naming the tool — and fails on CI, which installs
all of them (``tests.support.tools.require_tool``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

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


def run_tool(*argv: str, cwd: Path = REPO, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a tool; the returned result carries stdout+stderr for assertion messages."""
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
