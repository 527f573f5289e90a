"""Fixtures for the L4 tests: a Redis server and a PostgreSQL cluster (the servers are in tests/support/servers.py).

The in-process relay tests run on asyncio's loop and on uvloop (which ``sidecar run`` uses): the two differ in
details a byte relay depends on (uvloop ignores ``pause_reading`` inside ``connection_made``). Each runs with the
splice relay (where the platform has it) and with the protocol-based one it falls back to.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvloop

from proxy import splice, tcp
from tests.support.servers import PostgresCluster, postgres_bindir

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    return LOOPS


@pytest.fixture(autouse=True, params=["splice", "protocol"] if splice.AVAILABLE else ["protocol"])
def relay_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    mode: str = request.param
    monkeypatch.setattr(tcp, "SPLICE", mode == "splice")
    return mode


# -- Redis ---------------------------------------------------------------------------------------------------


# -- PostgreSQL ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_cluster() -> Iterator[PostgresCluster]:
    bindir = postgres_bindir()
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="seawall-pg-"))
    try:
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root: hand the directory to the ``postgres`` system user.
            shutil.chown(base, "postgres", "postgres")
            as_user = ["runuser", "-u", "postgres", "--"]
        cluster = PostgresCluster(bindir, base / "data", base, as_user)
        cluster.init()
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
