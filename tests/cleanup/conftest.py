"""Fixtures: a real ``mlflow server`` (SQLite backend, local artifact root served through ``--serve-artifacts``)
for the whole session, and a unique name per test (helpers live in tests/support/mlflow_server.py)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator

import mlflow
import pytest

from tests.support.mlflow_server import STARTUP_TIMEOUT_S, MlflowServer, start_mlflow_server, stop_mlflow_server
from tests.support.sidecar import free_port


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
