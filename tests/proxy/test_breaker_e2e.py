"""The breaker through a real listener and real upstream sockets (short real durations, no sleeps to wait)."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import aiohttp

from tests.support.eventually import eventually
from tests.support.sidecar import listener_url, running_sidecar, write_policy
from tests.support.upstream import delay, scripted_upstream, status


async def test_threshold_opens_and_fails_fast(tmp_path: Path) -> None:
    async with scripted_upstream(default=status(503)) as upstream:
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "svc": {"targets": [upstream.url], "breaker": {"failure_threshold": 3, "open_duration": "30s"}},
            },
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as client:
            url = listener_url(sidecar, "svc") + "/work"
            for _ in range(3):
                async with client.get(url) as response:
                    assert response.status == 503
                    assert "x-sidecar-reason" not in response.headers  # the upstream's own answer
            assert upstream.hits == 3
            started = time.perf_counter()
            async with client.get(url) as response:
                elapsed = time.perf_counter() - started
                assert response.status == 503
                assert response.headers["x-sidecar-reason"] == "breaker_open"
                assert response.headers["retry-after"] == "30"
                assert "reason=3_failures_in_60s" in response.headers["x-sidecar-decision"]
            timings = [elapsed]
            for _ in range(50):
                started = time.perf_counter()
                async with client.get(url) as response:
                    assert response.status == 503
                timings.append(time.perf_counter() - started)
            assert upstream.hits == 3, "nothing reaches the upstream while the breaker is open"
            # Client round trip included. The median, because a loaded 2-core test machine can stall any one call;
            # a generous bound (the upstream answers at once too, so time cannot tell more than "no waiting": the
            # hits above show nothing reached it). tests/benchmarks/at_once.py and bench.py's fail-fast run measure
            # the real figure.
            assert statistics.median(timings) < 0.05, f"fail-fast median {statistics.median(timings) * 1e3:.2f} ms"


async def test_fallback_answer_while_open(tmp_path: Path) -> None:
    async with scripted_upstream(default=status(500)) as upstream:
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "cache": {
                    "targets": [upstream.url],
                    "breaker": {"failure_threshold": 1},
                    "fallback": {"status": 200, "body": '{"cached": false}', "content_type": "application/json"},
                },
            },
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as client:
            url = listener_url(sidecar, "cache")
            async with client.get(url) as response:
                assert response.status == 500
            async with client.get(url) as response:
                assert response.status == 200
                assert await response.json() == {"cached": False}
                assert response.headers["x-sidecar-reason"] == "breaker_open"
                assert response.headers["content-type"] == "application/json"


async def test_half_open_probe_closes_on_success_and_reopens_on_failure(tmp_path: Path) -> None:
    async with scripted_upstream(default=status(200)) as upstream:
        upstream.then(status(503), status(503))
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "svc": {"targets": [upstream.url], "breaker": {"failure_threshold": 2, "open_duration": "300ms"}},
            },
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as client:
            url = listener_url(sidecar, "svc")
            breaker = sidecar.runtimes["svc"].breaker
            for _ in range(2):
                async with client.get(url) as response:
                    assert response.status == 503
            assert breaker.state.value == "open"
            opened = time.monotonic()
            await eventually(lambda: time.monotonic() - opened >= 0.3, timeout=2)
            async with client.get(url) as response:  # the probe: succeeds
                assert response.status == 200
            assert breaker.state.value == "closed"
            assert upstream.hits == 3

            upstream.then(status(503), status(503), status(503))
            for _ in range(2):
                async with client.get(url) as response:
                    assert response.status == 503
            assert breaker.state.value == "open"
            opened = time.monotonic()
            await eventually(lambda: time.monotonic() - opened >= 0.3, timeout=2)
            async with client.get(url) as response:  # the probe fails: open again at once
                assert response.status == 503
                assert "x-sidecar-reason" not in response.headers
            assert breaker.state.value == "open"
            async with client.get(url) as response:
                assert response.headers["x-sidecar-reason"] == "breaker_open"
            assert upstream.hits == 6


async def test_half_open_admits_exactly_one_of_fifty(tmp_path: Path) -> None:
    async with scripted_upstream(default=delay(0.3)) as upstream:
        upstream.then(status(503))
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "svc": {
                    "targets": [upstream.url],
                    "breaker": {"failure_threshold": 1, "open_duration": "200ms", "half_open_max_calls": 1},
                },
            },
        )
        async with (
            running_sidecar(policy) as sidecar,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as client,
        ):
            url = listener_url(sidecar, "svc")
            async with client.get(url) as response:
                assert response.status == 503
            opened = time.monotonic()
            await eventually(lambda: time.monotonic() - opened >= 0.2, timeout=2)

            async def one() -> int:
                async with client.get(url) as response:
                    await response.read()
                    return response.status

            statuses = await asyncio.gather(*(one() for _ in range(50)))
            assert upstream.hits == 2, "exactly one probe reached the upstream"
            assert statuses.count(200) == 1
            assert statuses.count(503) == 49
