"""The in-process ``rate_limit`` decorator: sync and async functions on the sidecar's own rate-limit core, time
driven by hand (a ManualClock, and a sleep that advances it)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from proxy.inprocess import RateLimitedError, get_rate_limit, rate_limit
from proxy.resilience.clock import ManualClock
from proxy.resilience.ratelimit import LimitSpec


def test_a_sync_function_is_refused_past_its_limit_without_waiting() -> None:
    clock = ManualClock()
    calls: list[int] = []

    @rate_limit("sync-refuse", limits=[(3, 1.0)], clock=clock)
    def fetch(i: int) -> int:
        calls.append(i)
        return i

    assert [fetch(i) for i in range(3)] == [0, 1, 2]
    with pytest.raises(RateLimitedError) as refused:
        fetch(3)
    assert refused.value.reason == "rate_limited"
    assert refused.value.retry_in == pytest.approx(1.0)
    assert calls == [0, 1, 2], "a refused call never runs"
    clock.advance(0.999)
    with pytest.raises(RateLimitedError):
        fetch(4)
    clock.advance(0.001)
    assert fetch(5) == 5


def test_a_sync_caller_waits_for_its_tokens_within_max_wait() -> None:
    clock = ManualClock()
    slept: list[float] = []

    def sleep(seconds: float) -> None:  # the injected sleep moves the manual clock
        slept.append(seconds)
        clock.advance(seconds)

    @rate_limit("sync-wait", limits=[(2, 1.0)], max_wait=1.5, clock=clock, sleep=sleep)
    def fetch() -> str:
        return "ok"

    assert [fetch(), fetch(), fetch()] == ["ok"] * 3
    assert slept == [pytest.approx(1.0)], "the third call waited for the window to pass the first"

    @rate_limit("sync-wait-long", limits=[(1, 10.0)], max_wait=1.0, clock=clock, sleep=sleep)
    def rare() -> str:
        return "ok"

    assert rare() == "ok"
    with pytest.raises(RateLimitedError) as refused:  # 10 s away: longer than max_wait, refused without sleeping
        rare()
    assert refused.value.retry_in == pytest.approx(10.0)
    assert len(slept) == 1


def test_weights_and_fixed_windows() -> None:
    clock = ManualClock(start=0.0)
    # The limiter aligns fixed windows to the epoch: with a manual clock, offset = wall time - 0.
    limiter_name = "weights"

    @rate_limit(limiter_name, limits=[LimitSpec(requests=10, per=60.0, fixed=True)], weight=4, clock=clock)
    def heavy() -> None:
        return None

    heavy()
    heavy()
    with pytest.raises(RateLimitedError):
        heavy()  # 8 of 10 spent: 4 more do not fit
    left = get_rate_limit(limiter_name).snapshot().limits[0].left
    assert left == 2


async def test_async_callers_wait_in_arrival_order() -> None:
    clock = ManualClock()
    order: list[int] = []

    @rate_limit("async-order", limits=[(1, 1.0)], max_wait=5.0, clock=clock)
    async def call(i: int) -> None:
        order.append(i)

    await call(0)
    waiters = [asyncio.ensure_future(call(i)) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    for _ in range(3):
        for _ in range(5):
            await asyncio.sleep(0)
        clock.advance(1.0)
    await asyncio.wait_for(asyncio.gather(*waiters), 2)
    assert order == [0, 1, 2, 3]


async def test_an_async_caller_past_max_wait_is_refused() -> None:
    clock = ManualClock()

    @rate_limit("async-refuse", limits=[(1, 1.0)], max_wait=0.5, clock=clock)
    async def call() -> str:
        return "ok"

    assert await call() == "ok"
    with pytest.raises(RateLimitedError) as refused:
        await call()
    assert refused.value.retry_in == pytest.approx(1.0)


def test_threads_share_one_budget() -> None:
    granted: list[float] = []
    lock = threading.Lock()

    @rate_limit("threads", limits=[(5, 0.5)], max_wait=0.0)
    def call() -> None:
        with lock:
            granted.append(time.monotonic())

    errors = 0

    def worker() -> None:
        nonlocal errors
        for _ in range(5):
            try:
                call()
            except RateLimitedError:
                with lock:
                    errors += 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(granted) + errors == 20
    assert len(granted) >= 5
    # No half-second holds more than five grants.
    granted.sort()
    assert all(sum(1 for u in granted if t - 0.5 < u <= t) <= 5 for t in granted)
