"""Active health checks: each upstream probed on its own schedule, with or without traffic.

A check never counts against the breaker: it answers "is the upstream up?" for /health and the metrics, while
the breaker answers "should this request go?" from real traffic.

Probes: HTTP ``GET health.path`` (2xx/3xx passes); for tcp upstreams a TCP connect, Redis ``PING`` (expects
``+PONG``) or a PostgreSQL ``SSLRequest`` (expects ``S`` or ``N``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.policy.model import HealthPolicy
from proxy.policy.values import Target

if TYPE_CHECKING:
    from proxy.runtime import UpstreamRuntime

log = logging.getLogger("seawall.health")

_POSTGRES_SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"


async def _http_probe(target: Target, health: HealthPolicy) -> str | None:
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        writer.write(
            b"GET %s HTTP/1.1\r\nhost: %s\r\nuser-agent: seawall-health\r\nconnection: close\r\n\r\n"
            % (health.path.encode(), target.authority.encode())
        )
        line = await reader.readline()
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            return f"not an HTTP answer: {line[:40]!r}"
        status = int(parts[1])
        return None if 200 <= status < 400 else f"status {status}"
    finally:
        writer.close()


async def _tcp_probe(target: Target, health: HealthPolicy) -> str | None:
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        if health.probe == "redis":
            writer.write(b"PING\r\n")
            answer = await reader.readline()
            # A server that wants a password still answered: it is up (NOAUTH/WRONGPASS are about the probe).
            if answer.startswith((b"+PONG", b"-NOAUTH", b"-WRONGPASS")):
                return None
            return f"unexpected answer to PING: {answer[:40]!r}"
        if health.probe == "postgres":
            writer.write(_POSTGRES_SSL_REQUEST)
            answer = await reader.readexactly(1)
            return None if answer in (b"S", b"N") else f"unexpected answer to SSLRequest: {answer!r}"
        return None
    finally:
        writer.close()


async def check_once(rt: UpstreamRuntime) -> None:
    """Probe every target once; the upstream passes if any target passes."""
    health = rt.policy.health
    assert health is not None
    probe = _tcp_probe if rt.policy.protocol == "tcp" else _http_probe
    started = time.monotonic()
    problems: list[str] = []
    for target in rt.policy.targets:
        try:
            async with asyncio.timeout(health.timeout):
                problem = await probe(target, health)
        except TimeoutError:
            problem = f"no answer within {health.timeout:g}s"
        except (OSError, asyncio.IncompleteReadError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            problems = []
            break
        problems.append(f"{target}: {problem}")
    latency = time.monotonic() - started
    record(rt, passed=not problems, latency=latency, detail="; ".join(problems))


def record(rt: UpstreamRuntime, passed: bool, latency: float, detail: str) -> None:
    health, status = rt.policy.health, rt.health
    assert health is not None
    status.latency = latency
    status.checked_at = time.time()
    status.detail = detail
    rt.stats.checks["pass" if passed else "fail"] = rt.stats.checks.get("pass" if passed else "fail", 0) + 1
    before = status.healthy
    if passed:
        status.consecutive_passes += 1
        status.consecutive_failures = 0
        if before is None or (not before and status.consecutive_passes >= health.healthy_threshold):
            status.healthy = True
    else:
        status.consecutive_failures += 1
        status.consecutive_passes = 0
        if before is None or (before and status.consecutive_failures >= health.unhealthy_threshold):
            status.healthy = False
    if status.healthy != before:
        log.warning(
            "upstream %s is %s",
            rt.name,
            "healthy" if status.healthy else "unhealthy",
            extra={"event": "health_changed", "upstream": rt.name, "healthy": status.healthy, "detail": detail},
        )


async def run_checks(get_runtime: Callable[[], UpstreamRuntime], stop: asyncio.Event) -> None:
    """Check forever (until ``stop``), at ``interval`` ±10% so many sidecars do not probe in lockstep."""
    while not stop.is_set():
        rt = get_runtime()
        health = rt.policy.health
        if health is None:
            return
        try:
            await check_once(rt)
        except Exception:
            log.exception("health check of %s failed unexpectedly", rt.name)
        delay = health.interval * random.uniform(0.9, 1.1)
        try:
            async with asyncio.timeout(delay):
                await stop.wait()
        except TimeoutError:
            pass
