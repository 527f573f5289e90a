"""Recovery without traffic, through a real sidecar and a real upstream: passing active checks close an open
breaker and /health turns 200 with no client request; without checks, an elapsed open interval reads half-open."""

from __future__ import annotations

import logging
from pathlib import Path

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


async def test_passing_checks_close_the_breaker_and_health_recovers_with_no_traffic(
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
            switch.up = True  # the upstream is back; from here on no client sends a request

            async def health_status() -> int:
                status, _ = await get_json(client, admin + "/health")
                return status

            # Two passing checks at 200 ms (±10%) apart: well within a second of the recovery, not open_duration.
            await eventually(health_status, until=lambda s: s == 200, timeout=5, what="/health 200 again")
            breaker = (await breakers(client, sidecar))["db"]
            assert breaker["state"] == "closed"
            assert breaker["last_transition"]["reason"] == "health_check_passed"
            assert breaker["last_transition"]["from"] == "open"
            samples = await scrape(client, admin)
            assert sample(samples, "sidecar_breaker_health_recoveries_total", upstream="db") == 1
            assert sample(samples, "sidecar_breaker_state", upstream="db", state="closed") == 1
            assert switch.hits == hits, "recovered with no client traffic"
            lines = [r for r in caplog.records if getattr(r, "event", None) == "breaker_transition"]
            assert any(getattr(r, "reason", None) == "health_check_passed" for r in lines), caplog.text
            async with client.get(listener_url(sidecar, "db") + "/work") as response:
                assert response.status == 200, "requests flow again at once"


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
