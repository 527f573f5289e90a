"""Outbound rate limits against a mock exchange that bans (418) anyone who ignores its 429s, through a real
``sidecar run`` process: the exchange never counts more than its limit, the excess is answered 429 locally,
cool-downs hold every request back, weights and observed usage slow the sidecar down before any 429."""

from __future__ import annotations

import asyncio
import email.utils
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.admin import sample, scrape
from tests.support.exchange import Exchange, running_exchange
from tests.support.sidecar import SidecarProcess, policy_listen, sidecar_process, write_policy


def _policy(tmp_path: Path, exchange: Exchange, rate_limit: dict[str, Any], **upstream: Any) -> Path:
    return write_policy(
        tmp_path / "p.yaml",
        {"exchange": {"targets": [exchange.url], "rate_limit": rate_limit, **upstream}},
        logging={"level": "info", "requests": True},
    )


def _url(policy: Path, path: str = "/api/v3/ticker") -> str:
    host, port = policy_listen(policy, "exchange")
    return f"http://{host}:{port}{path}"


async def _burst(url: str, count: int) -> list[tuple[int, dict[str, str], float]]:
    """``count`` requests at once: (status, headers, seconds to the answer) each."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as client:

        async def one() -> tuple[int, dict[str, str], float]:
            started = time.monotonic()
            async with client.get(url) as response:
                await response.read()
                return response.status, dict(response.headers), time.monotonic() - started

        return await asyncio.gather(*(one() for _ in range(count)))


async def _breaker(sidecar: SidecarProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as client, client.get(sidecar.admin + "/breakers") as response:
        body: dict[str, Any] = await response.json()
        return body["exchange"]


async def test_a_burst_of_ten_times_the_limit_never_exceeds_it_and_gets_no_ban(tmp_path: Path) -> None:
    async with running_exchange(Exchange(limit=10, per=1.0)) as exchange:
        policy = _policy(tmp_path, exchange, {"limits": [{"requests": 10, "per": "1s"}]})
        with sidecar_process(policy) as sidecar:
            answers = await _burst(_url(policy), 100)
            statuses = [status for status, _, _ in answers]
            assert statuses.count(200) == 10
            assert statuses.count(429) == 90
            local = [(headers, took) for status, headers, took in answers if status == 429]
            assert all(h.get("x-sidecar-reason") == "rate_limited" for h, _ in local)
            # Seconds until the window lets the next one go (per + margin after the first send), rounded up.
            assert {h.get("Retry-After") for h, _ in local} <= {"1", "2"}
            assert exchange.statuses() == {200: 10}, "nothing past the limit reached the exchange: no 429, no 418"
            assert exchange.max_in_window() == 10
            # Answered locally at once (the burst's own scheduling included), never after waiting for tokens.
            assert sorted(took for _, took in local)[len(local) // 2] < 0.25
            breaker = await _breaker(sidecar)
            assert breaker["state"] == "closed"
            assert breaker["failures_by_kind"] == {}
            assert breaker["rate_limit"]["refused"] == {"rate_limited": 90}
            async with aiohttp.ClientSession() as client:
                samples = await scrape(client, sidecar.admin)
            assert sample(samples, "sidecar_rate_limited_total", upstream="exchange", reason="rate_limited") == 90
            assert sample(samples, "sidecar_rejected_total", upstream="exchange", reason="rate_limited") == 90
            # The operator can see in the request log why a caller got a 429.
            log = sidecar.log()
            assert log.count('"reason": "rate_limited"') == 90, log[-2000:]


async def test_with_max_wait_covering_it_every_request_of_a_double_burst_succeeds(tmp_path: Path) -> None:
    async with running_exchange(Exchange(limit=10, per=1.0)) as exchange:
        policy = _policy(tmp_path, exchange, {"limits": [{"requests": 10, "per": "1s"}], "max_wait": "2s"})
        with sidecar_process(policy) as sidecar:
            started = time.monotonic()
            answers = await _burst(_url(policy), 20)
            took = time.monotonic() - started
            assert [status for status, _, _ in answers] == [200] * 20
            assert exchange.statuses() == {200: 20}
            assert exchange.max_in_window() <= 10
            # The second ten waited in line for the window to pass them: about one second, not more.
            assert 0.95 < took < 2.5, took
            assert (await _breaker(sidecar))["rate_limit"]["refused"] == {}


async def test_a_retry_after_pauses_the_upstream_until_it_ends(tmp_path: Path) -> None:
    async with running_exchange(Exchange(limit=1000)) as exchange:
        policy = _policy(tmp_path, exchange, {"cooldown_on": [429, 418]})
        with sidecar_process(policy) as sidecar:
            exchange.script_429.append("2")
            first = await _burst(_url(policy), 1)
            assert first[0][0] == 429 and "x-sidecar-reason" not in first[0][1], "the upstream's own 429, as it came"
            assert first[0][1]["Retry-After"] == "2"
            paused_at = time.monotonic()
            seen = len(exchange.arrivals)
            during = await _burst(_url(policy), 5)
            assert [s for s, _, _ in during] == [429] * 5
            assert {h["x-sidecar-reason"] for _, h, _ in during} == {"upstream_cooldown"}
            assert {h["Retry-After"] for _, h, _ in during} <= {"1", "2"}
            assert len(exchange.arrivals) == seen, "nothing reached the upstream during its Retry-After"
            await asyncio.sleep(max(0.0, paused_at + 2.1 - time.monotonic()))
            after = await _burst(_url(policy), 3)
            assert [s for s, _, _ in after] == [200] * 3
            assert len(exchange.arrivals) == seen + 3
            breaker = await _breaker(sidecar)
            assert breaker["state"] == "closed" and breaker["failures_by_kind"] == {}
            assert breaker["rate_limit"]["cooldowns"] == 1
            assert breaker["rate_limit"]["refused"] == {"upstream_cooldown": 5}


async def test_an_http_date_retry_after_pauses_too(tmp_path: Path) -> None:
    async with running_exchange(Exchange(limit=1000)) as exchange:
        policy = _policy(tmp_path, exchange, {})
        with sidecar_process(policy):
            exchange.script_429.append(email.utils.formatdate(time.time() + 3, usegmt=True))
            assert (await _burst(_url(policy), 1))[0][0] == 429
            seen = len(exchange.arrivals)
            during = await _burst(_url(policy), 3)
            assert {h["x-sidecar-reason"] for _, h, _ in during} == {"upstream_cooldown"}
            assert len(exchange.arrivals) == seen


async def test_a_418_is_never_retried_even_when_listed_in_retry_on(tmp_path: Path) -> None:
    async with running_exchange(Exchange(limit=1000)) as exchange:
        policy = _policy(
            tmp_path,
            exchange,
            {},
            retry={"max_retries": 3, "retry_on": [418, 429, 503], "base_delay": "10ms", "max_delay": "20ms"},
        )
        with sidecar_process(policy) as sidecar:
            exchange.script_429.append("1")
            answers = await _burst(_url(policy), 1)
            assert answers[0][0] == 429
            assert len(exchange.arrivals) == 1, "a cool-down answer is never retried"
            await asyncio.sleep(1.05)
            exchange.bare_418 = 1  # a ban without Retry-After: no pause to start, still never retried
            answers = await _burst(_url(policy), 1)
            assert answers[0][0] == 418 and "x-sidecar-reason" not in answers[0][1]
            assert len(exchange.arrivals) == 2
            assert (await _breaker(sidecar))["failures_by_kind"] == {}


async def test_route_weights_are_spent_per_request(tmp_path: Path) -> None:
    async with running_exchange(Exchange(limit=10, per=1.0, depth_weight=5)) as exchange:
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "exchange": {
                    "targets": [exchange.url],
                    "rate_limit": {"limits": [{"requests": 10, "per": "1s"}]},
                    "routes": [{"match": {"path_prefix": "/api/v3/depth"}, "name": "depth", "weight": 5}],
                }
            },
        )
        with sidecar_process(policy):
            answers = await _burst(_url(policy, "/api/v3/depth?symbol=BTCUSDT"), 4)
            assert sorted(s for s, _, _ in answers) == [200, 200, 429, 429]
            assert exchange.statuses() == {200: 2}
            assert exchange.max_in_window() == 10


async def test_observed_usage_slows_the_sidecar_down_before_any_429(tmp_path: Path) -> None:
    # Someone else on the same IP spends 6 of the exchange's 10 per second; the sidecar's own limit is 10.
    async with running_exchange(Exchange(limit=10, per=1.0, external=6, report_usage=True)) as exchange:
        policy = _policy(
            tmp_path,
            exchange,
            {"limits": [{"requests": 10, "per": "1s"}], "observe": {"used": "X-MBX-USED-WEIGHT-1M"}},
        )
        with sidecar_process(policy):
            answers = []
            for _ in range(12):  # one at a time, as a polling client would
                answers += await _burst(_url(policy), 1)
            statuses = [s for s, _, _ in answers]
            assert 429 not in exchange.statuses(), exchange.statuses()
            assert statuses.count(200) == 4, statuses
            assert {h.get("x-sidecar-reason") for s, h, _ in answers if s == 429} == {"rate_limited"}
