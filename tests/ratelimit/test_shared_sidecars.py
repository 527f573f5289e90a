"""Several real ``sidecar run`` processes sharing one budget through a real ``redis-server``, in front of a mock
exchange that bans: together they stay under the one limit; with Redis gone each falls back to its share,
``/health`` says degraded, and they share again once Redis is back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.admin import sample, scrape
from tests.support.eventually import eventually
from tests.support.exchange import Exchange, running_exchange
from tests.support.servers import RedisServer
from tests.support.sidecar import SidecarProcess, policy_listen, sidecar_process, write_policy


def _policies(
    tmp_path: Path, exchange: Exchange, redis: RedisServer, count: int, share: int, timeout: str = "10ms"
) -> list[Path]:
    shared = {"redis": f"redis://127.0.0.1:{redis.port}/0", "key": "exchange-ip-1", "fallback_share": share}
    rate_limit = {"limits": [{"requests": 10, "per": "1s"}], "shared": {**shared, "timeout": timeout}}
    return [
        write_policy(tmp_path / f"s{i}.yaml", {"exchange": {"targets": [exchange.url], "rate_limit": rate_limit}})
        for i in range(count)
    ]


def _url(policy: Path) -> str:
    host, port = policy_listen(policy, "exchange")
    return f"http://{host}:{port}/api/v3/ticker"


async def _fire(client: aiohttp.ClientSession, urls: list[str], each: int) -> list[int]:
    """``each`` requests at once through every sidecar."""

    async def one(url: str) -> int:
        async with client.get(url) as response:
            await response.read()
            return response.status

    return await asyncio.gather(*(one(url) for url in urls for _ in range(each)))


async def _health(client: aiohttp.ClientSession, sidecar: SidecarProcess) -> tuple[int, dict[str, Any]]:
    async with client.get(sidecar.admin + "/health") as response:
        return response.status, await response.json()


@pytest.mark.parametrize("count", [2, 3])
async def test_sidecars_sharing_a_key_stay_under_one_limit(
    tmp_path: Path, redis_server: RedisServer, count: int
) -> None:
    async with running_exchange(Exchange(limit=10, per=1.0)) as exchange:
        # A Redis round trip on loopback takes well under a millisecond, but this test shares two loaded cores
        # with its sidecars and the rest of the suite: a longer timeout keeps it about sharing, not about a
        # scheduler hiccup sending a sidecar to its fallback share (the next test is about that).
        policies = _policies(tmp_path, exchange, redis_server, count, share=count, timeout="200ms")
        with contextlib.ExitStack() as stack:
            sidecars = [stack.enter_context(sidecar_process(p)) for p in policies]
            urls = [_url(p) for p in policies]
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
                waves = []
                for _ in range(3):  # a combined burst of 15 per sidecar, three times, more than a window apart
                    started = time.monotonic()
                    waves.append(await _fire(client, urls, 15))
                    # A wave's grants spread over its first ~0.2 s on loaded cores; each counts for per + margin.
                    await asyncio.sleep(max(0.0, started + 1.6 - time.monotonic()))
                ok = [statuses.count(200) for statuses in waves]
                # Each window lets the one limit through, shared among the sidecars, whoever asked first.
                assert all(9 <= n <= 11 for n in ok), ok
                assert exchange.max_in_window() <= 11, exchange.arrivals
                assert exchange.statuses().get(418, 0) == 0
                for sidecar in sidecars:
                    assert '"state": "fallback"' not in sidecar.log(), "counted in Redis throughout"
                    status, health = await _health(client, sidecar)
                    assert status == 200 and health["status"] == "healthy"
                    rate = health["circuit_breakers"]["exchange"]["rate_limit"]
                    assert rate["counted"] == "shared"


async def test_redis_gone_means_a_local_share_then_shared_again(tmp_path: Path, redis_server: RedisServer) -> None:
    async with running_exchange(Exchange(limit=10, per=1.0)) as exchange:
        policies = _policies(tmp_path, exchange, redis_server, 2, share=2)
        with contextlib.ExitStack() as stack:
            sidecars = [stack.enter_context(sidecar_process(p)) for p in policies]
            urls = [_url(p) for p in policies]
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
                assert (await _fire(client, urls, 1)) == [200, 200]
                redis_server.stop()
                await asyncio.sleep(1.1)  # a fresh window
                started = time.monotonic()
                statuses = await _fire(client, urls, 8)
                took = time.monotonic() - started
                # Each sidecar on half the limit: 5 each, 10 together, the rest answered locally.
                assert statuses.count(200) == 10, statuses
                assert statuses.count(429) == 6
                assert took < 1.0, "requests were never held up waiting for Redis"
                assert exchange.max_in_window() <= 11
                for sidecar in sidecars:
                    status, health = await _health(client, sidecar)
                    assert status == 200 and health["status"] == "degraded"
                    assert health["circuit_breakers"]["exchange"]["rate_limit"]["counted"] == "fallback"
                    samples = await scrape(client, sidecar.admin)
                    assert sample(samples, "sidecar_rate_limit_shared", upstream="exchange", state="fallback") == 1
                    assert sidecar.log().count('"state": "fallback"') == 1, "logged once"
                redis_server.start()

                async def counted() -> list[str]:
                    await _fire(client, urls, 1)  # the next request after retry_interval tries Redis again
                    answers = [await _health(client, s) for s in sidecars]
                    return [h["circuit_breakers"]["exchange"]["rate_limit"]["counted"] for _, h in answers]

                await eventually(counted, until=lambda c: c == ["shared", "shared"], timeout=10, what="shared again")
                for sidecar in sidecars:
                    _, health = await _health(client, sidecar)
                    assert health["status"] == "healthy"
