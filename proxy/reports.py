"""What /health and /breakers say, built from the running state (on the data plane's loop only).

``SidecarState`` is the part of the running sidecar a report reads; ``proxy.server.Sidecar`` is the real one,
so the admin plane depends on this narrow view rather than on the server.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.metrics import ProcessStats
from proxy.policy.model import SidecarConfig
from proxy.resilience.breaker import Snapshot, State
from proxy.resilience.clock import Clock
from proxy.runtime import UpstreamRuntime


@dataclass
class LoadedFile:
    path: str
    sha256: str
    loaded_at: float  # wall time


class SidecarState(Protocol):
    @property
    def clock(self) -> Clock: ...
    @property
    def config(self) -> SidecarConfig | None: ...
    @property
    def loaded(self) -> LoadedFile | None: ...
    @property
    def last_reload_error(self) -> list[str]: ...
    @property
    def runtimes(self) -> Mapping[str, UpstreamRuntime]: ...
    @property
    def listeners(self) -> Mapping[str, object]: ...
    @property
    def process_stats(self) -> ProcessStats: ...
    @property
    def ready(self) -> bool: ...


def iso_time(wall: float) -> str:
    return dt.datetime.fromtimestamp(wall, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _critical(rt: UpstreamRuntime) -> bool:
    return rt.policy.health.critical if rt.policy.health is not None else True


# -- reports (built on the main loop only) ------------------------------------------------------------------


def breaker_json(rt: UpstreamRuntime, now: float, wall_offset: float) -> dict[str, Any]:
    snap: Snapshot = rt.breaker.snapshot(now)
    last = snap.last_transition
    stats = rt.stats
    body: dict[str, Any] = {
        "state": snap.effective_state.value,
        "machine_state": snap.state.value,
        "enforce": rt.enforce,
        "critical": _critical(rt),
        "override": snap.override.value if snap.override else None,
        "override_until": iso_time(snap.override_until + wall_offset) if snap.override_until else None,
        "failures": snap.failures_in_window,
        "failure_threshold": rt.policy.breaker.failure_threshold,
        "window_seconds": rt.policy.breaker.window,
        "open_duration_seconds": rt.policy.breaker.open_duration,
        "calls_in_window": snap.calls_in_window,
        "failure_rate": snap.failure_rate,
        "slow_call_rate": snap.slow_call_rate,
        "retry_in": round(snap.retry_in, 3),
        "half_open_in_flight": snap.half_open_in_flight,
        # False once a probe that passing checks let through failed: until the breaker closes, only
        # open_duration ends its open intervals (None: the upstream has no active checks).
        "health_may_half_open": snap.health_armed if rt.policy.health is not None else None,
        "last_transition": None
        if last is None
        else {
            "from": last.from_state.value,
            "to": last.to_state.value,
            "reason": last.reason,
            "at": iso_time(last.at + wall_offset),
        },
        "recent_transitions": [
            {
                "from": t.from_state.value,
                "to": t.to_state.value,
                "reason": t.reason,
                "at": iso_time(t.at + wall_offset),
            }
            for t in reversed(rt.recent_transitions)
        ],
        "totals": {
            "successes": snap.total_successes,
            "failures": snap.total_failures,
            "rejected": snap.total_rejected,
        },
        "protocol": rt.policy.protocol,
        "requests": {str(code): count for code, count in sorted(stats.requests.items())},
        # protocol: grpc: calls by the grpc-status their callers got (the HTTP status of each is 200)
        "grpc_statuses": {str(code): count for code, count in sorted(stats.grpc.items())},
        "failures_by_kind": dict(stats.failures),
        "inflight": stats.inflight,
        "pending": stats.pending,
        "retries": stats.retries,
        "rejected": dict(stats.rejected),
        "targets": [
            {
                "target": str(s.target),
                "ejected": s.ejected(now),
                "ejected_until": iso_time(s.ejected_until + wall_offset) if s.ejected(now) else None,
                "ejection_reason": s.ejection_reason or None,
                "outstanding": s.outstanding,
                "consecutive_failures": s.consecutive_failures,
                "ejections": s.total_ejections,
            }
            for s in rt.balancer.states
        ],
        "retry_budget": None,
    }
    if rt.budget is not None:
        requests, retries = rt.budget.totals(now)
        body["retry_budget"] = {
            "requests": requests,
            "retries": retries,
            "allowance": round(rt.budget.allowance(now), 1),
        }
    body["rate_limit"] = rt.rate.describe() if rt.rate is not None else None
    return body


def check_json(rt: UpstreamRuntime) -> dict[str, Any] | None:
    if rt.policy.health is None:
        return None
    h = rt.health
    return {
        "healthy": h.healthy,
        "critical": _critical(rt),
        "latency_ms": round(h.latency * 1000, 3),
        "checked_at": iso_time(h.checked_at) if h.checked_at else None,
        "detail": h.detail or None,
        "consecutive_failures": h.consecutive_failures,
        "consecutive_passes": h.consecutive_passes,
        "interval_seconds": rt.policy.health.interval,
    }


def health_report(sidecar: SidecarState) -> tuple[int, dict[str, Any]]:
    """The aggregated verdict: unhealthy (503) when a critical upstream fails its check or its breaker is open
    (and enforcing); degraded (200) when a non-critical one does, or any breaker is not closed."""
    now = sidecar.clock.monotonic()
    wall_offset = time.time() - now
    checks: dict[str, Any] = {}
    breakers: dict[str, Any] = {}
    status = "healthy"
    for name, rt in sidecar.runtimes.items():
        breaker = breaker_json(rt, now, wall_offset)
        breakers[name] = breaker
        critical = breaker["critical"]
        bad = breaker["state"] == State.OPEN.value and rt.enforce
        check = check_json(rt)
        if check is not None:
            checks[name] = check
            bad = bad or check["healthy"] is False
        if bad:
            status = "unhealthy" if critical else ("degraded" if status == "healthy" else status)
        elif breaker["state"] != State.CLOSED.value and status == "healthy":
            status = "degraded"  # half-open, or open in shadow mode
        rate = breaker["rate_limit"]
        if rate is not None and rate["counted"] == "fallback" and status == "healthy":
            status = "degraded"  # the shared budget's Redis is unreachable: a local share of the limits in use
    loaded = sidecar.loaded
    body = {
        "status": status,
        "timestamp": iso_time(time.time()),
        "checks": checks,
        "circuit_breakers": breakers,
        "config": None
        if loaded is None
        else {
            "path": loaded.path,
            "sha256": loaded.sha256,
            "loaded_at": iso_time(loaded.loaded_at),
            "last_reload_errors": sidecar.last_reload_error,
        },
    }
    return (503 if status == "unhealthy" else 200), body


def breakers_report(sidecar: SidecarState) -> dict[str, Any]:
    now = sidecar.clock.monotonic()
    wall_offset = time.time() - now
    return {name: breaker_json(rt, now, wall_offset) for name, rt in sidecar.runtimes.items()}
