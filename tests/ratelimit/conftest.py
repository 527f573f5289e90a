"""Fixtures for the rate-limit tests: a real ``redis-server`` (tests/support/servers.py) that a test can kill,
freeze and start again on the same port.

The tests run on uvloop, the loop ``sidecar run`` uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"uvloop": uvloop.new_event_loop}
