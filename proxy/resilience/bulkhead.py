"""The bulkhead: at most ``max_concurrent`` requests in flight per upstream, ``max_pending`` waiting.

Over the limits the sidecar answers 503 ``overload`` at once; an overload is the sidecar protecting the
upstream, never a sign the upstream failed, so it never counts against the breaker.

HTTP requests may wait in line (``enter``); TCP connections only ever ``try_enter``: a relay slot is held for
the life of a connection, so waiting for one would mostly mean a client hanging on a silent socket.

Like the rest of ``proxy.resilience`` this imports nothing else of the project: the limits are anything with
the three numbers of ``Limits`` (the policy's ``LimitsPolicy`` is one), the in-flight and pending counts live on
a ``Counts`` handed in (the upstream's metric counters) or one of its own, and the pending timeout runs on the
injected ``Clock``, so a test can stand on it with a ``ManualClock``. The sidecar keeps one bulkhead per
upstream across reloads and swaps ``limits``: requests waiting in line keep their place.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from proxy.resilience.clock import Clock


class Limits(Protocol):
    """What the bulkhead enforces (read-only: a reload hands over a new one)."""

    @property
    def max_concurrent(self) -> int: ...
    @property
    def max_pending(self) -> int: ...
    @property
    def pending_timeout(self) -> float: ...


class Counts(Protocol):
    """Where the bulkhead keeps its counts, so they can be a metrics table's own counters."""

    inflight: int
    pending: int


@dataclass(slots=True)
class BulkheadCounts:
    """The counts of a bulkhead that was handed none."""

    inflight: int = 0
    pending: int = 0


class Bulkhead:
    def __init__(self, limits: Limits, clock: Clock, stats: Counts | None = None) -> None:
        self.limits = limits
        self.clock = clock
        self.stats: Counts = stats if stats is not None else BulkheadCounts()
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_enter(self) -> bool:
        """Take a slot without waiting."""
        if self.stats.inflight < self.limits.max_concurrent and not self._waiters:
            self.stats.inflight += 1
            return True
        return False

    async def enter(self) -> bool:
        """Take a slot, waiting up to ``pending_timeout`` (on the clock) in line; False means overload."""
        if self.try_enter():
            return True
        limits = self.limits
        if len(self._waiters) >= limits.max_pending or limits.pending_timeout <= 0:
            return False
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        self.stats.pending += 1
        timer = loop.create_task(self.clock.sleep(limits.pending_timeout))
        try:
            await asyncio.wait((waiter, timer), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.leave()  # the caller is gone: pass the slot on
            raise
        finally:
            timer.cancel()
            if not waiter.done():
                waiter.cancel()  # timed out (or the caller is gone): ``leave`` must never hand it a slot
            self.stats.pending -= 1
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        # Handed over by ``leave`` (possibly just as time ran out), or not: then the wait timed out.
        return waiter.done() and not waiter.cancelled()

    def leave(self) -> None:
        # Hand the slot straight to the first live waiter, so a newcomer cannot jump the line.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.stats.inflight -= 1
