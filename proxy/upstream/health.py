"""Active health checks: each upstream probed on its own schedule, with or without traffic.

A check never counts against the breaker: it answers "is the upstream up?" for /health and the metrics, while
the breaker answers "should this request go?" from real traffic.

Probes: gRPC ``grpc.health.v1.Health/Check`` for ``probe: grpc`` (passing only on SERVING); HTTP
``GET health.path`` (2xx/3xx passes; over TLS to https targets, with the upstream's own client
context: the same trust, client certificate and server name as its traffic); for tcp upstreams a TCP connect,
Redis ``PING`` (expects ``+PONG``) or a PostgreSQL ``SSLRequest`` (expects ``S`` or ``N``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.policy.model import HealthPolicy, UpstreamPolicy
from proxy.policy.values import Target
from proxy.upstream.errors import tls_detail
from proxy.upstream.grpc_health import grpc_health_check
from proxy.upstream.h2pool import H2Pool
from proxy.upstream.tls import ClientContext

log = logging.getLogger("seawall.health")

_POSTGRES_SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"


async def _http_probe(target: Target, health: HealthPolicy, tls: ClientContext | None = None) -> str | None:
    if target.is_tls and tls is not None:
        reader, writer = await asyncio.open_connection(
            target.host, target.port, ssl=tls, server_hostname=tls.server_name or target.host
        )
    else:
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


async def _grpc_probe(target: Target, health: HealthPolicy, tls: ClientContext | None) -> str | None:
    """grpc.health.v1.Health/Check on a connection of its own (closed after), like the HTTP probe's."""
    pool = H2Pool(target, tls if target.is_tls else None, health.timeout)
    try:
        return await grpc_health_check(pool, health.service, health.timeout)
    finally:
        pool.close()  # GOAWAY, closed in the background: a TLS close waits for the peer's close_notify


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


@dataclass(frozen=True, slots=True)
class CheckResult:
    passed: bool
    latency: float
    detail: str  # what failed, per target; empty when passed


@dataclass(slots=True)
class HealthStatus:
    """The verdict of the active checks so far, with hysteresis (``healthy_threshold``/``unhealthy_threshold``)."""

    healthy: bool | None = None  # None until the first check ends
    latency: float = 0.0
    checked_at: float = 0.0  # wall time
    detail: str = ""
    consecutive_passes: int = 0
    consecutive_failures: int = 0

    def record(self, result: CheckResult, policy: HealthPolicy, wall_time: float) -> bool:
        """Take one check's result; True when the verdict changed."""
        self.latency = result.latency
        self.checked_at = wall_time
        self.detail = result.detail
        before = self.healthy
        if result.passed:
            self.consecutive_passes += 1
            self.consecutive_failures = 0
            if before is None or (not before and self.consecutive_passes >= policy.healthy_threshold):
                self.healthy = True
        else:
            self.consecutive_failures += 1
            self.consecutive_passes = 0
            if before is None or (before and self.consecutive_failures >= policy.unhealthy_threshold):
                self.healthy = False
        return self.healthy != before


async def check_once(policy: UpstreamPolicy, tls: ClientContext | None = None) -> CheckResult:
    """Probe every target once; the upstream passes if any target passes."""
    health = policy.health
    assert health is not None
    started = time.monotonic()
    problems: list[str] = []
    for target in policy.targets:
        try:
            async with asyncio.timeout(health.timeout):
                if policy.protocol == "tcp":
                    problem = await _tcp_probe(target, health)
                elif health.probe == "grpc":
                    problem = await _grpc_probe(target, health, tls)
                else:
                    problem = await _http_probe(target, health, tls)
        except TimeoutError:
            problem = f"no answer within {health.timeout:g}s"
        except ssl.SSLError as exc:
            problem = f"TLS failed: {tls_detail(exc)}"
        except (OSError, asyncio.IncompleteReadError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            problems = []
            break
        problems.append(f"{target}: {problem}")
    return CheckResult(not problems, time.monotonic() - started, "; ".join(problems))


async def run_checks(
    get_policy: Callable[[], UpstreamPolicy],
    on_result: Callable[[CheckResult], None],
    stop: asyncio.Event,
    get_tls: Callable[[], ClientContext | None] | None = None,
) -> None:
    """Check forever (until ``stop``), at ``interval`` ±10% so many sidecars do not probe in lockstep.

    ``get_policy`` (and ``get_tls``, the client context for https targets) are asked before every check, so a
    reload that keeps the checks running is seen at once."""
    while not stop.is_set():
        policy = get_policy()
        health = policy.health
        if health is None:
            return
        try:
            on_result(await check_once(policy, get_tls() if get_tls is not None else None))
        except Exception:
            log.exception("health check of %s failed unexpectedly", policy.name)
        delay = health.interval * random.uniform(0.9, 1.1)
        try:
            async with asyncio.timeout(delay):
                await stop.wait()
        except TimeoutError:
            pass
