"""Wait for something observable to become true, with a deadline: the one polling loop of the suite.

A test that waits for the proxy to do something in the background (a breaker to close, a reload to be applied, a
log line to be written, a server to answer) polls a *probe* until it gives a truthy value or stops raising
``AssertionError``, and fails with a message naming what it waited for and the last thing it saw. Deadlines are
generous (a loaded 2-core CI machine is slow, not wrong): a probe that becomes true returns at once, so a long
timeout only costs time when the test is failing anyway.

    await eventually(lambda: sidecar.process_stats.reloads["success"] == 1, what="the reload")
    body = await eventually(lambda: get_health(session), until=lambda b: b["status"] == "healthy")
    eventually_sync(server_answers, timeout=10, what="redis-server ready")  # blocking, for subprocess tests

Any other exception a probe raises (say, a ``RuntimeError`` because the process under test exited) ends the wait
at once.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

T = TypeVar("T")

TIMEOUT = 10.0  # default deadline, seconds
INTERVAL = 0.02  # default pause between looks, seconds


class _Looks:
    """What the last look saw, for the failure message."""

    def __init__(self, what: str, timeout: float) -> None:
        self.what = what
        self.timeout = timeout
        self.count = 0
        self.last: Any = None
        self.error: AssertionError | None = None
        self.deadline = time.monotonic() + timeout

    def done(self, value: Any, until: Callable[[Any], bool] | None) -> bool:
        self.count += 1
        self.last, self.error = value, None
        return bool(until(value) if until is not None else value)

    def failed(self, error: AssertionError) -> None:
        self.count += 1
        self.error = error

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def failure(self) -> AssertionError:
        seen = f"the last look raised: {self.error}" if self.error is not None else f"the last look saw: {self.last!r}"
        message = f"{self.what or 'condition'}: not within {self.timeout:g}s ({self.count} looks); {seen}"
        failure = AssertionError(message)
        failure.__cause__ = self.error
        return failure


async def eventually(
    probe: Callable[[], Awaitable[T] | T],
    *,
    until: Callable[[T], bool] | None = None,
    timeout: float = TIMEOUT,
    interval: float = INTERVAL,
    what: str = "",
) -> T:
    """Call ``probe`` (sync or async) until its value is truthy — or ``until(value)`` is — and return that value.

    A probe that raises ``AssertionError`` counts as "not yet". Raises ``AssertionError`` naming ``what`` and the
    last value (or assertion) seen when ``timeout`` seconds pass first.
    """
    looks = _Looks(what, timeout)
    while True:
        try:
            value = probe()
            if inspect.isawaitable(value):
                value = await value
            if looks.done(value, until):
                return cast(T, value)
        except AssertionError as error:
            looks.failed(error)
        if looks.expired():
            raise looks.failure()
        await asyncio.sleep(interval)


def eventually_sync(
    probe: Callable[[], T],
    *,
    until: Callable[[T], bool] | None = None,
    timeout: float = TIMEOUT,
    interval: float = INTERVAL,
    what: str = "",
) -> T:
    """``eventually`` for blocking code (subprocess tests, threads): sleeps between looks instead of awaiting."""
    looks = _Looks(what, timeout)
    while True:
        try:
            value = probe()
            if looks.done(value, until):
                return value
        except AssertionError as error:
            looks.failed(error)
        if looks.expired():
            raise looks.failure()
        time.sleep(interval)
