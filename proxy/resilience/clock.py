"""Time, injected.

Breaker and retry logic never read the system clock themselves: they are handed a ``Clock`` (or a ``now``
value taken from one), so tests can stand exactly on a boundary instead of sleeping past it. The data plane's
timers (a connection's header and keep-alive bounds, a body's silences, an upgraded relay's idle bound) are
armed on the clock too, so a test with a ``ManualClock`` fires them by moving time, not by waiting for it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from functools import partial
from typing import Protocol

# uvloop's ``loop.time()`` is CLOCK_MONOTONIC (``time.monotonic``'s clock) floored to the millisecond, and it
# rounds a timer's delay to the millisecond: a timer can fire up to ~1.5 ms before ``monotonic() + delay``.
# Armed this much later, it never fires before its deadline on the clock its owner reads, so the owner's
# check that the deadline has passed holds at the first wake-up instead of re-arming for the last sliver.
TIMER_SLACK = 0.002


class Timer(Protocol):
    """A scheduled callback (``asyncio.TimerHandle`` is one)."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch: what an HTTP date (``Retry-After``, a usage header's reset) is compared with."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        """Call ``callback`` once ``delay`` seconds have passed on this clock, never before."""
        ...


class SystemClock:
    """The real clock: ``monotonic`` is ``loop.time()``'s clock (exactly, under asyncio's loop; to within its
    millisecond under uvloop's), and timers are the running loop's."""

    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, delay: float, callback: Callable[[], object]) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(delay + TIMER_SLACK, callback)


class ManualTimer:
    """A timer on a ``ManualClock``."""

    __slots__ = ("callback", "when")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback: Callable[[], object] | None = callback

    def cancel(self) -> None:
        self.callback = None

    @property
    def cancelled(self) -> bool:
        return self.callback is None


class ManualClock:
    """A clock that moves only when a test calls ``advance``; sleepers wake and timers fire when their time comes."""

    def __init__(self, start: float = 1000.0, wall_start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start  # the wall clock moves with it, from wall_start
        self._timers: list[tuple[float, int, ManualTimer]] = []
        self._sleepers: list[asyncio.Future[None]] = []
        self._order = itertools.count()
        self.slept: list[float] = []  # every requested sleep, for assertions on backoff

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append(waiter)
        timer = self.call_later(seconds, partial(_wake, waiter))
        try:
            await waiter
        finally:
            timer.cancel()
            self._sleepers.remove(waiter)

    def call_later(self, delay: float, callback: Callable[[], object]) -> ManualTimer:
        timer = ManualTimer(self._now + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.when, next(self._order), timer))
        return timer

    def advance(self, seconds: float) -> None:
        """Move time forward, firing every timer due by then in the order they fall due, each with the clock
        standing at its due time; a timer armed by one that fires, due by then too, fires as well."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        target = self._now + seconds
        timers = self._timers
        try:
            while timers and timers[0][0] <= target:
                when, _, timer = heapq.heappop(timers)
                callback = timer.callback
                if callback is not None:
                    timer.callback = None
                    self._now = max(self._now, when)
                    callback()
        finally:
            self._now = target

    @property
    def pending_sleepers(self) -> int:
        return sum(1 for waiter in self._sleepers if not waiter.done())

    @property
    def pending_timers(self) -> int:
        """Timers armed and neither fired nor cancelled (sleepers included)."""
        return sum(1 for _, _, timer in self._timers if not timer.cancelled)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
