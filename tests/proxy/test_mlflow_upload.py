"""Issue #12's measurement, made small: a slow artifact upload to a real ``mlflow server`` through the sidecar.

The upload takes ~4 s against per_try 1 s and total 2 s, with one pause longer than per_try. Before the timeout model was fixed such an upload was
answered 504 while the client was still sending, and each one counted against MLflow's breaker.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.admin import scrape
from tests.support.mlflow_server import STARTUP_TIMEOUT_S, MlflowServer, mlflow_server_running
from tests.support.sidecar import admin_url, free_port, listener_url, running_sidecar, write_policy

CHUNK = 8 * 1024
CHUNKS = 24
GAP = 0.125  # 24 × 8 KiB over ~2.9 s
PAUSE = 1.3  # once, halfway: the client stops sending for longer than per_try (but not idle)
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    root = tmp_path_factory.mktemp("mlflow-upload")
    backend = f"sqlite:///{root / 'mlflow.db'}"
    port = free_port()
    with mlflow_server_running(backend, root / "artifacts", port, root / "server.log", STARTUP_TIMEOUT_S):
        yield MlflowServer(f"http://127.0.0.1:{port}", backend, root / "artifacts", root / "server.log")


def _piece(index: int) -> bytes:
    return hashlib.sha256(b"%d" % index).digest() * (CHUNK // 32)


EXPECTED = b"".join(_piece(i) for i in range(CHUNKS))


async def _slowly() -> AsyncIterator[bytes]:
    for index in range(CHUNKS):
        if index:
            await asyncio.sleep(PAUSE if index == CHUNKS // 2 else GAP)
        yield _piece(index)


async def _upload(session: aiohttp.ClientSession, url: str) -> tuple[int, float]:
    started = time.monotonic()
    async with session.put(url, data=_slowly(), headers={"content-length": str(len(EXPECTED))}) as response:
        await response.read()
        return response.status, time.monotonic() - started


async def test_a_slow_artifact_upload_longer_than_per_try_succeeds_and_leaves_the_breaker_alone(
    mlflow: MlflowServer, tmp_path: Path
) -> None:
    policy = write_policy(
        tmp_path / "p.yaml",
        {"mlflow": {"targets": [mlflow.uri]}},
        defaults={
            "timeouts": {"connect": "500ms", "per_try": "1s", "total": "2s", "idle": "2s"},
            "breaker": {"failure_threshold": 1},
        },
        http={"replay_buffer_bytes": 4096},  # the upload streams, as a real artifact would
    )
    async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
        samples = await scrape(session, admin_url(sidecar))
        breaker_before = {k: v for k, v in samples.items() if k[0].startswith("sidecar_breaker_")}

        direct_status, _ = await _upload(session, f"{mlflow.uri}{ARTIFACTS}/direct/model.bin")
        status, elapsed = await _upload(session, f"{listener_url(sidecar, 'mlflow')}{ARTIFACTS}/sidecar/model.bin")
        assert status == direct_status == 200
        assert elapsed > 3.5, "the upload outlived per_try and total"
        for name in ("direct", "sidecar"):
            assert (mlflow.artifact_root / name / "model.bin").read_bytes() == EXPECTED
        async with session.get(f"{listener_url(sidecar, 'mlflow')}{ARTIFACTS}/sidecar/model.bin") as response:
            assert response.status == 200 and await response.read() == EXPECTED

        rt = sidecar.runtimes["mlflow"]
        assert rt.stats.failures == {} and rt.effective_state().value == "closed"
        samples = await scrape(session, admin_url(sidecar))
        assert {k: v for k, v in samples.items() if k[0].startswith("sidecar_breaker_")} == breaker_before
