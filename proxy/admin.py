"""The admin server: /health /ready /live /metrics /breakers /dashboard, on ``admin.listen`` only.

Mutating calls (POST /breakers/{name}/reset|force-open|force-close) need ``Authorization: Bearer <token>``
when the environment variable named by ``admin.token_env`` is set; the token is compared in constant time,
and a request carrying a foreign ``Origin`` is refused, so a web page open on the same host cannot steer a
breaker. Every override is logged with who, when and for how long.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.breaker import Override, Snapshot, State
from proxy.config import Address, parse_duration
from proxy.metrics import SidecarCollector

if TYPE_CHECKING:
    from proxy.runtime import UpstreamRuntime
    from proxy.server import Sidecar

log = logging.getLogger("seawall.admin")

SIDECAR_KEY = web.AppKey("sidecar", object)
_STATIC = Path(__file__).with_name("static")


def _iso(wall: float) -> str:
    return dt.datetime.fromtimestamp(wall, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _sidecar(request: web.Request) -> Sidecar:
    return request.app[SIDECAR_KEY]  # type: ignore[return-value]


def _critical(rt: UpstreamRuntime) -> bool:
    return rt.policy.health.critical if rt.policy.health is not None else True


def breaker_json(rt: UpstreamRuntime, now: float, wall_offset: float) -> dict[str, Any]:
    snap: Snapshot = rt.breaker.snapshot(now)
    last = snap.last_transition
    body: dict[str, Any] = {
        "state": snap.effective_state.value,
        "machine_state": snap.state.value,
        "enforce": rt.enforce,
        "override": snap.override.value if snap.override else None,
        "override_until": _iso(snap.override_until + wall_offset) if snap.override_until else None,
        "failures": snap.failures_in_window,
        "failure_threshold": rt.policy.breaker.failure_threshold,
        "window_seconds": rt.policy.breaker.window,
        "calls_in_window": snap.calls_in_window,
        "failure_rate": snap.failure_rate,
        "slow_call_rate": snap.slow_call_rate,
        "retry_in": round(snap.retry_in, 3),
        "half_open_in_flight": snap.half_open_in_flight,
        "last_transition": None if last is None else {
            "from": last.from_state.value, "to": last.to_state.value, "reason": last.reason,
            "at": _iso(last.at + wall_offset),
        },
        "recent_transitions": [
            {"from": t.from_state.value, "to": t.to_state.value, "reason": t.reason, "at": _iso(t.at + wall_offset)}
            for t in reversed(rt.recent_transitions)
        ],
        "totals": {"successes": snap.total_successes, "failures": snap.total_failures,
                   "rejected": snap.total_rejected},
        "inflight": rt.stats.inflight,
        "pending": rt.stats.pending,
        "retries": rt.stats.retries,
        "rejected": dict(rt.stats.rejected),
        "targets": [
            {"target": str(s.target), "ejected": s.ejected(now),
             "ejected_until": _iso(s.ejected_until + wall_offset) if s.ejected(now) else None,
             "ejection_reason": s.ejection_reason or None, "outstanding": s.outstanding,
             "consecutive_failures": s.consecutive_failures, "ejections": s.total_ejections}
            for s in rt.balancer.states
        ],
    }
    if rt.budget is not None:
        requests, retries = rt.budget.totals(now)
        body["retry_budget"] = {"requests": requests, "retries": retries,
                                "allowance": round(rt.budget.allowance(now), 1)}
    return body


def health_report(sidecar: Sidecar) -> tuple[int, dict[str, Any]]:
    now = sidecar.clock.monotonic()
    wall_offset = time.time() - now
    checks: dict[str, Any] = {}
    breakers: dict[str, Any] = {}
    status = "healthy"
    for name, rt in sidecar.runtimes.items():
        critical = _critical(rt)
        breaker = breaker_json(rt, now, wall_offset)
        breaker["critical"] = critical
        breakers[name] = breaker
        bad = breaker["state"] == State.OPEN.value and rt.enforce
        if rt.policy.health is not None:
            h = rt.health
            checks[name] = {
                "healthy": h.healthy,
                "critical": critical,
                "latency_ms": round(h.latency * 1000, 3),
                "checked_at": _iso(h.checked_at) if h.checked_at else None,
                "detail": h.detail or None,
                "consecutive_failures": h.consecutive_failures,
            }
            bad = bad or h.healthy is False
        if bad:
            status = "unhealthy" if critical else ("degraded" if status == "healthy" else status)
        elif breaker["state"] != State.CLOSED.value and status == "healthy":
            status = "degraded"  # half-open, or open in shadow mode
    loaded = sidecar.loaded
    body = {
        "status": status,
        "timestamp": _iso(time.time()),
        "checks": checks,
        "circuit_breakers": breakers,
        "config": None if loaded is None else {
            "path": loaded.path, "sha256": loaded.sha256, "loaded_at": _iso(loaded.loaded_at),
            "last_reload_errors": sidecar.last_reload_error,
        },
    }
    return (503 if status == "unhealthy" else 200), body


async def _health(request: web.Request) -> web.Response:
    code, body = health_report(_sidecar(request))
    return web.json_response(body, status=code, headers={"cache-control": "no-store"})


async def _ready(request: web.Request) -> web.Response:
    sidecar = _sidecar(request)
    ready = sidecar.ready and sidecar.config is not None and all(
        name in sidecar.listeners for name in sidecar.runtimes)
    return web.json_response({"ready": ready}, status=200 if ready else 503)


async def _live(_: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def _metrics(request: web.Request) -> web.Response:
    registry: CollectorRegistry = request.app[REGISTRY_KEY]  # type: ignore[assignment]
    return web.Response(body=generate_latest(registry), headers={"content-type": CONTENT_TYPE_LATEST})


async def _breakers(request: web.Request) -> web.Response:
    sidecar = _sidecar(request)
    now = sidecar.clock.monotonic()
    wall_offset = time.time() - now
    return web.json_response({name: breaker_json(rt, now, wall_offset) for name, rt in sidecar.runtimes.items()})


def _authorize(request: web.Request) -> None:
    sidecar = _sidecar(request)
    origin = request.headers.get("Origin")
    if origin is not None and origin not in _own_origins(request):
        raise web.HTTPForbidden(text=json.dumps({"error": "foreign_origin",
                                                 "detail": "mutating admin calls are refused from web pages"}),
                                content_type="application/json")
    token_env = sidecar.config.admin.token_env if sidecar.config else None
    expected = os.environ.get(token_env) if token_env else None
    if not expected:
        return
    given = request.headers.get("Authorization", "")
    if not given.startswith("Bearer "):
        raise web.HTTPUnauthorized(text=json.dumps({"error": "token_required"}), content_type="application/json",
                                   headers={"WWW-Authenticate": 'Bearer realm="seawall-admin"'})
    if not hmac.compare_digest(given[7:].strip().encode(), expected.encode()):
        raise web.HTTPForbidden(text=json.dumps({"error": "wrong_token"}), content_type="application/json")


def _own_origins(request: web.Request) -> set[str]:
    host = request.headers.get("Host", "")
    return {f"http://{host}"} if host else set()


async def _control(request: web.Request) -> web.Response:
    _authorize(request)
    sidecar = _sidecar(request)
    name, action = request.match_info["name"], request.match_info["action"]
    rt = sidecar.runtimes.get(name)
    if rt is None:
        raise web.HTTPNotFound(text=json.dumps({"error": "unknown_upstream", "upstream": name}),
                               content_type="application/json")
    ttl_text = request.query.get("ttl")
    if ttl_text is None and request.can_read_body:
        try:
            payload = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise web.HTTPBadRequest(text=json.dumps({"error": "invalid_json", "detail": str(exc)}),
                                     content_type="application/json") from exc
        if isinstance(payload, dict) and payload.get("ttl") is not None:
            ttl_text = str(payload["ttl"])
    try:
        ttl = parse_duration(ttl_text) if ttl_text is not None else None
    except ValueError as exc:
        raise web.HTTPBadRequest(text=json.dumps({"error": "invalid_ttl", "detail": str(exc)}),
                                 content_type="application/json") from exc
    now = sidecar.clock.monotonic()
    if action == "reset":
        rt.breaker.reset(now)
    elif action == "force-open":
        rt.breaker.set_override(Override.FORCE_OPEN, now, ttl)
    elif action == "force-close":
        rt.breaker.set_override(Override.FORCE_CLOSE, now, ttl)
    else:
        raise web.HTTPNotFound(text=json.dumps({"error": "unknown_action", "action": action}),
                               content_type="application/json")
    who = request.remote or "unknown"
    log.warning("breaker %s: %s by %s%s", name, action, who, f" for {ttl:g}s" if ttl else "",
                extra={"event": "breaker_override", "upstream": name, "action": action, "by": who,
                       "ttl_seconds": ttl, "user_agent": request.headers.get("User-Agent")})
    return web.json_response({"upstream": name, "action": action, "ttl_seconds": ttl,
                              "breaker": breaker_json(rt, now, time.time() - now)})


async def _dashboard(_: web.Request) -> web.StreamResponse:
    page = _STATIC / "dashboard.html"
    if not page.exists():
        raise web.HTTPNotFound(text="dashboard not built")
    return web.FileResponse(page, headers={"cache-control": "no-store"})


REGISTRY_KEY = web.AppKey("registry", object)


def admin_app(sidecar: Sidecar) -> web.Application:
    app = web.Application()
    app[SIDECAR_KEY] = sidecar
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SidecarCollector(lambda: [rt.view() for rt in sidecar.runtimes.values()],
                                       sidecar.process_stats))
    app[REGISTRY_KEY] = registry
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/live", _live)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/breakers", _breakers)
    app.router.add_post("/breakers/{name}/{action}", _control)
    app.router.add_get("/dashboard", _dashboard)
    return app


async def start_admin(sidecar: Sidecar, address: Address) -> web.AppRunner:
    runner = web.AppRunner(admin_app(sidecar), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, address.host, address.port, reuse_address=True).start()
    return runner
