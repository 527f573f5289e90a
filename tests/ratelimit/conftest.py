"""Fixtures for the rate-limit tests: a real ``redis-server`` (tests/support/servers.py) that a test can kill,
freeze and start again on the same port.

The tests run on uvloop, the loop ``sidecar run`` uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvloop

from tests.support.servers import RedisServer
from tests.support.tools import require_tool


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    require_tool("redis-server", "Debian package `redis-server`")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
