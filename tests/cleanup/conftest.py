"""A real ``mlflow server`` (SQLite backend, local artifact root served through ``--serve-artifacts``) for
the whole session, plus helpers that build experiments on it and fingerprint artifact files on disk."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

STARTUP_TIMEOUT_S = 90


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    backend_store_uri: str
    artifact_root: Path  # where --artifacts-destination puts files on disk
    log_path: Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_healthy(uri: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"mlflow server not healthy after {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    backend = f"sqlite:///{root / 'mlflow.db'}"
    artifacts = root / "artifacts"
    log_path = root / "server.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend,
        "--artifacts-destination", str(artifacts),
        "--serve-artifacts",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--uvicorn-opts", "--timeout-graceful-shutdown 2",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        _wait_until_healthy(uri, process, log_path)
        os.environ["MLFLOW_TRACKING_URI"] = uri  # mlflow-artifacts:/ URIs resolve against it
        mlflow.set_tracking_uri(uri)
        yield MlflowServer(uri, backend, artifacts, log_path)
    finally:
        # The server runs uvicorn in a child: stop the whole process group we started, nothing else.
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=5)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
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
