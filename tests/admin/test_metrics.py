"""/metrics agrees with what clients and upstreams counted; shadow mode; explained rejections; real Prometheus."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.metrics import METRICS
from tests.support.admin import get_json, sample, scrape
from tests.support.eventually import eventually
from tests.support.servers import prometheus_server
from tests.support.sidecar import admin_url, free_port, listener_url, running_sidecar, write_policy
from tests.support.upstream import scripted_upstream


async def status_from_path(request: web.Request) -> web.StreamResponse:
    """``/s/404`` answers 404, and so on."""
    code = int(request.path.rsplit("/", 1)[-1]) if request.path.startswith("/s/") else 200
    return web.Response(status=code, text=f"status {code}")


async def test_metrics_counters_equal_what_client_and_upstream_counted(tmp_path: Path) -> None:
    async with scripted_upstream(status_from_path) as up:
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "pay": {"listen": f"127.0.0.1:{free_port()}", "targets": [up.url], "breaker": {"failure_threshold": 4}},
            },
        )
        plan = ["/s/200"] * 9 + ["/s/404"] * 3 + ["/s/201"] * 2 + ["/s/503"] * 4 + ["/s/200"] * 5
        client_codes: collections.Counter[int] = collections.Counter()
        reasons: collections.Counter[str] = collections.Counter()
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            for path in plan:
                async with session.get(listener_url(sidecar, "pay") + path) as response:
                    await response.read()
                    client_codes[response.status] += 1
                    if "x-sidecar-reason" in response.headers:
                        reasons[response.headers["x-sidecar-reason"]] += 1
            upstream_codes = collections.Counter(int(r.path.rsplit("/", 1)[-1]) for r in up.requests)
            samples = await scrape(session, admin_url(sidecar))
        # The 4th 503 trips the breaker: the last five requests never reached the upstream.
        assert upstream_codes == {200: 9, 404: 3, 201: 2, 503: 4}
        assert client_codes == {200: 9, 404: 3, 201: 2, 503: 9}
        assert reasons == {"breaker_open": 5}
        for code, count in client_codes.items():
            assert sample(samples, "sidecar_requests_total", upstream="pay", code=str(code)) == count
        assert sample(samples, "sidecar_request_duration_seconds_count", upstream="pay") == len(plan)
        assert sample(samples, "sidecar_request_duration_seconds_bucket", upstream="pay", le="+Inf") == len(plan)
        assert sample(samples, "sidecar_upstream_failures_total", upstream="pay", kind="5xx") == 4
        assert sample(samples, "sidecar_rejected_total", upstream="pay", reason="breaker_open") == 5
        assert sample(samples, "sidecar_retries_total", upstream="pay") == 0
        assert sample(samples, "sidecar_breaker_state", upstream="pay", state="open") == 1
        assert sample(samples, "sidecar_breaker_state", upstream="pay", state="closed") == 0
        assert (
            sample(samples, "sidecar_breaker_transitions_total", upstream="pay", from_state="closed", to_state="open")
            == 1
        )
        assert sample(samples, "sidecar_inflight_requests", upstream="pay") == 0
        assert sample(samples, "sidecar_config_reloads_total", result="success") == 0
        # Every sidecar_ family exported is declared in the one table (process_/python_ ones are the client
        # library's standard collectors).
        exported = {name for name, _ in samples if not name.startswith(("process_", "python_"))}
        declared = set(METRICS)
        assert "process_start_time_seconds" in {name for name, _ in samples}
        for name in exported:
            assert any(name == d or name.startswith(d.removesuffix("_total")) for d in declared), name


async def test_retries_counted_once_per_extra_attempt(tmp_path: Path) -> None:
    async with scripted_upstream() as up:

        async def fail(_: web.Request) -> web.StreamResponse:
            return web.Response(status=503)

        up.then(fail, fail)
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "pay": {
                    "listen": f"127.0.0.1:{free_port()}",
                    "targets": [up.url],
                    "retry": {"max_retries": 3, "base_delay": "10ms", "max_delay": "20ms"},
                },
            },
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            async with session.get(listener_url(sidecar, "pay") + "/") as response:
                assert response.status == 200 and response.headers["x-sidecar-attempts"] == "3"
            samples = await scrape(session, admin_url(sidecar))
        assert up.hits == 3
        assert sample(samples, "sidecar_retries_total", upstream="pay") == up.hits - 1
        assert sample(samples, "sidecar_requests_total", upstream="pay", code="200") == 1
        assert sample(samples, "sidecar_upstream_failures_total", upstream="pay", kind="5xx") == 2


async def test_shadow_mode_never_rejects_but_counts(tmp_path: Path) -> None:
    async with scripted_upstream(status_from_path) as up:
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "pay": {
                    "listen": f"127.0.0.1:{free_port()}",
                    "targets": [up.url],
                    "breaker": {"failure_threshold": 2, "enforce": False},
                },
            },
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            seen = []
            for _ in range(7):
                async with session.get(listener_url(sidecar, "pay") + "/s/500") as response:
                    await response.read()
                    seen.append(response.status)
                    assert "x-sidecar-reason" not in response.headers
            admin = admin_url(sidecar)
            samples = await scrape(session, admin)
            code, health = await get_json(session, f"{admin}/health")
        assert seen == [500] * 7 and up.hits == 7  # every request reached the upstream
        assert sample(samples, "sidecar_rejected_total", upstream="pay", reason="breaker_open_shadow") == 5
        assert sample(samples, "sidecar_rejected_total", upstream="pay", reason="breaker_open") == 0
        assert sample(samples, "sidecar_breaker_state", upstream="pay", state="open") == 1
        breaker = health["circuit_breakers"]["pay"]
        assert breaker["state"] == "open" and breaker["enforce"] is False
        assert breaker["rejected"] == {"breaker_open_shadow": 5}
        # An open breaker that rejects nothing does not make the service unhealthy, only degraded.
        assert code == 200 and health["status"] == "degraded"


async def test_local_answers_explain_the_decision(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with scripted_upstream(status_from_path) as up:
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "pay": {
                    "listen": f"127.0.0.1:{free_port()}",
                    "targets": [up.url],
                    "breaker": {"failure_threshold": 2, "open_duration": "7s"},
                },
                "gone": {"listen": f"127.0.0.1:{free_port()}", "targets": [dead]},
            },
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            for _ in range(2):
                async with session.get(listener_url(sidecar, "pay") + "/s/502") as response:
                    assert response.status == 502 and "x-sidecar-decision" not in response.headers
            async with session.get(listener_url(sidecar, "pay") + "/s/200") as response:
                assert response.status == 503
                decision = dict(part.split("=", 1) for part in response.headers["x-sidecar-decision"].split())
                assert decision == {"upstream": "pay", "state": "open", "reason": "2_failures_in_60s", "retry_in": "7s"}
                assert response.headers["retry-after"] == "7"
            async with session.get(listener_url(sidecar, "gone") + "/") as response:
                assert response.status == 502
                assert response.headers["x-sidecar-reason"] == "connect_error"
                assert "upstream=gone reason=connect_error" in response.headers["x-sidecar-decision"]


async def test_prometheus_sees_the_tripped_breaker(tmp_path: Path) -> None:
    async with scripted_upstream(status_from_path) as up:
        admin_port = free_port()
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "pay": {"listen": f"127.0.0.1:{free_port()}", "targets": [up.url], "breaker": {"failure_threshold": 2}},
                "ledger": {"listen": f"127.0.0.1:{free_port()}", "targets": [up.url]},
            },
            admin_port=admin_port,
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            # Prometheus starts while the sidecar is up; trip after, so the scrape must see the change.
            with prometheus_server(tmp_path, admin_port) as prometheus:
                for _ in range(2):
                    async with session.get(listener_url(sidecar, "pay") + "/s/500") as response:
                        await response.read()
                assert sidecar.runtimes["pay"].effective_state().value == "open"
                query = 'sidecar_breaker_state{state="open"}'

                async def query_result() -> list[dict[str, Any]]:
                    async with session.get(f"{prometheus}/api/v1/query", params={"query": query}) as response:
                        found: list[dict[str, Any]] = (await response.json())["data"]["result"]
                        return found

                def by_upstream_of(result: list[dict[str, Any]]) -> dict[str, str]:
                    return {r["metric"]["upstream"]: r["value"][1] for r in result}

                result = await eventually(
                    query_result,
                    until=lambda result: by_upstream_of(result).get("pay") == "1",
                    timeout=15,
                    interval=0.2,
                    what="Prometheus seeing the breaker open",
                )
                by_upstream = by_upstream_of(result)
                assert by_upstream["ledger"] == "0"
                assert result[0]["metric"]["job"] == "seawall-sidecar"
                async with session.get(f"{prometheus}/api/v1/targets") as response:
                    targets = (await response.json())["data"]["activeTargets"]
                assert [t["health"] for t in targets] == ["up"]
