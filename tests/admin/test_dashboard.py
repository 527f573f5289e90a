"""The live page in headless Chromium: it loads, an upstream flips to open within 2 s, a screenshot is kept."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.server import Sidecar
from tests.support.eventually import eventually
from tests.support.sidecar import admin_url, free_port, listener_url, running_sidecar, write_policy
from tests.support.tools import missing
from tests.support.upstream import scripted_upstream

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's package
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.asynccontextmanager
async def open_dashboard(
    sidecar: Sidecar, viewport: dict[str, int] | None = None
) -> AsyncIterator[tuple[Any, list[str]]]:
    """The sidecar's /dashboard in headless Chromium: the page, and the script errors it has raised so far."""
    from playwright import async_api as playwright_api  # a test dependency: missing means a broken install

    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await (browser.new_page(viewport=viewport) if viewport else browser.new_page())  # type: ignore[arg-type]
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{admin_url(sidecar)}/dashboard")
            yield page, errors
        finally:
            await browser.close()


async def routed(request: web.Request) -> web.StreamResponse:
    if request.path.startswith("/fail"):
        return web.Response(status=503, text="down")
    return web.Response(text="ok")


async def test_dashboard_shows_a_breaker_opening(tmp_path: Path, artifacts_dir: Path) -> None:

    if not Path(CHROMIUM).exists():
        missing("chromium is not installed (Debian package `chromium`)")
    dead = f"http://127.0.0.1:{free_port()}"
    check = {"path": "/health", "interval": "200ms", "timeout": "300ms", "unhealthy_threshold": 1}
    async with scripted_upstream(routed) as up, scripted_upstream(routed) as up2:
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "payments": {
                    "listen": f"127.0.0.1:{free_port()}",
                    "targets": [up.url],
                    # Its /health passes while /fail fails: a passing check would end the open interval this test
                    # starts within one check (half-open, health_check_passed); 100 in a row (20 s) keep it open.
                    "health": {**check, "healthy_threshold": 100},
                    "breaker": {"failure_threshold": 3, "open_duration": "45s"},
                    "retry": {"budget": {"ratio": 0.2, "min_per_second": 1}},
                },
                "data-service": {
                    "listen": f"127.0.0.1:{free_port()}",
                    "targets": [up2.url, dead],
                    "health": check,
                    "outlier": {"consecutive_failures": 1, "base_ejection": "60s"},
                    "retry": {"max_retries": 2, "base_delay": "10ms", "max_delay": "10ms"},
                },
                "recommendations": {
                    "listen": f"127.0.0.1:{free_port()}",
                    "targets": [up2.url],
                    "health": {**check, "path": "/fail/health", "critical": False},  # down: stays open
                    "breaker": {"failure_threshold": 2, "enforce": False},
                },
            },
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            # Some history for the page to show: traffic, a shadow-mode trip, a target ejection.
            for _ in range(4):
                async with session.get(listener_url(sidecar, "data-service") + "/") as response:
                    assert response.status == 200
            for _ in range(3):
                async with session.get(listener_url(sidecar, "recommendations") + "/fail") as response:
                    await response.read()
            for _ in range(5):
                async with session.get(listener_url(sidecar, "payments") + "/") as response:
                    await response.read()
            await eventually(lambda: all(rt.health.healthy is not None for rt in sidecar.runtimes.values()))

            async with open_dashboard(sidecar, {"width": 1280, "height": 900}) as (page, errors):
                payments = page.locator('[data-upstream="payments"]')
                await payments.wait_for(timeout=5000)
                assert await payments.get_attribute("data-state") == "closed"
                assert await page.locator('[data-upstream="recommendations"]').get_attribute("data-state") == "open"

                # Open the breaker with real failing traffic, then time how long the page takes to show it.
                for _ in range(3):
                    async with session.get(listener_url(sidecar, "payments") + "/fail") as response:
                        assert response.status == 503
                assert sidecar.runtimes["payments"].effective_state().value == "open"
                opened = time.monotonic()
                await page.wait_for_selector('[data-upstream="payments"][data-state="open"]', timeout=2000)
                shown_after = time.monotonic() - opened
                assert shown_after < 2.0
                state_text = await payments.locator('[data-role="state"]').inner_text()
                assert state_text.strip().lower() == "open"
                assert "3_failures_in_60s" in await payments.inner_text()
                assert await page.locator("#overall").inner_text() == "UNHEALTHY"
                assert "ejected" in await page.locator('[data-upstream="data-service"]').inner_text()
                # A few rejected requests, so the page shows them, then the picture a person looks at.
                for _ in range(2):
                    async with session.get(listener_url(sidecar, "payments") + "/") as response:
                        assert response.headers["x-sidecar-reason"] == "breaker_open"
                await page.wait_for_timeout(700)
                await page.screenshot(path=str(artifacts_dir / "dashboard.png"), full_page=True)
                assert errors == []


async def test_dashboard_shows_checks_half_opening_a_breaker_and_calls_deciding(tmp_path: Path) -> None:
    """Passing checks end an open interval early (half-open) and a real call closes the breaker; then, with a
    /health that passes while the calls fail, the failed probe re-opens it and the card says why checks no longer
    end the interval early."""

    if not Path(CHROMIUM).exists():
        missing("chromium is not installed (Debian package `chromium`)")
    up_now = {"/health": False, "/": False}

    async def switched(request: web.Request) -> web.StreamResponse:
        up = up_now["/health" if request.path == "/health" else "/"]
        return web.Response(text="ok") if up else web.Response(status=503, text="down")

    async with scripted_upstream(switched) as up:
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "payments": {
                    "listen": f"127.0.0.1:{free_port()}",
                    "targets": [up.url],
                    "health": {"path": "/health", "interval": "200ms", "timeout": "300ms", "healthy_threshold": 2},
                    "breaker": {"failure_threshold": 2, "open_duration": "60s"},
                    "retry": {"max_retries": 0},
                }
            },
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            url = listener_url(sidecar, "payments") + "/"

            async def call(expect: int) -> None:
                async with session.get(url) as response:
                    assert response.status == expect

            for _ in range(2):
                await call(503)
            assert sidecar.runtimes["payments"].effective_state().value == "open"
            async with open_dashboard(sidecar) as (page, errors):
                card = page.locator('[data-upstream="payments"]')
                reasons = card.locator("td.reason")
                await page.wait_for_selector('[data-upstream="payments"][data-state="open"]', timeout=5000)
                up_now.update({"/health": True, "/": True})  # back; no client request until it reads half-open
                await page.wait_for_selector('[data-upstream="payments"][data-state="half_open"]', timeout=5000)
                assert "Half-open" in await card.inner_text()
                assert (await reasons.all_inner_texts())[0] == "health_check_passed"  # newest transition first
                assert await page.locator("#overall").inner_text() == "DEGRADED"
                await call(200)  # the probe
                await page.wait_for_selector('[data-upstream="payments"][data-state="closed"]', timeout=5000)
                assert "(probe_succeeded)" in await card.inner_text()  # the card's "Closed since … (reason)"
                assert (await reasons.all_inner_texts())[:2] == ["probe_succeeded", "health_check_passed"]

                up_now["/"] = False  # the calls fail again while /health keeps passing: a shallow check
                for _ in range(2):
                    await call(503)
                await page.wait_for_selector('[data-upstream="payments"][data-state="half_open"]', timeout=5000)
                await call(503)  # the probe fails: open again, and the checks may not end it early
                await page.wait_for_selector('[data-upstream="payments"][data-state="open"]', timeout=5000)
                text = await card.inner_text()
                assert "probe_failed" in text and "checks pass but a probe failed" in text, text
                await page.wait_for_timeout(1000)  # five more passing checks: still open
                assert await card.get_attribute("data-state") == "open"
                assert errors == []


async def test_dashboard_shows_an_upstream_cooldown_and_tokens_left(tmp_path: Path, artifacts_dir: Path) -> None:
    """The rate-limit card: tokens left per limit as requests spend them, an upstream's 429 + Retry-After turning
    into a cool-down with its seconds left, and the refusals by reason."""

    if not Path(CHROMIUM).exists():
        missing("chromium is not installed (Debian package `chromium`)")

    async def exchange(request: web.Request) -> web.StreamResponse:
        if request.path == "/slow-down":
            return web.Response(status=429, text="{}", headers={"Retry-After": "30"})
        return web.Response(text="{}")

    async with scripted_upstream(exchange) as up:
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "binance": {
                    "listen": f"127.0.0.1:{free_port()}",
                    "targets": [up.url],
                    "rate_limit": {
                        "limits": [{"requests": 10, "per": "1m"}, {"requests": 1200, "per": "1m", "window": "fixed"}]
                    },
                }
            },
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            url = listener_url(sidecar, "binance")
            for _ in range(3):
                async with session.get(url + "/api/v3/ticker") as response:
                    assert response.status == 200
            async with open_dashboard(sidecar, {"width": 1280, "height": 700}) as (page, errors):
                box = page.locator('[data-upstream="binance"] [data-role="rate-limit"]')
                await box.wait_for(timeout=5000)
                text = await box.inner_text()
                assert "7 left" in text and "10 / 60s sliding" in text, text
                assert "sending" in text and "local" in text

                async with session.get(url + "/slow-down") as response:
                    assert response.status == 429 and response.headers["Retry-After"] == "30"
                async with session.get(url + "/api/v3/ticker") as response:
                    assert response.headers["x-sidecar-reason"] == "upstream_cooldown"
                cooldown = box.locator('[data-role="cooldown"]')
                await cooldown.wait_for(timeout=2000)
                left = int((await cooldown.inner_text()).split("·")[1].split("s")[0])
                assert 28 <= left <= 30
                assert "upstream_cooldown 1" in await box.inner_text()
                await page.screenshot(path=str(artifacts_dir / "dashboard-rate-limit.png"), full_page=True)
                assert errors == []


async def test_dashboard_shows_a_grpc_upstreams_calls_by_status(tmp_path: Path, artifacts_dir: Path) -> None:
    """A gRPC upstream's card: marked gRPC, its calls counted by the grpc-status their callers got."""
    import grpc

    from tests.support.grpc_echo import generate_stubs, running_echo

    if not Path(CHROMIUM).exists():
        missing("chromium is not installed (Debian package `chromium`)")
    pb2, pb2_grpc = generate_stubs(tmp_path / "stubs")
    async with running_echo(pb2, pb2_grpc) as echo:
        listen = f"127.0.0.1:{free_port()}"
        policy = write_policy(
            tmp_path / "p.yaml", {"model": {"protocol": "grpc", "listen": listen, "targets": [echo.target]}}
        )
        async with running_sidecar(policy) as sidecar, grpc.aio.insecure_channel(listen) as channel:
            stub = pb2_grpc.EchoStub(channel)
            for _ in range(3):
                await stub.Unary(pb2.Msg(data=b"ok"))
            for code in (5, 5, 14):  # NOT_FOUND twice, UNAVAILABLE once
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.Unary(pb2.Msg(fail_code=code))
            async with open_dashboard(sidecar, {"width": 1280, "height": 700}) as (page, errors):
                statuses = page.locator('[data-upstream="model"] [data-role="grpc-statuses"]')
                await statuses.wait_for(timeout=5000)
                assert await statuses.inner_text() == "3 ok · NOT_FOUND 2 · UNAVAILABLE 1"
                assert await page.locator('[data-upstream="model"] [data-role="protocol"]').inner_text() == "gRPC"
                await page.screenshot(path=str(artifacts_dir / "dashboard-grpc.png"), full_page=True)
                assert errors == []
