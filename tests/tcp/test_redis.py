"""Redis behind the sidecar (a real ``sidecar run`` process, a real ``redis-server``, the ``redis`` client)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.admin import admin_json, assert_recovered, metric
from tests.support.eventually import eventually_sync
from tests.support.servers import RedisServer
from tests.support.sidecar import sidecar_process, tcp_policy

LOCAL = "127.0.0.1"


def client(port: int) -> redis.Redis:
    # No client-side retries: each command is one connection attempt the test can count.
    return redis.Redis(host=LOCAL, port=port, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))


def breaker_state(admin: str) -> str:
    state: str = admin_json(admin, "/breakers")["cache"]["state"]
    return state


def closed_at_once(port: int) -> float:
    started = time.monotonic()
    with socket.create_connection((LOCAL, port), 2) as sock:
        sock.settimeout(2)
        assert sock.recv(1) == b""  # closed by the sidecar, nothing relayed
    return time.monotonic() - started


def test_redis_through_the_sidecar_with_breaker_and_ping_checks(tmp_path: Path, redis_server: RedisServer) -> None:
    policy, listen = tcp_policy(
        tmp_path,
        "cache",
        [f"{LOCAL}:{redis_server.port}"],
        breaker={"failure_threshold": 2, "open_duration": "1s"},
        health={"interval": "100ms", "timeout": "1s", "probe": "redis", "unhealthy_threshold": 1},
    )
    with sidecar_process(policy) as sidecar:
        admin = sidecar.admin
        # Commands work through the relay, pipelined ones included.
        r = client(listen)
        assert r.ping()
        r.set("seawall", "up")
        assert r.get("seawall") == b"up"
        pipe = r.pipeline()
        for i in range(100):
            pipe.incr("counter", i)
        assert pipe.execute()[-1] == sum(range(100))
        big = b"v" * (2 * 1024 * 1024)
        r.set("big", big)
        assert r.get("big") == big
        eventually_sync(
            lambda: admin_json(admin, "/health")["checks"].get("cache", {}).get("healthy") is True,
            timeout=5,
            what="redis PING check passes",
        )
        r.close()

        # The server goes away: connects fail, two of them open the breaker.
        redis_server.stop()
        for _ in range(2):
            try:
                client(listen).ping()
            except redis.ConnectionError:
                pass
            else:
                raise AssertionError("a command succeeded with redis down")
        assert breaker_state(admin) == "open"
        failures = metric(admin, "sidecar_upstream_failures_total", upstream="cache", kind="connect_error")
        assert failures == 2

        # New connections are closed at once, with no upstream attempt, and counted.
        # The counters below show there was no upstream attempt; the bound is generous for a busy CI machine
        # (tests/benchmarks/at_once.py measures the real figure).
        assert closed_at_once(listen) < 1.0
        assert metric(admin, "sidecar_rejected_total", upstream="cache", reason="breaker_open") >= 1
        assert metric(admin, "sidecar_upstream_failures_total", upstream="cache", kind="connect_error") == failures
        eventually_sync(
            lambda: admin_json(admin, "/health")["checks"]["cache"]["healthy"] is False,
            timeout=5,
            what="redis PING check fails",
        )
        with_client = client(listen)
        try:
            with_client.ping()
        except redis.ConnectionError:
            pass
        else:
            raise AssertionError("the breaker let a connection through")

        # Back up: passing PING checks end the open interval early (half-open), or open_duration does, whichever
        # comes first; then the next connection is the probe and its success closes the breaker.
        redis_server.start()

        def works() -> bool:
            try:
                return bool(client(listen).ping())
            except redis.ConnectionError:
                return False

        eventually_sync(works, timeout=5, what="redis reachable through the sidecar again", interval=0.05)
        assert_recovered(admin, "cache")
        assert client(listen).get("seawall") is None  # a fresh server (no persistence): really restarted
        eventually_sync(
            lambda: admin_json(admin, "/health")["checks"]["cache"]["healthy"] is True,
            timeout=5,
            what="redis PING check passes again",
        )
        closes = sum(
            metric(admin, "sidecar_breaker_transitions_total", upstream="cache", from_state=state, to_state="closed")
            for state in ("open", "half_open")
        )
        assert closes == 1
