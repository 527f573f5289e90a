"""PostgreSQL behind the sidecar: a real cluster, the real ``psycopg`` client, a real ``sidecar run`` process."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import psycopg
import pytest

from tests.support.admin import admin_json, assert_recovered, metric
from tests.support.eventually import eventually_sync
from tests.support.servers import PostgresCluster
from tests.support.sidecar import sidecar_process, tcp_policy

LOCAL = "127.0.0.1"


def connect(port: int) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        host=LOCAL, port=port, user="postgres", dbname="postgres", connect_timeout=2, autocommit=True
    )


def can_connect(port: int) -> bool:
    try:
        with connect(port) as conn:
            return conn.execute("select 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def test_postgres_through_the_sidecar_with_breaker_and_sslrequest_checks(
    tmp_path: Path, postgres_cluster: PostgresCluster
) -> None:
    policy, listen = tcp_policy(
        tmp_path,
        "db",
        [f"{LOCAL}:{postgres_cluster.port}"],
        breaker={"failure_threshold": 2, "open_duration": "1s"},
        health={"interval": "100ms", "timeout": "1s", "probe": "postgres", "unhealthy_threshold": 1},
    )
    with sidecar_process(policy) as sidecar:
        admin = sidecar.admin
        # The startup handshake (SSLRequest answered "N", then startup/auth) and queries work through the relay.
        with connect(listen) as conn:
            conn.execute("create table if not exists seawall (id int primary key, note text)")
            conn.execute("truncate seawall")
            with conn.cursor() as cur:
                cur.executemany("insert into seawall values (%s, %s)", [(i, "x" * i) for i in range(200)])
            row = conn.execute("select count(*), sum(length(note)) from seawall").fetchone()
            assert row == (200, sum(range(200)))
            # A large result set crosses the relay byte-exact.
            (blob,) = conn.execute("select repeat('abc', 1000000)").fetchone()  # type: ignore[misc]
            assert blob == "abc" * 1000000
        eventually_sync(
            lambda: admin_json(admin, "/health")["checks"].get("db", {}).get("healthy") is True,
            timeout=5,
            what="postgres SSLRequest check passes",
        )

        # The server goes away: connects fail, and two of them open the breaker.
        postgres_cluster.stop()
        try:
            for _ in range(2):
                assert not can_connect(listen)
            assert admin_json(admin, "/breakers")["db"]["state"] == "open"
            failures = metric(admin, "sidecar_upstream_failures_total", upstream="db", kind="connect_error")
            assert failures == 2

            # New connections: closed at once, counted, no upstream attempt.
            started = time.monotonic()
            with socket.create_connection((LOCAL, listen), 2) as sock:
                sock.settimeout(2)
                assert sock.recv(1) == b""
            # No upstream attempt is what the counters below show; the time only says nothing was waited for — a
            # generous bound for a busy CI machine (tests/benchmarks/at_once.py measures the real figure).
            assert time.monotonic() - started < 1.0
            assert metric(admin, "sidecar_rejected_total", upstream="db", reason="breaker_open") >= 1
            assert metric(admin, "sidecar_upstream_failures_total", upstream="db", kind="connect_error") == failures
            with pytest.raises(psycopg.OperationalError):
                connect(listen)
            eventually_sync(
                lambda: admin_json(admin, "/health")["checks"]["db"]["healthy"] is False,
                timeout=5,
                what="postgres check fails",
            )
        finally:
            postgres_cluster.start()

        # Passing checks end the open interval early (half-open), or open_duration does, whichever comes first;
        # then the first connection is the probe and its success closes the breaker.
        eventually_sync(
            lambda: can_connect(listen), timeout=10, what="postgres reachable through the sidecar again", interval=0.05
        )
        assert_recovered(admin, "db")
        eventually_sync(
            lambda: admin_json(admin, "/health")["checks"]["db"]["healthy"] is True,
            timeout=5,
            what="postgres check passes again",
        )
