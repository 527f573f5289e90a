"""Fixtures for balancing and limits: an in-process sidecar whose clock the test moves."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from proxy.clock import ManualClock
from proxy.server import Sidecar
from tests.support.sidecar import admin_url, listener_url


@contextlib.asynccontextmanager
async def manual_sidecar(policy: Path, clock: ManualClock) -> AsyncIterator[Sidecar]:
    """Like ``running_sidecar``, but breaker and ejection time only moves when the test advances ``clock``."""
    sidecar = Sidecar(policy, clock=clock)
    await sidecar.start()
    try:
        yield sidecar
    finally:
        await sidecar.stop(drain_timeout=1.0)


async def get(
    session: aiohttp.ClientSession, sidecar: Sidecar, upstream: str, path: str = "/"
) -> tuple[int, dict[str, str], str]:
    async with session.get(listener_url(sidecar, upstream) + path) as response:
        return response.status, dict(response.headers), await response.text()


async def breakers(session: aiohttp.ClientSession, sidecar: Sidecar) -> dict[str, Any]:
    async with session.get(admin_url(sidecar) + "/breakers") as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body
