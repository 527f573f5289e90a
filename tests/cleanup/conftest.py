"""A real ``mlflow server`` (SQLite backend, local artifact root served through ``--serve-artifacts``) for
the whole session, plus helpers that build experiments on it and fingerprint artifact files on disk."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from tests.support.mlflow_server import start_mlflow_server, stop_mlflow_server
from tests.support.sidecar import free_port

STARTUP_TIMEOUT_S = 180  # a cold mlflow import on a busy 2-core machine took 88 s once


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    backend_store_uri: str
    artifact_root: Path  # where --artifacts-destination puts files on disk
    log_path: Path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    backend = f"sqlite:///{root / 'mlflow.db'}"
    artifacts = root / "artifacts"
    log_path = root / "server.log"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    process = start_mlflow_server(backend, artifacts, port, log_path, STARTUP_TIMEOUT_S)
    try:
        os.environ["MLFLOW_TRACKING_URI"] = uri  # mlflow-artifacts:/ URIs resolve against it
        mlflow.set_tracking_uri(uri)
        yield MlflowServer(uri, backend, artifacts, log_path)
    finally:
        stop_mlflow_server(process)
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
        shutil.rmtree(root / "artifacts", ignore_errors=True)


@pytest.fixture
def unique_name() -> str:
    """Experiments and registered models are global on the shared server: every test names its own."""
    return f"t-{uuid.uuid4().hex[:10]}"


def tree_hashes(directory: Path) -> dict[str, str]:
    """relative path → SHA-256 of every file under ``directory`` (empty if it does not exist)."""
    if not directory.exists():
        return {}
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }
