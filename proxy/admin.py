"""The admin server: /health /ready /live /metrics /breakers /dashboard, on ``admin.listen`` only.

Why a thread of its own: operators and Kubernetes probe /health and Prometheus scrapes /metrics exactly when
the proxy is busiest. On the data plane's event loop an admin request waits behind every ready listener
callback (measured: ~20 ms median, >60 ms worst case at 64 saturating connections on 2 cores), so the admin
server runs its own event loop on a dedicated thread and accepts, parses and answers there.

Why reports are still built on the data plane's loop: the breakers, counters and pools are plain objects
mutated by that loop without locks. A report is built on demand: the admin thread asks the main loop for one
and waits at most ``FRESH_WAIT``; if the main loop is too busy to answer in time, it serves the copy built last
(marked ``x-seawall-report: cached`` with its age) while the asked-for one is still built and kept for the
next request. Nothing is rendered while nobody asks (an idle sidecar with 200 upstreams costs nothing), and a
breaker override drops the copies so no stale one is served after it. Mutating calls always run on the main
loop and wait for it.

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
import re
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

from proxy.logs import throttle_accept_exhaustion
from proxy.metrics import SidecarCollector
from proxy.policy.values import Address, parse_duration
from proxy.reports import SidecarState, breakers_report, health_report
from proxy.resilience.breaker import Override

log = logging.getLogger("seawall.admin")

_STATIC = Path(__file__).with_name("static")
T = TypeVar("T")

FRESH_WAIT = 0.01  # longest wait for the main loop before a cached report is served instead
FIRST_WAIT = 5.0  # with no copy to fall back on, how long to wait for the main loop before answering 503
HEARTBEAT_INTERVAL = 1.0  # how often the main loop says it is alive (one timer, no work)
LIVE_STALL = 10.0  # /live fails when the main loop has not ticked for this long: a wedged data plane
MAX_OVERRIDE_TTL = 7 * 24 * 3600.0  # a forced state longer than a week is a mistake, not a plan
OPERATOR_NAME = re.compile(r"[A-Za-z0-9._@+-]{1,64}")
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
        self._cache: dict[str, _Cached] = {}
        self._building: dict[str, asyncio.Future[Any]] = {}  # on the admin loop: one build per kind at a time
        self._heartbeat = time.monotonic()
        self._ticker: asyncio.TimerHandle | None = None
        self._override_timers: dict[str, asyncio.TimerHandle] = {}

    # -- lifecycle (called on the main loop) ----------------------------------------------------------------

    async def start(self) -> None:
        self._main = asyncio.get_running_loop()
        self._tick()
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._serve, args=(started,), name="seawall-admin", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(started)  # re-raises a bind error (OSError) here, in the caller
        if sys.getswitchinterval() > SWITCH_INTERVAL:
            # A waiting thread gets the GIL after at most this long (default 5 ms, several waits per request).
            sys.setswitchinterval(SWITCH_INTERVAL)

    async def cleanup(self) -> None:
        """Stop accepting, finish admin requests in flight, stop the thread. (Named like AppRunner.cleanup.)"""
        if self._ticker is not None:
            self._ticker.cancel()
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
        throttle_accept_exhaustion(loop, log)
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

    def _tick(self) -> None:
        self._heartbeat = time.monotonic()
        assert self._main is not None
        self._ticker = self._main.call_later(HEARTBEAT_INTERVAL, self._tick)

    def _invalidate(self) -> None:
        """After a change the reports must show: no cached copy may be served from here on."""
        self._cache.clear()

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
        """A fresh report if the main loop builds it within FRESH_WAIT, else the copy built last."""
        building = self._building.get(kind)
        if building is None or building.done():
            building = self._building[kind] = asyncio.ensure_future(self._on_main(build, wait=None))
            building.add_done_callback(lambda done: self._keep(kind, done))
        cached = self._cache.get(kind)
        try:
            value = await asyncio.wait_for(asyncio.shield(building), FRESH_WAIT if cached else FIRST_WAIT)
        except TimeoutError:
            if cached is None:
                raise _json_error(web.HTTPServiceUnavailable, "data_plane_busy") from None
            age = max(0.0, time.monotonic() - cached.at)
            return cached.value, {"x-seawall-report": "cached", "x-seawall-report-age-ms": f"{age * 1000:.0f}"}
        return value, {"x-seawall-report": "fresh"}

    def _keep(self, kind: str, done: asyncio.Future[Any]) -> None:
        if done.cancelled():
            return
        if done.exception() is not None:
            log.error("admin report %s could not be built: %r", kind, done.exception(), extra={"event": "admin_error"})
            return
        self._cache[kind] = _Cached(done.result(), time.monotonic())

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
        if ttl is not None and not 0 < ttl <= MAX_OVERRIDE_TTL:
            raise _json_error(
                web.HTTPBadRequest, "invalid_ttl", detail=f"ttl must be positive and at most {MAX_OVERRIDE_TTL:g}s"
            )
        operator = request.headers.get("X-Operator")
        if operator is not None and not OPERATOR_NAME.fullmatch(operator):
            raise _json_error(
                web.HTTPBadRequest, "invalid_operator", detail="X-Operator is 1–64 of A-Z a-z 0-9 . _ @ + -"
            )
        who = {
            "by": request.remote or "unknown",
            "operator": operator,
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
        # Who asked goes in the structured fields only: header text never becomes part of the message.
        log.warning(
            "breaker %s: %s%s",
            name,
            action,
            f" for {ttl:g}s" if ttl else "",
            extra={"event": "breaker_override", "upstream": name, "action": action, "ttl_seconds": ttl, **who},
        )
        self._invalidate()  # no probe or dashboard may be served a copy from before the override
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
        self._invalidate()

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
        # Header bytes that are not UTF-8 arrive as surrogates: compared as the bytes they were, never a crash.
        token = given[7:].strip().encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(token, expected.encode("utf-8", "surrogateescape")):
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
