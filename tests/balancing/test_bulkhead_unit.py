"""The bulkhead on its own: slots, the line of waiters, hand-over order, pending timeout and cancellation.

Time is a ``ManualClock``: "at once" means no clock time passed, and the pending timeout ends when the test
moves the clock past it, not when a loaded machine gets round to it.
"""

from __future__ import annotations

import asyncio

from proxy.policy.model import LimitsPolicy
from proxy.resilience.bulkhead import Bulkhead
from proxy.resilience.clock import ManualClock


def make(
    max_concurrent: int = 2, max_pending: int = 0, pending_timeout: float = 1.0, clock: ManualClock | None = None
) -> Bulkhead:
    return Bulkhead(LimitsPolicy(max_concurrent, max_pending, pending_timeout), clock or ManualClock())


def test_try_enter_up_to_max_concurrent_then_refuses() -> None:
    bulkhead = make(max_concurrent=2)
    assert bulkhead.try_enter() and bulkhead.try_enter()
    assert not bulkhead.try_enter()
    assert bulkhead.stats.inflight == 2
    bulkhead.leave()
    assert bulkhead.stats.inflight == 1
    assert bulkhead.try_enter()


async def test_no_pending_room_refuses_at_once() -> None:
    clock = ManualClock()
    bulkhead = make(max_concurrent=1, max_pending=0, clock=clock)
    assert await bulkhead.enter()
    started = clock.monotonic()
    assert not await bulkhead.enter()
    assert clock.monotonic() - started < 0.01
    assert clock.slept == []  # refused without waiting on the clock
    assert bulkhead.stats.pending == 0


async def test_a_waiter_gets_the_slot_handed_over_in_order() -> None:
    bulkhead = make(max_concurrent=1, max_pending=2)
    assert await bulkhead.enter()
    first = asyncio.create_task(bulkhead.enter())
    second = asyncio.create_task(bulkhead.enter())
    await asyncio.sleep(0)
    assert bulkhead.stats.pending == 2
    assert not await bulkhead.enter()  # the line is full
    # A newcomer cannot jump the line while someone waits, even right after a slot frees.
    bulkhead.leave()
    assert not bulkhead.try_enter()
    assert await first
    assert not second.done()
    assert bulkhead.stats.inflight == 1  # handed over, not released and re-taken
    bulkhead.leave()
    assert await second
    bulkhead.leave()
    assert bulkhead.stats.inflight == 0 and bulkhead.stats.pending == 0


async def test_pending_timeout_gives_up_with_overload() -> None:
    clock = ManualClock()
    bulkhead = make(max_concurrent=1, max_pending=1, pending_timeout=0.05, clock=clock)
    assert await bulkhead.enter()
    started = clock.monotonic()
    waiting = asyncio.create_task(bulkhead.enter())
    await asyncio.sleep(0)  # the waiter queues and starts its timer...
    await asyncio.sleep(0)  # ...which then sleeps on the clock
    assert bulkhead.stats.pending == 1 and clock.pending_sleepers == 1
    clock.advance(0.04)
    await asyncio.sleep(0)
    assert not waiting.done()  # before the pending timeout: still in line
    clock.advance(0.02)
    assert not await waiting
    waited = clock.monotonic() - started
    assert 0.04 <= waited < 0.5
    assert bulkhead.stats.pending == 0
    bulkhead.leave()
    assert bulkhead.stats.inflight == 0  # nobody left in line: the slot is really free


async def test_a_cancelled_waiter_passes_its_handed_over_slot_on() -> None:
    bulkhead = make(max_concurrent=1, max_pending=2)
    assert await bulkhead.enter()
    first = asyncio.create_task(bulkhead.enter())
    second = asyncio.create_task(bulkhead.enter())
    await asyncio.sleep(0)
    bulkhead.leave()  # hands the slot to ``first``...
    first.cancel()  # ...which is cancelled before it runs: the slot must go on to ``second``
    assert await second
    assert first.cancelled()
    assert bulkhead.stats.inflight == 1 and bulkhead.stats.pending == 0


async def test_a_cancelled_waiter_leaves_the_line() -> None:
    bulkhead = make(max_concurrent=1, max_pending=1)
    assert await bulkhead.enter()
    waiter = asyncio.create_task(bulkhead.enter())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert bulkhead.stats.pending == 0
    bulkhead.leave()
    assert bulkhead.stats.inflight == 0
