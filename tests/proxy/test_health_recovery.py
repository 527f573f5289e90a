"""Recovery without traffic, through a real sidecar and a real upstream: passing active checks end an open
interval early (half-open, /health degraded but 200) with no client request, and the next real call decides; a
shallow /health that passes while the calls fail gets one such early end per outage; without checks, an elapsed
open interval reads half-open."""

from __future__ import annotations

import datetime
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.admin import breakers, get_json, sample, scrape
from tests.support.eventually import eventually
from tests.support.sidecar import admin_url, listener_url, running_sidecar, write_policy
from tests.support.upstream import scripted_upstream


class Switch:
    """An upstream that fails everything (its /health too) until it is switched back up."""

    def __init__(self) -> None:
        self.up = False
        self.hits = 0

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        if request.path != "/health":
            self.hits += 1
        return web.Response(status=200 if self.up else 503, text="ok" if self.up else "down")


async def test_passing_checks_half_open_the_breaker_with_no_traffic_and_the_next_call_closes_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    switch = Switch()
    async with scripted_upstream(default=switch) as upstream:
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "db": {
                    "targets": [upstream.url],
                    "breaker": {"failure_threshold": 2, "open_duration": "60s"},
                    "health": {"interval": "200ms", "timeout": "1s", "healthy_threshold": 2},
                }
            },
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as client:
            admin = admin_url(sidecar)
            for _ in range(2):
                async with client.get(listener_url(sidecar, "db") + "/work") as response:
                    assert response.status == 503
            assert (await breakers(client, sidecar))["db"]["state"] == "open"
            status, _ = await get_json(client, admin + "/health")
            assert status == 503
            hits = switch.hits
            caplog.set_level(logging.WARNING, logger="seawall.breaker")
            switch.up = True  # the upstream is back; no client sends a request until it reads half-open

            async def health() -> tuple[int, Any]:
                return await get_json(client, admin + "/health")

            # Two passing checks at 200 ms (±10%) apart: well within a second of the recovery, not open_duration.
            status, body = await eventually(health, until=lambda r: r[0] == 200, timeout=5, what="/health 200")
            assert body["status"] == "degraded", body  # half-open: the calls have not spoken yet
            breaker = (await breakers(client, sidecar))["db"]
            assert breaker["state"] == "half_open"
            assert breaker["last_transition"]["reason"] == "health_check_passed"
            assert breaker["last_transition"]["from"] == "open"
            assert breaker["health_may_half_open"] is True
            samples = await scrape(client, admin)
            assert sample(samples, "sidecar_breaker_health_recoveries_total", upstream="db") == 1
            assert sample(samples, "sidecar_breaker_state", upstream="db", state="half_open") == 1
            assert switch.hits == hits, "half-opened with no client traffic"
            lines = [r for r in caplog.records if getattr(r, "event", None) == "breaker_transition"]
            assert any(getattr(r, "reason", None) == "health_check_passed" for r in lines), caplog.text

            async with client.get(listener_url(sidecar, "db") + "/work") as response:
                assert response.status == 200, "the next request is let through at once, as the probe"
            breaker = (await breakers(client, sidecar))["db"]
            assert breaker["state"] == "closed"
            assert (breaker["last_transition"]["from"], breaker["last_transition"]["reason"]) == (
                "half_open",
                "probe_succeeded",
            )
            status, body = await get_json(client, admin + "/health")
            assert status == 200 and body["status"] == "healthy"
            samples = await scrape(client, admin)
            assert sample(samples, "sidecar_breaker_health_recoveries_total", upstream="db") == 1


async def test_a_shallow_health_check_half_opens_once_and_the_failing_calls_keep_the_breaker_open(
    tmp_path: Path,
) -> None:
    """The demo's case: /health passes while the path in use answers 503. A passing check may end the open
    interval early once; the probe it lets through fails, and from then on only open_duration ends it."""
    fails = 0

    async def shallow(request: web.Request) -> web.StreamResponse:
        nonlocal fails
        if request.path == "/health":
            return web.Response(text="ok")
        fails += 1
        return web.Response(status=503, text="down")

    open_for = 3.0
    async with scripted_upstream(default=shallow) as upstream:
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "db": {
                    "targets": [upstream.url],
                    "breaker": {"failure_threshold": 5, "open_duration": f"{open_for:g}s"},
                    "retry": {"max_retries": 0},
                    "health": {"interval": "100ms", "timeout": "1s"},  # healthy_threshold 1, the default
                }
            },
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as client:
            admin = admin_url(sidecar)
            url = listener_url(sidecar, "db") + "/fail"
            for _ in range(5):
                async with client.get(url) as response:
                    assert response.status == 503 and "x-sidecar-reason" not in response.headers
            breaker = (await breakers(client, sidecar))["db"]
            assert (breaker["state"], breaker["last_transition"]["reason"]) == ("open", "5_failures_in_60s")

            async def state() -> dict[str, Any]:
                return dict((await breakers(client, sidecar))["db"])

            # The next passing check (within ~100 ms) ends the open interval early, into half-open.
            breaker = await eventually(state, until=lambda b: b["state"] == "half_open", timeout=2, what="half-open")
            assert breaker["last_transition"]["reason"] == "health_check_passed"
            status, body = await get_json(client, admin + "/health")
            assert (status, body["status"]) == (200, "degraded")

            async with client.get(url) as response:  # the probe: forwarded, fails, re-opens the breaker
                assert response.status == 503 and "x-sidecar-reason" not in response.headers
            assert fails == 6
            breaker = await state()
            assert (breaker["state"], breaker["last_transition"]["reason"]) == ("open", "probe_failed")
            assert breaker["health_may_half_open"] is False
            reopened = time.monotonic()

            # The checks keep passing; none of them ends this open interval early again.
            samples = await scrape(client, admin)
            passes = sample(samples, "sidecar_health_checks_total", upstream="db", result="pass")

            async def passes_now() -> float:
                return sample(await scrape(client, admin), "sidecar_health_checks_total", upstream="db", result="pass")

            await eventually(passes_now, until=lambda n: n >= passes + 5, timeout=2, what="five more passing checks")
            breaker = await state()
            assert time.monotonic() - reopened < open_for, "looked within the interval"
            assert breaker["state"] == "open", breaker
            async with client.get(url) as response:
                assert response.status == 503 and response.headers["x-sidecar-reason"] == "breaker_open"
            assert fails == 6, "refused by the sidecar: the failing path is not hit"
            samples = await scrape(client, admin)
            assert sample(samples, "sidecar_breaker_health_recoveries_total", upstream="db") == 1
            assert (
                sample(
                    samples, "sidecar_breaker_transitions_total", upstream="db", from_state="half_open", to_state="open"
                )
                == 1
            )

            # open_duration ends it, as it always does: half-open again, by the elapsed interval.
            breaker = await eventually(
                state, until=lambda b: b["state"] == "half_open", timeout=open_for + 2, what="half-open by time"
            )
            newest, probe_failed = breaker["recent_transitions"][:2]
            assert newest["reason"] == "open_duration_elapsed" and probe_failed["reason"] == "probe_failed"
            assert seconds_between(probe_failed["at"], newest["at"]) >= open_for - 0.001
            samples = await scrape(client, admin)
            assert sample(samples, "sidecar_breaker_health_recoveries_total", upstream="db") == 1


def seconds_between(earlier: str, later: str) -> float:
    def parse(at: str) -> datetime.datetime:
        return datetime.datetime.fromisoformat(at.replace("Z", "+00:00"))

    return (parse(later) - parse(earlier)).total_seconds()


async def test_an_elapsed_open_interval_reads_half_open_everywhere_without_a_request(tmp_path: Path) -> None:
    switch = Switch()
    async with scripted_upstream(default=switch) as upstream:
        policy = write_policy(
            tmp_path / "p.yaml",
            {"db": {"targets": [upstream.url], "breaker": {"failure_threshold": 1, "open_duration": "300ms"}}},
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as client:
            admin = admin_url(sidecar)
            async with client.get(listener_url(sidecar, "db") + "/work") as response:
                assert response.status == 503
            assert (await breakers(client, sidecar))["db"]["state"] == "open"
            hits = switch.hits

            async def state() -> str:
                return str((await breakers(client, sidecar))["db"]["state"])

            await eventually(state, until=lambda s: s == "half_open", timeout=5, what="half-open after 300 ms")
            samples = await scrape(client, admin)
            assert sample(samples, "sidecar_breaker_state", upstream="db", state="half_open") == 1
            assert (
                sample(
                    samples, "sidecar_breaker_transitions_total", upstream="db", from_state="open", to_state="half_open"
                )
                == 1
            )
            status, body = await get_json(client, admin + "/health")
            assert status == 200 and body["status"] == "degraded"
            assert switch.hits == hits, "no request moved it"
