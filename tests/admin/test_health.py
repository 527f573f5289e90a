"""/health in its four cases, /ready, /live, and active checks that run without traffic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.admin import get_json
from tests.support.eventually import eventually
from tests.support.sidecar import admin_url, free_port, listener_url, running_sidecar, write_policy
from tests.support.upstream import scripted_upstream

FAST_CHECK = {"path": "/health", "interval": "100ms", "timeout": "500ms", "unhealthy_threshold": 1}
# For an upstream whose /health passes while its calls fail: a passing check would end the open interval early
# (half-open) within one interval; 1000 in a row (100 s) keep the breaker these tests open, open.
SHALLOW_CHECK = {**FAST_CHECK, "healthy_threshold": 1000}


async def health_ok_root_fails(request: web.Request) -> web.StreamResponse:
    """An upstream whose health endpoint passes while its real traffic fails."""
    if request.path == "/health":
        return web.Response(text="ok")
    return web.Response(status=500, text="boom")


async def poll_health(session: aiohttp.ClientSession, admin: str, want: str, timeout: float = 5.0) -> tuple[int, Any]:
    """/health's (code, body) once its status is ``want``."""
    return await eventually(
        lambda: get_json(session, f"{admin}/health"),
        until=lambda answer: answer[1]["status"] == want,
        timeout=timeout,
        interval=0.05,
        what=f"/health {want}",
    )


async def trip(session: aiohttp.ClientSession, url: str, times: int) -> None:
    for _ in range(times):
        async with session.get(url) as response:
            await response.read()


async def test_all_healthy_is_200(tmp_path: Path) -> None:
    async with scripted_upstream() as up1, scripted_upstream() as up2:
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "pay": {"listen": f"127.0.0.1:{free_port()}", "targets": [up1.url], "health": FAST_CHECK},
                "ledger": {
                    "listen": f"127.0.0.1:{free_port()}",
                    "targets": [up2.url],
                    "health": {**FAST_CHECK, "critical": False},
                },
            },
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            admin = admin_url(sidecar)
            await eventually(lambda: all(rt.health.healthy for rt in sidecar.runtimes.values()))
            code, body = await poll_health(session, admin, "healthy")
            assert code == 200
            assert set(body["circuit_breakers"]) == {"pay", "ledger"}
            check = body["checks"]["pay"]
            assert check["healthy"] is True and check["latency_ms"] > 0 and check["checked_at"]
            assert body["circuit_breakers"]["pay"]["state"] == "closed"
            assert body["timestamp"].endswith("Z")
            # Checks ran with no client traffic at all.
            assert up1.hits >= 1 and all(r.path == "/health" for r in up1.requests)
            async with session.get(f"{admin}/ready") as ready:
                assert ready.status == 200 and (await ready.json()) == {"ready": True}
            async with session.get(f"{admin}/live") as live:
                assert live.status == 200 and (await live.json())["live"] is True


async def test_non_critical_upstream_open_is_200_degraded(tmp_path: Path) -> None:
    async with scripted_upstream() as good, scripted_upstream(health_ok_root_fails) as flaky:
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "pay": {"listen": f"127.0.0.1:{free_port()}", "targets": [good.url], "health": FAST_CHECK},
                "recs": {
                    "listen": f"127.0.0.1:{free_port()}",
                    "targets": [flaky.url],
                    "health": {**SHALLOW_CHECK, "critical": False},
                    "breaker": {"failure_threshold": 2},
                },
            },
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            admin = admin_url(sidecar)
            await poll_health(session, admin, "healthy")
            await trip(session, listener_url(sidecar, "recs") + "/", 2)
            code, body = await poll_health(session, admin, "degraded")
            assert code == 200
            recs = body["circuit_breakers"]["recs"]
            assert recs["state"] == "open" and recs["critical"] is False
            assert recs["last_transition"]["reason"] == "2_failures_in_60s"
            assert recs["last_transition"]["from"] == "closed" and recs["last_transition"]["to"] == "open"
            assert 0 < recs["retry_in"] <= 60
            assert body["checks"]["recs"]["healthy"] is True


async def test_critical_upstream_failing_its_check_without_traffic_is_503(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    async with scripted_upstream() as good:
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "pay": {"listen": f"127.0.0.1:{free_port()}", "targets": [dead], "health": FAST_CHECK},
                "ledger": {"listen": f"127.0.0.1:{free_port()}", "targets": [good.url], "health": FAST_CHECK},
            },
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            code, body = await poll_health(session, admin_url(sidecar), "unhealthy")
            assert code == 503
            check = body["checks"]["pay"]
            assert check["healthy"] is False and check["critical"] is True
            assert "ConnectionRefusedError" in check["detail"]
            # Active checks never count against the breaker.
            pay = body["circuit_breakers"]["pay"]
            assert pay["state"] == "closed" and pay["failures"] == 0 and pay["totals"]["failures"] == 0
            await eventually(lambda: sidecar.runtimes["pay"].stats.checks.get("fail", 0) >= 3)
            assert sidecar.runtimes["pay"].breaker.snapshot(0).total_failures == 0


async def test_critical_breaker_open_is_503_even_with_passing_check(tmp_path: Path) -> None:
    async with scripted_upstream(health_ok_root_fails) as flaky:
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "pay": {
                    "listen": f"127.0.0.1:{free_port()}",
                    "targets": [flaky.url],
                    "health": SHALLOW_CHECK,
                    "breaker": {"failure_threshold": 3},
                },
            },
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            admin = admin_url(sidecar)
            await poll_health(session, admin, "healthy")
            await trip(session, listener_url(sidecar, "pay") + "/", 3)
            code, body = await poll_health(session, admin, "unhealthy")
            assert code == 503
            assert body["checks"]["pay"]["healthy"] is True
            assert body["circuit_breakers"]["pay"]["state"] == "open"


async def test_admin_paths_are_not_served_on_listeners(tmp_path: Path) -> None:
    async with scripted_upstream() as up:
        policy = write_policy(tmp_path / "p.yaml", {"pay": {"listen": f"127.0.0.1:{free_port()}", "targets": [up.url]}})
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            for path in ("/health", "/metrics", "/breakers"):
                async with session.get(listener_url(sidecar, "pay") + path) as response:
                    assert response.status == 200 and await response.text() == "ok"
            assert [r.path for r in up.requests] == ["/health", "/metrics", "/breakers"]
