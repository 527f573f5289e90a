"""The admin server: /health /ready /live /metrics /breakers /dashboard, on ``admin.listen`` only.

Why a thread of its own: operators and Kubernetes probe /health and Prometheus scrapes /metrics exactly when
the proxy is busiest. On the data plane's event loop an admin request waits behind every ready listener
callback (measured: ~20 ms median, >60 ms worst case at 64 saturating connections on 2 cores), so the admin
server runs its own event loop on a dedicated thread and accepts, parses and answers there.

Why reports are still built on the data plane's loop: the breakers, counters and pools are plain objects
mutated by that loop without locks. The admin thread asks the main loop for a fresh report and waits at most
``FRESH_WAIT``; if the main loop is too busy to answer in time, it serves the report the main loop published
last (refreshed every ``PUBLISH_INTERVAL``), marked ``x-seawall-report: cached`` with its age. Mutating calls
always run on the main loop and wait for it.

Mutating calls (POST /breakers/{name}/reset|force-open|force-close) need ``Authorization: Bearer <token>``
when the environment variable named by ``admin.token_env`` is set; the token is compared in constant time,
and a request carrying a foreign ``Origin`` is refused, so a web page open on the same host cannot steer a
breaker. Every override is logged with who, when and for how long, and again when its ttl ends it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from proxy.metrics import SidecarCollector
from proxy.policy.values import Address, parse_duration
from proxy.reports import SidecarState, breakers_report, health_report
from proxy.resilience.breaker import Override

log = logging.getLogger("seawall.admin")

_STATIC = Path(__file__).with_name("static")
T = TypeVar("T")

FRESH_WAIT = 0.01  # longest wait for the main loop before a cached report is served instead
PUBLISH_INTERVAL = 0.25  # how often the main loop refreshes the cached reports (and its heartbeat)
LIVE_STALL = 10.0  # /live fails when the main loop has not ticked for this long: a wedged data plane
SWITCH_INTERVAL = 0.001  # GIL hand-over bound; only matters while the admin thread is waiting for the GIL


# -- the server ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Cached:
    value: Any
    at: float  # monotonic


class AdminServer:
    """The admin HTTP server on its own thread and event loop (see the module docstring for why)."""

    def __init__(self, sidecar: SidecarState, address: Address) -> None:
        self.sidecar = sidecar
        self.address = address
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(
            SidecarCollector(lambda: [rt.view() for rt in sidecar.runtimes.values()], sidecar.process_stats)
        )
        # process_start_time_seconds, RSS, open fds: what the container-restart and leak alerts look at.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._main: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._cache: dict[str, _Cached] = {}
        self._heartbeat = time.monotonic()
        self._override_timers: dict[str, asyncio.TimerHandle] = {}

    # -- lifecycle (called on the main loop) ----------------------------------------------------------------

    async def start(self) -> None:
        self._main = asyncio.get_running_loop()
        self._publish()
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._serve, args=(started,), name="seawall-admin", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(started)  # re-raises a bind error (OSError) here, in the caller
        if sys.getswitchinterval() > SWITCH_INTERVAL:
            # A waiting thread gets the GIL after at most this long (default 5 ms, several waits per request).
            sys.setswitchinterval(SWITCH_INTERVAL)
        self._publisher = self._main.create_task(self._publish_forever())

    async def cleanup(self) -> None:
        """Stop accepting, finish admin requests in flight, stop the thread. (Named like AppRunner.cleanup.)"""
        if self._publisher is not None:
            self._publisher.cancel()
        for timer in self._override_timers.values():
            timer.cancel()
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop))
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join, 5.0)

    def _serve(self, started: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=2.0)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.address.host, self.address.port, reuse_address=True)
            loop.run_until_complete(site.start())
        except BaseException as exc:
            started.set_exception(exc)
            loop.close()
            return
        self._runner = runner
        started.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    # -- the main loop's side -------------------------------------------------------------------------------

    def _publish(self) -> None:
        now = time.monotonic()
        self._heartbeat = now
        self._cache["health"] = _Cached(health_report(self.sidecar), now)
        self._cache["breakers"] = _Cached(breakers_report(self.sidecar), now)
        self._cache["metrics"] = _Cached(generate_latest(self.registry), now)

    async def _publish_forever(self) -> None:
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL)
            try:
                self._publish()
            except Exception:
                log.exception("admin reports could not be built", extra={"event": "admin_error"})

    async def _on_main(self, fn: Callable[[], T], wait: float | None) -> T:
        """Run ``fn`` on the main loop and wait for it (at most ``wait`` seconds: then TimeoutError)."""
        assert self._main is not None
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not result.set_running_or_notify_cancel():
                return  # the admin side gave up already
            try:
                result.set_result(fn())
            except BaseException as exc:
                result.set_exception(exc)

        self._main.call_soon_threadsafe(run)
        waiter = asyncio.wrap_future(result)
        if wait is None:
            return await waiter
        return await asyncio.wait_for(waiter, wait)

    async def _report(self, kind: str, build: Callable[[], Any]) -> tuple[Any, dict[str, str]]:
        """A fresh report if the main loop answers within FRESH_WAIT, else the last published one."""
        try:
            value = await self._on_main(build, FRESH_WAIT)
        except TimeoutError:
            cached = self._cache[kind]
            age = max(0.0, time.monotonic() - cached.at)
            return cached.value, {"x-seawall-report": "cached", "x-seawall-report-age-ms": f"{age * 1000:.0f}"}
        self._cache[kind] = _Cached(value, time.monotonic())
        return value, {"x-seawall-report": "fresh"}

    # -- handlers (run on the admin thread) -----------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/live", self._live)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/breakers", self._breakers)
        app.router.add_post("/breakers/{name}/{action}", self._control)
        app.router.add_get("/dashboard", self._dashboard)
        app.router.add_get("/", self._index)
        return app

    async def _health(self, _: web.Request) -> web.Response:
        (code, body), headers = await self._report("health", lambda: health_report(self.sidecar))
        return web.json_response(body, status=code, headers={"cache-control": "no-store", **headers})

    async def _ready(self, _: web.Request) -> web.Response:
        sidecar = self.sidecar
        # Plain attribute reads: safe from this thread without a round trip to the main loop.
        ready = (
            sidecar.ready
            and sidecar.config is not None
            and all(name in sidecar.listeners for name in list(sidecar.runtimes))
        )
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def _live(self, _: web.Request) -> web.Response:
        # Answered here, but a main loop that stopped ticking (a wedged data plane) makes it fail.
        stalled = time.monotonic() - self._heartbeat
        live = stalled < LIVE_STALL
        return web.json_response(
            {"live": live, "main_loop_heartbeat_age_seconds": round(stalled, 3)}, status=200 if live else 503
        )

    async def _metrics(self, _: web.Request) -> web.Response:
        body, headers = await self._report("metrics", lambda: generate_latest(self.registry))
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST, **headers})

    async def _breakers(self, _: web.Request) -> web.Response:
        body, headers = await self._report("breakers", lambda: breakers_report(self.sidecar))
        return web.json_response(body, headers={"cache-control": "no-store", **headers})

    async def _index(self, _: web.Request) -> web.Response:
        raise web.HTTPFound("/dashboard")

    async def _dashboard(self, _: web.Request) -> web.StreamResponse:
        page = _STATIC / "dashboard.html"
        if not page.exists():
            raise web.HTTPNotFound(text="dashboard not built")
        return web.FileResponse(
            page,
            headers={
                "cache-control": "no-store",
                # The page loads nothing from elsewhere; say so, so an injected script could not either.
                "content-security-policy": "default-src 'self'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
                "x-content-type-options": "nosniff",
            },
        )

    async def _control(self, request: web.Request) -> web.Response:
        self._authorize(request)
        name, action = request.match_info["name"], request.match_info["action"]
        if action not in ("reset", "force-open", "force-close"):
            raise _json_error(web.HTTPNotFound, "unknown_action", action=action)
        if name not in self.sidecar.runtimes:
            raise _json_error(web.HTTPNotFound, "unknown_upstream", upstream=name)
        ttl_text = request.query.get("ttl")
        if ttl_text is None and request.can_read_body:
            try:
                payload = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise _json_error(web.HTTPBadRequest, "invalid_json", detail=str(exc)) from exc
            if isinstance(payload, dict) and payload.get("ttl") is not None:
                ttl_text = str(payload["ttl"])
        try:
            ttl = parse_duration(ttl_text) if ttl_text is not None else None
        except ValueError as exc:
            raise _json_error(web.HTTPBadRequest, "invalid_ttl", detail=str(exc)) from exc
        if ttl is not None and ttl <= 0:
            raise _json_error(web.HTTPBadRequest, "invalid_ttl", detail="ttl must be positive")
        who = {
            "by": request.remote or "unknown",
            "operator": request.headers.get("X-Operator", "")[:64] or None,
            "user_agent": request.headers.get("User-Agent", "")[:128] or None,
        }
        body = await self._on_main(lambda: self._apply(name, action, ttl, who), wait=None)
        if body is None:  # removed by a reload between our look and the main loop's
            raise _json_error(web.HTTPNotFound, "unknown_upstream", upstream=name)
        return web.json_response(body)

    def _apply(self, name: str, action: str, ttl: float | None, who: dict[str, Any]) -> dict[str, Any] | None:
        """On the main loop: change the breaker, log who did it, arm the ttl's end."""
        sidecar = self.sidecar
        rt = sidecar.runtimes.get(name)
        if rt is None:
            return None
        now = sidecar.clock.monotonic()
        if action == "reset":
            rt.breaker.reset(now)
        else:
            override = Override.FORCE_OPEN if action == "force-open" else Override.FORCE_CLOSE
            rt.breaker.set_override(override, now, ttl)
        timer = self._override_timers.pop(name, None)
        if timer is not None:
            timer.cancel()
        if ttl is not None and action != "reset":
            assert self._main is not None
            self._override_timers[name] = self._main.call_later(ttl, self._override_ended, name, action, ttl)
        log.warning(
            "breaker %s: %s by %s%s",
            name,
            action,
            who["operator"] or who["by"],
            f" for {ttl:g}s" if ttl else "",
            extra={"event": "breaker_override", "upstream": name, "action": action, "ttl_seconds": ttl, **who},
        )
        self._publish()  # a dashboard or probe served from the cache sees the override at once
        return {"upstream": name, "action": action, "ttl_seconds": ttl, "breaker": breakers_report(sidecar)[name]}

    def _override_ended(self, name: str, action: str, ttl: float) -> None:
        self._override_timers.pop(name, None)
        rt = self.sidecar.runtimes.get(name)
        if rt is None:
            return
        snap = rt.breaker.snapshot(self.sidecar.clock.monotonic())  # clears the expired override
        if snap.override is not None:
            return  # replaced by a newer override without a ttl
        log.warning(
            "breaker %s: %s override ended after %gs; state is %s",
            name,
            action,
            ttl,
            snap.state.value,
            extra={
                "event": "breaker_override_ended",
                "upstream": name,
                "action": action,
                "ttl_seconds": ttl,
                "state": snap.state.value,
            },
        )
        self._publish()

    def _authorize(self, request: web.Request) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and not _same_local_origin(origin, request.headers.get("Host", "")):
            raise _json_error(
                web.HTTPForbidden, "foreign_origin", detail="mutating admin calls are refused from other sites"
            )
        config = self.sidecar.config
        token_env = config.admin.token_env if config else None
        expected = os.environ.get(token_env) if token_env else None
        if not expected:
            return
        given = request.headers.get("Authorization", "")
        if not given.startswith("Bearer "):
            raise _json_error(
                web.HTTPUnauthorized, "token_required", headers={"WWW-Authenticate": 'Bearer realm="seawall-admin"'}
            )
        if not hmac.compare_digest(given[7:].strip().encode(), expected.encode()):
            raise _json_error(web.HTTPForbidden, "wrong_token")


def _same_local_origin(origin: str, host: str) -> bool:
    """A page may steer breakers only if it was served by this admin server under an IP literal or localhost:
    a DNS name could be rebound to 127.0.0.1 by a hostile site, making its requests look same-origin."""
    if origin != f"http://{host}":
        return False
    hostname = urlsplit(origin).hostname or ""
    if hostname == "localhost":
        return True
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


def _json_error(
    cls: type[web.HTTPError], error: str, headers: dict[str, str] | None = None, **fields: Any
) -> web.HTTPError:
    return cls(text=json.dumps({"error": error, **fields}), content_type="application/json", headers=headers)


async def start_admin(sidecar: SidecarState, address: Address) -> AdminServer:
    server = AdminServer(sidecar, address)
    await server.start()
    return server
