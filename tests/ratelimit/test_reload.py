"""A reload and the rate limit: unchanged, its windows and cool-down carry on (a reload must never be a way to
send a second burst); changed, it counts afresh under the new limits; broken, the old one stays."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.support.exchange import Exchange, running_exchange
from tests.support.sidecar import listener_url, running_sidecar, write_policy


async def _statuses(session: aiohttp.ClientSession, url: str, count: int) -> list[int]:
    statuses = []
    for _ in range(count):
        async with session.get(url) as response:
            await response.read()
            statuses.append(response.status)
    return statuses


async def test_an_unchanged_rate_limit_keeps_counting_across_a_reload(tmp_path: Path) -> None:
    async with running_exchange(Exchange(limit=1000)) as exchange:
        upstream = {"targets": [exchange.url], "rate_limit": {"limits": [{"requests": 5, "per": "1m"}]}}
        policy = write_policy(tmp_path / "p.yaml", {"ex": upstream})
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            url = listener_url(sidecar, "ex") + "/api"
            assert await _statuses(session, url, 3) == [200] * 3
            before = sidecar.runtimes["ex"].rate
            # Another key changes (the breaker): the rate limit is the same and keeps its window.
            write_policy(policy, {"ex": {**upstream, "breaker": {"failure_threshold": 9}}})
            assert await sidecar.reload("test") is True
            assert sidecar.runtimes["ex"].rate is before
            assert await _statuses(session, url, 3) == [200, 200, 429]
            assert len(exchange.arrivals) == 5

            # A new limit counts afresh under its own numbers.
            upstream["rate_limit"] = {"limits": [{"requests": 2, "per": "1m"}]}
            write_policy(policy, {"ex": upstream})
            assert await sidecar.reload("test") is True
            assert sidecar.runtimes["ex"].rate is not before
            assert await _statuses(session, url, 3) == [200, 200, 429]

            # A broken rate_limit in the file: the reload is refused and the running limit stays.
            running = sidecar.runtimes["ex"].rate
            policy.write_text(policy.read_text().replace("requests: 2", "requests: zero"))
            assert await sidecar.reload("test") is False
            assert sidecar.runtimes["ex"].rate is running
            assert await _statuses(session, url, 1) == [429]


async def test_a_cool_down_survives_a_reload_that_keeps_the_rate_limit(tmp_path: Path) -> None:
    async with running_exchange(Exchange(limit=1000)) as exchange:
        upstream = {"targets": [exchange.url], "rate_limit": {}}
        policy = write_policy(tmp_path / "p.yaml", {"ex": upstream})
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            url = listener_url(sidecar, "ex") + "/api"
            exchange.script_429.append("30")
            assert await _statuses(session, url, 1) == [429]
            write_policy(policy, {"ex": {**upstream, "timeouts": {"total": "6s"}}})
            assert await sidecar.reload("test") is True
            async with session.get(url) as response:
                assert response.headers["x-sidecar-reason"] == "upstream_cooldown"
            assert len(exchange.arrivals) == 1
