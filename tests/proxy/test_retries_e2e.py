"""Retries, timeouts and locally made errors, end to end over real sockets."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.support.sidecar import free_port, listener_url, running_sidecar, write_policy
from tests.support.upstream import delay, scripted_upstream, status

RETRYING = {"retry": {"max_retries": 3, "base_delay": "50ms", "max_delay": "400ms", "jitter": False}}


async def test_503_503_200_is_retried_with_exponential_backoff(tmp_path: Path) -> None:
    async with scripted_upstream(default=status(200, "finally")) as upstream:
        upstream.then(status(503), status(503))
        policy = write_policy(tmp_path / "p.yaml", {"svc": {"targets": [upstream.url], **RETRYING}})
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as client:
            async with client.get(listener_url(sidecar, "svc") + "/x") as response:
                assert response.status == 200
                assert await response.text() == "finally"
                assert response.headers["x-sidecar-attempts"] == "3"
            assert upstream.hits == 3
            gaps = [b - a for a, b in zip(upstream.hit_times, upstream.hit_times[1:], strict=False)]
            assert 0.045 <= gaps[0] < 0.09, gaps
            assert 0.095 <= gaps[1] < 0.16, gaps
            assert sidecar.runtimes["svc"].stats.retries == 2


async def test_retry_limit_returns_the_upstreams_own_last_answer(tmp_path: Path) -> None:
    async with scripted_upstream(default=status(503, "still down", {"x-from": "upstream"})) as upstream:
        policy = write_policy(
            tmp_path / "p.yaml", {"svc": {"targets": [upstream.url], **RETRYING, "breaker": {"failure_threshold": 50}}}
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as client:
            async with client.get(listener_url(sidecar, "svc")) as response:
                assert response.status == 503
                assert await response.text() == "still down"
                assert response.headers["x-from"] == "upstream"
                assert response.headers["x-sidecar-attempts"] == "4"
                assert "x-sidecar-reason" not in response.headers
            assert upstream.hits == 4


async def test_post_is_not_retried(tmp_path: Path) -> None:
    async with scripted_upstream(default=status(503)) as upstream:
        policy = write_policy(tmp_path / "p.yaml", {"svc": {"targets": [upstream.url], **RETRYING}})
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as client:
            async with client.post(listener_url(sidecar, "svc"), data=b"order") as response:
                assert response.status == 503
                assert "x-sidecar-attempts" not in response.headers
            assert upstream.hits == 1


async def test_connection_refused_is_a_fast_502_connect_error(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    # A connect timeout far above the bound: "fast" means refused, not timed out.
    timeouts = {"connect": "5s", "per_try": "10s", "total": "20s"}
    policy = write_policy(tmp_path / "p.yaml", {"svc": {"targets": [dead], "timeouts": timeouts}})
    async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as client:
        started = time.perf_counter()
        async with client.get(listener_url(sidecar, "svc")) as response:
            elapsed = time.perf_counter() - started
            assert response.status == 502
            assert response.headers["x-sidecar-reason"] == "connect_error"
            body = await response.json()
            assert body["error"] == "connect_error" and body["upstream"] == "svc"
        # Generous for a busy CI machine; tests/benchmarks/at_once.py measures the real figure.
        assert elapsed < 1.0
        assert sidecar.runtimes["svc"].stats.failures == {"connect_error": 1}


async def test_connection_refused_is_retried_then_reported(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    policy = write_policy(tmp_path / "p.yaml", {"svc": {"targets": [dead], **RETRYING}})
    async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as client:
        async with client.get(listener_url(sidecar, "svc")) as response:
            assert response.status == 502
            assert response.headers["x-sidecar-reason"] == "connect_error"
            assert response.headers["x-sidecar-attempts"] == "4"


async def test_slow_upstream_is_a_504_timeout(tmp_path: Path) -> None:
    async with scripted_upstream(default=delay(2.0)) as upstream:
        policy = write_policy(
            tmp_path / "p.yaml",
            {"svc": {"targets": [upstream.url], "timeouts": {"connect": "100ms", "per_try": "200ms", "total": "1s"}}},
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as client:
            started = time.perf_counter()
            async with client.get(listener_url(sidecar, "svc")) as response:
                elapsed = time.perf_counter() - started
                assert response.status == 504
                assert response.headers["x-sidecar-reason"] == "timeout"
            assert 0.19 <= elapsed < 0.5


async def test_total_bounds_every_attempt_and_backoff(tmp_path: Path) -> None:
    async with scripted_upstream(default=delay(2.0)) as upstream:
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "svc": {
                    "targets": [upstream.url],
                    "timeouts": {"connect": "100ms", "per_try": "300ms", "total": "700ms"},
                    "retry": {
                        "max_retries": 5,
                        "base_delay": "50ms",
                        "max_delay": "100ms",
                        "jitter": False,
                        "retry_on": ["timeout", "connect_error"],
                    },
                    "breaker": {"failure_threshold": 50},
                }
            },
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as client:
            started = time.perf_counter()
            async with client.get(listener_url(sidecar, "svc")) as response:
                elapsed = time.perf_counter() - started
                assert response.status == 504
            # 300 ms + 50 ms backoff + 300 ms, then the next backoff would cross 700 ms: stop.
            assert elapsed < 0.8, elapsed
            assert upstream.hits == 2


async def test_retry_after_shorter_than_backoff_is_honoured(tmp_path: Path) -> None:
    async with scripted_upstream(default=status(200)) as upstream:
        upstream.then(status(503, headers={"Retry-After": "0"}))
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "svc": {
                    "targets": [upstream.url],
                    "retry": {"max_retries": 1, "base_delay": "2s", "max_delay": "4s", "jitter": False},
                }
            },
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as client:
            started = time.perf_counter()
            async with client.get(listener_url(sidecar, "svc")) as response:
                assert response.status == 200
            assert time.perf_counter() - started < 1.0


async def test_retry_budget_stops_a_retry_storm(tmp_path: Path) -> None:
    async with scripted_upstream(default=status(503)) as upstream:
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "svc": {
                    "targets": [upstream.url],
                    "retry": {
                        "max_retries": 3,
                        "base_delay": "1ms",
                        "max_delay": "1ms",
                        "jitter": False,
                        "budget": {"ratio": 0.0, "min_per_second": 0.2},
                    },
                    "breaker": {"failure_threshold": 1000},
                }
            },
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as client:
            for _ in range(5):
                async with client.get(listener_url(sidecar, "svc")) as response:
                    assert response.status == 503
            stats = sidecar.runtimes["svc"].stats
            assert stats.retries == 2  # 0.2/s over the 10 s window
            assert stats.rejected["retry_budget"] == 5  # every request wanted one more retry than it got
            assert upstream.hits == 5 + 2


async def test_breaker_opening_during_backoff_stops_retries(tmp_path: Path) -> None:
    async with scripted_upstream(default=status(503)) as upstream:
        policy = write_policy(
            tmp_path / "p.yaml", {"svc": {"targets": [upstream.url], **RETRYING, "breaker": {"failure_threshold": 2}}}
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as client:
            async with client.get(listener_url(sidecar, "svc")) as response:
                assert response.status == 503
                assert response.headers["x-sidecar-attempts"] == "2"
            assert upstream.hits == 2


async def test_client_and_upstream_answers_keep_their_bytes(tmp_path: Path) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        return web.Response(body=body[::-1], headers={"x-len": str(len(body))})

    async with scripted_upstream(default=echo) as upstream:
        policy = write_policy(tmp_path / "p.yaml", {"svc": {"targets": [upstream.url]}})
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as client:
            async with client.put(listener_url(sidecar, "svc"), data=b"abc\x00\xff") as response:
                assert await response.read() == b"\xff\x00cba"
                assert response.headers["x-len"] == "5"
