"""Breaker control: bearer token, foreign origins, unknown names, overrides with a ttl, and their log lines."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.admin import get_json
from tests.support.eventually import eventually
from tests.support.sidecar import admin_url, free_port, listener_url, running_sidecar, write_policy
from tests.support.upstream import scripted_upstream, status


async def test_token_guards_mutating_calls(tmp_path: Path, token: str) -> None:
    async with scripted_upstream() as up:
        policy = write_policy(tmp_path / "p.yaml", {"pay": {"listen": f"127.0.0.1:{free_port()}", "targets": [up.url]}})
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            url = f"{admin_url(sidecar)}/breakers/pay/force-open"
            async with session.post(url) as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
                assert (await response.json())["error"] == "token_required"
            async with session.post(url, headers={"Authorization": "Bearer not-the-token"}) as response:
                assert response.status == 403 and (await response.json())["error"] == "wrong_token"
            assert sidecar.runtimes["pay"].breaker.override is None  # refused calls changed nothing
            auth = {"Authorization": f"Bearer {token}"}
            async with session.post(f"{admin_url(sidecar)}/breakers/nope/force-open", headers=auth) as response:
                assert response.status == 404 and (await response.json())["error"] == "unknown_upstream"
            async with session.post(url, headers={**auth, "Origin": "http://evil.example"}) as response:
                assert response.status == 403 and (await response.json())["error"] == "foreign_origin"
            # Same-origin by Host, but a DNS name (rebinding) is not a page this server served.
            async with session.post(
                url, headers={**auth, "Origin": "http://rebound.example:1", "Host": "rebound.example:1"}
            ) as response:
                assert response.status == 403
            assert sidecar.runtimes["pay"].breaker.override is None
            async with session.post(url, headers=auth) as response:
                assert response.status == 200
                body = await response.json()
                assert body["breaker"]["state"] == "open" and body["breaker"]["override"] == "force_open"
            # The override is what clients now get, explained.
            async with session.get(listener_url(sidecar, "pay") + "/") as response:
                assert response.status == 503
                assert response.headers["x-sidecar-reason"] == "breaker_open"
                assert "reason=forced_open" in response.headers["x-sidecar-decision"]
            assert up.hits == 0
            async with session.post(f"{admin_url(sidecar)}/breakers/pay/reset", headers=auth) as response:
                assert response.status == 200 and (await response.json())["breaker"]["state"] == "closed"
            async with session.get(listener_url(sidecar, "pay") + "/") as response:
                assert response.status == 200
            async with session.post(f"{admin_url(sidecar)}/breakers/pay/explode", headers=auth) as response:
                assert response.status == 404
            async with session.post(url + "?ttl=soon", headers=auth) as response:
                assert response.status == 400 and (await response.json())["error"] == "invalid_ttl"


async def test_force_open_with_ttl_ends_by_itself_and_is_logged(
    tmp_path: Path, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with scripted_upstream() as up:
        policy = write_policy(tmp_path / "p.yaml", {"pay": {"listen": f"127.0.0.1:{free_port()}", "targets": [up.url]}})
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            admin = admin_url(sidecar)
            auth = {"Authorization": f"Bearer {token}", "X-Operator": "alice"}
            async with session.post(f"{admin}/breakers/pay/force-open", json={"ttl": "1s"}, headers=auth) as r:
                assert r.status == 200
                body = await r.json()
            forced_at = time.monotonic()
            assert body["ttl_seconds"] == 1.0 and body["breaker"]["override_until"]
            _, breakers = await get_json(session, f"{admin}/breakers")
            assert breakers["pay"]["state"] == "open" and breakers["pay"]["override"] == "force_open"
            async with session.get(listener_url(sidecar, "pay") + "/") as response:
                assert response.status == 503 and "retry-after" in response.headers
            # Nobody touches it again: it must end on its own, shortly after 1 s.
            _, breakers = await eventually(
                lambda: get_json(session, f"{admin}/breakers"),
                until=lambda answer: answer[1]["pay"]["state"] == "closed",
                timeout=3.0 - (time.monotonic() - forced_at),
                interval=0.05,
                what="the forced-open breaker closing by itself within 3 s of the override",
            )
            assert time.monotonic() - forced_at >= 0.95
            assert breakers["pay"]["override"] is None
            async with session.get(listener_url(sidecar, "pay") + "/") as response:
                assert response.status == 200
            ended = await eventually(
                lambda: [r for r in caplog.records if getattr(r, "event", None) == "breaker_override_ended"],
                timeout=2,
                interval=0.05,
                what="a breaker_override_ended log record",
            )
            assert ended and ended[0].upstream == "pay"  # type: ignore[attr-defined]
        override = [r for r in caplog.records if getattr(r, "event", None) == "breaker_override"]
        assert len(override) == 1
        record = override[0]
        assert record.action == "force-open" and record.ttl_seconds == 1.0  # type: ignore[attr-defined]
        assert record.operator == "alice" and record.by == "127.0.0.1"  # type: ignore[attr-defined]


async def test_force_close_lets_traffic_through_an_open_breaker(tmp_path: Path, token: str) -> None:
    async with scripted_upstream() as up:
        up.then(status(500), status(500))
        policy = write_policy(
            tmp_path / "p.yaml",
            {"pay": {"listen": f"127.0.0.1:{free_port()}", "targets": [up.url], "breaker": {"failure_threshold": 2}}},
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            pay = listener_url(sidecar, "pay") + "/"
            for _ in range(2):
                async with session.get(pay) as response:
                    assert response.status == 500
            async with session.get(pay) as response:
                assert response.headers["x-sidecar-reason"] == "breaker_open"
            auth = {"Authorization": f"Bearer {token}"}
            async with session.post(f"{admin_url(sidecar)}/breakers/pay/force-close?ttl=30s", headers=auth) as r:
                body = await r.json()
                assert r.status == 200 and body["breaker"]["override"] == "force_close"
                assert body["breaker"]["state"] == "closed" and body["breaker"]["machine_state"] == "open"
            async with session.get(pay) as response:
                assert response.status == 200
            assert up.hits == 3
