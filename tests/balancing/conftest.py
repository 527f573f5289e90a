"""Fixtures for balancing and limits: an in-process sidecar whose clock the test moves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from proxy.resilience.clock import ManualClock
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


async def fresh_text(session: aiohttp.ClientSession, url: str, timeout: float = 5.0) -> str:
    """An admin report reflecting the data plane now: the admin server may answer from a report published a
    moment ago (``x-seawall-report: cached``) when the main loop is slow to respond; then ask again."""
    deadline = time.monotonic() + timeout
    while True:
        async with session.get(url) as response:
            text = await response.text()
            if response.headers.get("x-seawall-report") != "cached":
                return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{url}: only cached reports for {timeout}s")
        await asyncio.sleep(0.02)


async def breakers(session: aiohttp.ClientSession, sidecar: Sidecar) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(await fresh_text(session, admin_url(sidecar) + "/breakers"))
    return body


async def metrics(session: aiohttp.ClientSession, sidecar: Sidecar) -> str:
    return await fresh_text(session, admin_url(sidecar) + "/metrics")
