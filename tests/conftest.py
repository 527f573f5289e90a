"""Shared fixtures. Real servers on loopback; time injected where the logic is pure.

On CI (the ``CI`` environment variable set) a skipped test is a failed one: every program and package the
suite needs is installed there (``make test``), so a skip can only mean a broken install step, which must not
pass silently. ``tests.support.tools.require_tool`` fails such tests itself; this hook catches any other skip.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.support.servers import RedisServer
from tests.support.tools import on_ci, require_tool

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture
def artifacts_dir() -> Path:
    """Where tests leave screenshots and reports for a person to look at (ignored by git)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A throwaway redis-server on loopback (the L4 tests relay to it, the rate-limit tests share a budget in it);
    a test may stop and start it again on the same port."""
    require_tool("redis-server", "Debian package `redis-server`")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and on_ci():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped on CI, which must run every test ({reason})"
    return report
