"""The clock's timers: a ManualClock fires them exactly on their due time, in due order; the system clock's never
fire before their deadline on ``monotonic``, under asyncio's loop and uvloop's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from functools import partial
from typing import Any, TypeVar

import pytest
import uvloop

from proxy.resilience.clock import ManualClock, SystemClock

T = TypeVar("T")


def advance_to(clock: ManualClock, when: float) -> None:
    """Stand exactly on ``when`` (the subtraction of two nearby floats is exact, and so is adding it back)."""
    clock.advance(when - clock.monotonic())
    assert clock.monotonic() == when


def test_a_timer_fires_at_exactly_its_due_time_and_not_a_nanosecond_before() -> None:
    clock = ManualClock()
    fired: list[float] = []
    due = clock.monotonic() + 5.0
    clock.call_later(5.0, lambda: fired.append(clock.monotonic()))
    advance_to(clock, due - 1e-9)
    assert fired == []
    advance_to(clock, due)
    assert fired == [due]
    clock.advance(10.0)
    assert fired == [due], "a timer fires once"


def test_timers_fire_in_due_order_each_seeing_the_clock_at_its_due_time() -> None:
    clock = ManualClock(start=0.0)
    fired: list[tuple[str, float]] = []
    clock.call_later(3.0, lambda: fired.append(("c", clock.monotonic())))
    clock.call_later(1.0, lambda: fired.append(("a", clock.monotonic())))
    clock.call_later(2.0, lambda: fired.append(("b", clock.monotonic())))
    clock.call_later(2.0, lambda: fired.append(("b2", clock.monotonic())))  # same due time: arming order
    clock.advance(10.0)
    assert fired == [("a", 1.0), ("b", 2.0), ("b2", 2.0), ("c", 3.0)]
    assert clock.monotonic() == 10.0


def test_a_timer_armed_by_a_firing_one_fires_in_the_same_advance_if_due_by_then() -> None:
    clock = ManualClock(start=0.0)
    fired: list[str] = []

    def first() -> None:
        fired.append("first")
        clock.call_later(0.0, lambda: fired.append("at once"))
        clock.call_later(1.0, lambda: fired.append("on the target"))  # due at 2.0 == the target
        clock.call_later(1.5, lambda: fired.append("after"))

    clock.call_later(1.0, first)
    clock.advance(2.0)
    assert fired == ["first", "at once", "on the target"]
    assert clock.pending_timers == 1
    clock.advance(0.5)
    assert fired[-1] == "after" and clock.pending_timers == 0


def test_a_cancelled_timer_never_fires_even_when_cancelled_by_an_earlier_one() -> None:
    clock = ManualClock(start=0.0)
    fired: list[str] = []
    later = clock.call_later(2.0, lambda: fired.append("later"))
    clock.call_later(1.0, later.cancel)
    dropped = clock.call_later(0.5, lambda: fired.append("dropped"))
    dropped.cancel()
    assert clock.pending_timers == 2
    clock.advance(5.0)
    assert fired == [] and clock.pending_timers == 0


def test_a_zero_delay_timer_fires_on_advance_zero_and_negative_delays_count_as_zero() -> None:
    clock = ManualClock()
    fired: list[str] = []
    clock.call_later(0.0, lambda: fired.append("zero"))
    clock.call_later(-1.0, lambda: fired.append("negative"))
    assert fired == []  # nothing runs until time is moved
    clock.advance(0.0)
    assert fired == ["zero", "negative"]


async def test_sleepers_and_timers_share_one_order() -> None:
    clock = ManualClock(start=0.0)
    order: list[str] = []

    async def sleeper() -> None:
        await clock.sleep(2.0)
        order.append("slept")

    task = asyncio.create_task(sleeper())
    await asyncio.sleep(0)
    clock.call_later(1.0, lambda: order.append("timer"))
    assert clock.pending_sleepers == 1 and clock.pending_timers == 2
    clock.advance(3.0)
    await task
    assert order == ["timer", "slept"] and clock.pending_sleepers == 0


def _fire(fired: asyncio.Future[float]) -> None:
    fired.set_result(time.monotonic())


async def _timer_deadlines(count: int, delay: float) -> list[float]:
    """How long after ``monotonic() + delay`` each of ``count`` system-clock timers fired (negative: early)."""
    clock, loop = SystemClock(), asyncio.get_running_loop()
    lateness: list[float] = []
    for _ in range(count):
        fired: asyncio.Future[float] = loop.create_future()
        deadline = clock.monotonic() + delay
        clock.call_later(delay, partial(_fire, fired))
        lateness.append(await fired - deadline)
        time.sleep(0.0003)  # land the next arming somewhere inside a millisecond, not on the loop's tick
    return lateness


LOOPS = ("asyncio", "uvloop")


def run_on(loop: str, main: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(main) if loop == "uvloop" else asyncio.run(main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_system_clock_timer_never_fires_before_its_deadline_on_monotonic(loop: str) -> None:
    lateness = run_on(loop, _timer_deadlines(40, 0.0013))
    assert min(lateness) >= 0.0, f"a timer fired {-min(lateness) * 1e3:.3f} ms early"


def test_the_loops_clock_is_the_system_clocks_to_within_its_millisecond() -> None:
    async def brackets() -> list[tuple[float, float, float]]:
        loop, clock = asyncio.get_running_loop(), SystemClock()
        return [(clock.monotonic(), loop.time(), clock.monotonic()) for _ in range(2000)]

    for loop in LOOPS:
        for before, loop_time, after in run_on(loop, brackets()):
            # uvloop's loop.time() is CLOCK_MONOTONIC floored to the millisecond; asyncio's is time.monotonic().
            assert before - 1e-3 <= loop_time <= after, loop


def test_the_wall_clock_moves_with_a_manual_clock_and_is_the_system_time_on_the_system_clock() -> None:
    clock = ManualClock(start=50.0, wall_start=1_800_000_000.0)
    assert clock.wall() == 1_800_000_000.0
    clock.advance(2.5)
    assert (clock.monotonic(), clock.wall()) == (52.5, 1_800_000_002.5)
    before = time.time()
    assert before <= SystemClock().wall() <= time.time()
