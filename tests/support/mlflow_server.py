"""A real ``mlflow server`` (SQLite backend, served local artifacts) on loopback, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.eventually import eventually_sync


def start_mlflow_server(
    backend_store_uri: str, artifacts: Path, port: int, log_path: Path, startup_timeout: float = 120.0
) -> subprocess.Popen[bytes]:
    """Start the server in its own process group and wait until ``/health`` answers."""
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", str(artifacts),
        "--serve-artifacts",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--uvicorn-opts", "--timeout-graceful-shutdown 2",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    try:
        eventually_sync(healthy, timeout=startup_timeout, interval=0.3, what="mlflow server /health")
    except AssertionError as exc:
        stop_mlflow_server(process)
        raise RuntimeError(
            f"mlflow server not healthy after {startup_timeout:g}s:\n{log_path.read_text()[-3000:]}"
        ) from exc
    return process


def stop_mlflow_server(process: subprocess.Popen[bytes]) -> None:
    """The server runs uvicorn in a child: stop the whole process group we started, nothing else."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def mlflow_server_running(
    backend_store_uri: str, artifacts: Path, port: int, log_path: Path, startup_timeout: float = 120.0
) -> Iterator[subprocess.Popen[bytes]]:
    process = start_mlflow_server(backend_store_uri, artifacts, port, log_path, startup_timeout)
    try:
        yield process
    finally:
        stop_mlflow_server(process)


STARTUP_TIMEOUT_S = 180  # a cold mlflow import on a busy 2-core machine took 88 s once


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    backend_store_uri: str
    artifact_root: Path  # where --artifacts-destination puts files on disk
    log_path: Path


def tree_hashes(directory: Path) -> dict[str, str]:
    """relative path → SHA-256 of every file under ``directory`` (empty if it does not exist)."""
    if not directory.exists():
        return {}
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }
