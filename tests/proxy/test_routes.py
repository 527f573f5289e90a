"""Per-upstream routes through a real listener to a real upstream: first match wins, methods, the query string
ignored, and the breaker still the upstream's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.support.sidecar import listener_url, running_sidecar, write_policy
from tests.support.upstream import scripted_upstream

UPSTREAM_TIMEOUTS = {"connect": "200ms", "per_try": "300ms", "total": "600ms"}


async def _long_poll(request: web.Request) -> web.StreamResponse:
    """Holds the request for ``wait`` seconds (a long poll), then answers."""
    await asyncio.sleep(float(request.query.get("wait", "0")))
    return web.json_response({"path": request.path, "method": request.method})


async def test_a_long_poll_through_a_route_succeeds_where_the_upstream_policy_gives_504(tmp_path: Path) -> None:
    async with scripted_upstream(default=_long_poll) as upstream:
        long_poll = {
            "name": "long-poll",
            "match": {"path": "/poll"},
            "timeouts": {"per_try": "3s", "total": "3s"},
        }
        policy = write_policy(
            tmp_path / "p.yaml",
            {
                "routed": {"targets": [upstream.url], "routes": [long_poll]},
                "plain": {"targets": [upstream.url]},
            },
            defaults={"timeouts": UPSTREAM_TIMEOUTS},
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            async with session.get(upstream.url + "/poll?wait=1") as direct:
                assert direct.status == 200
                expected = await direct.json()
            async with session.get(listener_url(sidecar, "routed") + "/poll?wait=1") as response:
                assert response.status == 200 and await response.json() == expected
            async with session.get(listener_url(sidecar, "plain") + "/poll?wait=1") as response:
                assert response.status == 504
                assert response.headers["x-sidecar-decision"].startswith("upstream=plain reason=timeout")
            # Past the route's own per_try: its 504 names the route.
            async with session.get(listener_url(sidecar, "routed") + "/poll?wait=4") as response:
                assert response.status == 504
                assert response.headers["x-sidecar-decision"].startswith(
                    "upstream=routed route=long-poll reason=timeout"
                )
            # Another path of the same upstream has the upstream's policy.
            async with session.get(listener_url(sidecar, "routed") + "/other?wait=1") as response:
                assert response.status == 504
                assert "route=" not in response.headers["x-sidecar-decision"]
            assert sidecar.runtimes["routed"].stats.failures == {"timeout": 2}


async def test_first_match_wins_and_methods_narrow_a_route(tmp_path: Path) -> None:
    async with scripted_upstream(default=_long_poll) as upstream:
        routes = [
            {"name": "quick-writes", "match": {"path_prefix": "/items/", "methods": ["PUT", "delete"]},
             "timeouts": {"per_try": "200ms"}},
            {"name": "slow-items", "match": {"path_prefix": "/items/"}, "timeouts": {"per_try": "3s", "total": "3s"}},
            {"name": "never", "match": {"path_prefix": "/items/x"}, "timeouts": {"per_try": "250ms"}},
        ]  # fmt: skip
        policy = write_policy(
            tmp_path / "p.yaml",
            {"svc": {"targets": [upstream.url], "routes": routes}},
            defaults={"timeouts": UPSTREAM_TIMEOUTS},
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            url = listener_url(sidecar, "svc")
            # GET /items/x…: not a quick write (method), so slow-items, before the later and narrower "never".
            async with session.get(f"{url}/items/x1?wait=0.6") as response:
                assert response.status == 200
            async with session.put(f"{url}/items/x1?wait=0.6") as response:
                assert response.status == 504
                assert "route=quick-writes reason=timeout" in response.headers["x-sidecar-decision"]
            async with session.delete(f"{url}/items/1?wait=0.6") as response:
                assert response.status == 504
                assert "route=quick-writes" in response.headers["x-sidecar-decision"]
            # A path the prefix does not cover (/items without the slash): the upstream's per_try, 300 ms.
            async with session.get(f"{url}/items?wait=0.6") as response:
                assert response.status == 504 and "route=" not in response.headers["x-sidecar-decision"]
            rt = sidecar.runtimes["svc"]
            assert rt.stats.failures == {"timeout": 3}
            # One breaker for the upstream, whatever the routes: it counted all three.
            assert rt.breaker.snapshot(rt.clock.monotonic()).failures_in_window == 3


async def test_a_route_retries_by_its_own_rules(tmp_path: Path) -> None:
    """The upstream retries nothing; a route retries its POSTs on 503 (the budget stays the upstream's)."""
    async with scripted_upstream() as upstream:

        async def unavailable(_: web.Request) -> web.StreamResponse:
            return web.Response(status=503, text="busy")

        routes = [{"match": {"path": "/jobs", "methods": ["POST"]}, "retry": {"max_retries": 2, "methods": ["POST"]}}]
        policy = write_policy(tmp_path / "p.yaml", {"svc": {"targets": [upstream.url], "routes": routes}})
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            url = listener_url(sidecar, "svc")
            upstream.then(unavailable, unavailable)
            async with session.post(f"{url}/jobs", data=b"{}") as response:
                assert response.status == 200 and response.headers["x-sidecar-attempts"] == "3"
            upstream.then(unavailable)
            async with session.post(f"{url}/other", data=b"{}") as response:
                assert response.status == 503 and "x-sidecar-attempts" not in response.headers
            assert upstream.hits == 4
            assert sidecar.runtimes["svc"].stats.retries == 2
