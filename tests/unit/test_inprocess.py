"""The in-process decorators, registry and health helper. Time is a ManualClock; nothing sleeps for real."""

from __future__ import annotations

import asyncio
import datetime
import random
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from proxy import inprocess
from proxy.inprocess import (
    BreakerRegistry,
    CircuitOpenError,
    circuit_breaker,
    health_check_endpoint,
    health_check_endpoint_async,
    retry_with_backoff,
)
from proxy.resilience.breaker import State, Transition
from proxy.resilience.clock import ManualClock


class Down(ConnectionError):
    pass


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def registry() -> BreakerRegistry:
    return BreakerRegistry()


class Flaky:
    """A dependency whose next answers are scripted: an exception instance is raised, anything else returned."""

    def __init__(self, *outcomes: object) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> Any:
        self.calls.append(args)
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def call_n(func: Callable[[], Any], n: int) -> list[str]:
    """What n calls produced: 'ok', or the exception's type name."""
    results = []
    for _ in range(n):
        try:
            func()
            results.append("ok")
        except Exception as exc:
            results.append(type(exc).__name__)
    return results


# -- circuit_breaker, sync -------------------------------------------------------------------------------------


def test_opens_after_threshold_and_fails_fast_with_retry_in(clock: ManualClock, registry: BreakerRegistry) -> None:
    dep = Flaky(Down(), Down(), Down())
    guarded = circuit_breaker("dep", failure_threshold=3, timeout=60.0, clock=clock, registry=registry)(dep)
    assert call_n(guarded, 3) == ["Down"] * 3
    clock.advance(15)
    with pytest.raises(CircuitOpenError) as caught:
        guarded()
    assert (caught.value.name, caught.value.retry_in) == ("dep", 45.0)
    assert call_n(guarded, 50) == ["CircuitOpenError"] * 50
    assert len(dep.calls) == 3  # nothing reached the dependency while open
    assert registry.get("dep").state is State.OPEN


def test_fallback_gets_the_callers_arguments_while_open(clock: ManualClock, registry: BreakerRegistry) -> None:
    dep = Flaky(Down())

    def cached(symbol: str, *, fresh: bool) -> dict[str, Any]:
        return {"cached": False, "symbol": symbol, "fresh": fresh}

    @circuit_breaker("cache", failure_threshold=1, fallback=cached, clock=clock, registry=registry)
    def fetch(symbol: str, *, fresh: bool) -> dict[str, Any]:
        return dep(symbol, fresh)  # type: ignore[no-any-return]

    with pytest.raises(Down):
        fetch("EURUSD", fresh=True)
    assert fetch("GBPUSD", fresh=False) == {"cached": False, "symbol": "GBPUSD", "fresh": False}
    assert dep.calls == [("EURUSD", True)]


def test_after_timeout_one_probe_success_closes(clock: ManualClock, registry: BreakerRegistry) -> None:
    seen: list[Transition] = []
    dep = Flaky(Down(), Down())
    guarded = circuit_breaker(
        "svc", failure_threshold=2, timeout=30.0, clock=clock, registry=registry, on_transition=seen.append
    )(dep)
    call_n(guarded, 2)
    clock.advance(29.999)
    assert call_n(guarded, 1) == ["CircuitOpenError"]
    clock.advance(0.001)
    assert call_n(guarded, 1) == ["ok"]  # the probe
    assert registry.get("svc").state is State.CLOSED
    assert [(t.from_state, t.to_state) for t in seen] == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]


def test_a_failed_probe_reopens_for_a_fresh_timeout(clock: ManualClock, registry: BreakerRegistry) -> None:
    guarded = circuit_breaker("svc", failure_threshold=1, timeout=10.0, clock=clock, registry=registry)(
        Flaky(Down(), Down())
    )
    call_n(guarded, 1)
    clock.advance(10)
    assert call_n(guarded, 1) == ["Down"]
    assert registry.get("svc").state is State.OPEN
    assert registry.get("svc").retry_in() == 10.0


def test_unexpected_exceptions_pass_through_and_do_not_count(clock: ManualClock, registry: BreakerRegistry) -> None:
    dep = Flaky(KeyError("no such row"), KeyError("no such row"), Down())
    guarded = circuit_breaker(
        "db", failure_threshold=2, expected_exceptions=(ConnectionError,), clock=clock, registry=registry
    )(dep)
    assert call_n(guarded, 3) == ["KeyError", "KeyError", "Down"]
    assert registry.get("db").failures == 1
    assert registry.get("db").state is State.CLOSED


def test_manual_reset_sets_failures_to_zero_and_state_closed(clock: ManualClock, registry: BreakerRegistry) -> None:
    guarded = circuit_breaker("db", failure_threshold=2, clock=clock, registry=registry)(Flaky(Down(), Down()))
    call_n(guarded, 2)
    breaker = registry.get("db")
    assert (breaker.state, breaker.failures) == (State.OPEN, 2)
    registry.reset("db")
    assert (breaker.state, breaker.failures) == (State.CLOSED, 0)
    assert call_n(guarded, 1) == ["ok"]


def test_name_defaults_to_the_function_and_registrations_share_by_name(
    clock: ManualClock, registry: BreakerRegistry
) -> None:
    @circuit_breaker(clock=clock, registry=registry)
    def query() -> str:
        return "rows"

    assert list(registry.all()) == [f"{__name__}.{query.__qualname__}"]
    assert query.__name__ == "query"  # functools.wraps
    first = circuit_breaker("shared", failure_threshold=2, clock=clock, registry=registry)(Flaky(Down()))
    second = circuit_breaker("shared", failure_threshold=2, clock=clock, registry=registry)(Flaky(Down()))
    call_n(first, 1)
    call_n(second, 1)  # two call sites, one dependency: one breaker
    assert registry.get("shared").state is State.OPEN


def test_a_callable_object_is_named_after_its_type(registry: BreakerRegistry) -> None:
    circuit_breaker(registry=registry)(Flaky())
    retry_with_backoff(sleeper=lambda _: None)(Flaky())()  # logs need a name too
    assert list(registry.all()) == [f"{__name__}.Flaky"]


def test_unknown_breaker_names_raise_with_the_known_ones(registry: BreakerRegistry) -> None:
    circuit_breaker("known", registry=registry)(Flaky())
    with pytest.raises(KeyError, match="no circuit breaker named 'nope' \\(registered: known\\)"):
        registry.get("nope")


def test_module_level_registry(clock: ManualClock) -> None:
    name = "test_inprocess.module_level"
    try:
        guarded = circuit_breaker(name, failure_threshold=1, clock=clock)(Flaky(Down()))
        call_n(guarded, 1)
        assert inprocess.get_breaker(name).state is State.OPEN
        assert name in inprocess.all_breakers()
        inprocess.reset(name)
        assert inprocess.get_breaker(name).state is State.CLOSED
    finally:
        inprocess.REGISTRY.remove(name)


# -- circuit_breaker, async ------------------------------------------------------------------------------------


async def test_async_function_opens_and_uses_an_async_fallback(clock: ManualClock, registry: BreakerRegistry) -> None:
    dep = Flaky(Down(), Down())

    async def fallback(key: str) -> str:
        return f"default-{key}"

    @circuit_breaker("redis", failure_threshold=2, timeout=5.0, fallback=fallback, clock=clock, registry=registry)
    async def get(key: str) -> str:
        await asyncio.sleep(0)
        return str(dep(key))

    for _ in range(2):
        with pytest.raises(Down):
            await get("a")
    assert await get("b") == "default-b"
    clock.advance(5)
    assert await get("c") == "ok"
    assert [c[0] for c in dep.calls] == ["a", "a", "c"]


async def test_async_open_without_fallback_raises(clock: ManualClock, registry: BreakerRegistry) -> None:
    @circuit_breaker("kafka", failure_threshold=1, timeout=8.0, clock=clock, registry=registry)
    async def send() -> None:
        raise Down()

    with pytest.raises(Down):
        await send()
    clock.advance(2)
    with pytest.raises(CircuitOpenError) as caught:
        await send()
    assert caught.value.retry_in == 6.0


async def test_a_cancelled_probe_frees_its_slot(clock: ManualClock, registry: BreakerRegistry) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    fail_first = [True]

    @circuit_breaker("mlflow", failure_threshold=1, timeout=1.0, clock=clock, registry=registry)
    async def call() -> str:
        if fail_first.pop() if fail_first else False:
            raise Down()
        started.set()
        await release.wait()
        return "ok"

    with pytest.raises(Down):
        await call()
    clock.advance(1)
    probe = asyncio.create_task(call())
    await started.wait()
    with pytest.raises(CircuitOpenError):  # the one probe slot is taken
        await call()
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert registry.get("mlflow").state is State.HALF_OPEN  # cancellation is no verdict
    release.set()
    assert await call() == "ok"
    assert registry.get("mlflow").state is State.CLOSED


# -- retry_with_backoff ----------------------------------------------------------------------------------------


def test_sync_retries_with_1_2_4_backoff_then_succeeds() -> None:
    slept: list[float] = []
    dep = Flaky(Down(), Down(), Down(), "done")
    assert retry_with_backoff(exceptions=(Down,), sleeper=slept.append)(dep)() == "done"
    assert slept == [1.0, 2.0, 4.0]
    assert len(dep.calls) == 4


def test_sync_gives_up_after_max_retries_with_the_last_error() -> None:
    slept: list[float] = []
    last = Down("fourth")
    dep = Flaky(Down(), Down(), Down(), last, "never")
    with pytest.raises(Down) as caught:
        retry_with_backoff(max_retries=3, base_delay=0.5, max_delay=1.0, sleeper=slept.append)(dep)()
    assert caught.value is last
    assert slept == [0.5, 1.0, 1.0]


def test_only_the_chosen_exceptions_are_retried() -> None:
    slept: list[float] = []
    dep = Flaky(ValueError("bad input"))
    with pytest.raises(ValueError):
        retry_with_backoff(exceptions=(ConnectionError,), sleeper=slept.append)(dep)()
    assert (len(dep.calls), slept) == (1, [])


def test_zero_retries_is_one_attempt() -> None:
    dep = Flaky(Down())
    with pytest.raises(Down):
        retry_with_backoff(max_retries=0, sleeper=lambda _: None)(dep)()
    assert len(dep.calls) == 1
    with pytest.raises(ValueError):
        retry_with_backoff(max_retries=-1)


def test_jitter_draws_from_a_seeded_random() -> None:
    slept: list[float] = []
    dep = Flaky(Down(), Down(), Down())
    retry_with_backoff(jitter=True, rng=random.Random(3), sleeper=slept.append)(dep)()
    reference = random.Random(3)
    assert slept == [reference.uniform(0, d) for d in (1.0, 2.0, 4.0)]


def test_retry_stops_at_once_when_the_breaker_opens(clock: ManualClock, registry: BreakerRegistry) -> None:
    slept: list[float] = []
    dep = Flaky(Down(), Down(), Down(), Down())

    @retry_with_backoff(max_retries=3, sleeper=slept.append)
    @circuit_breaker("svc", failure_threshold=2, clock=clock, registry=registry)
    def call() -> Any:
        return dep()

    with pytest.raises(CircuitOpenError):
        call()
    # The second failure opened it; the third attempt was refused without reaching the dependency and
    # was not retried: no third sleep.
    assert len(dep.calls) == 2
    assert slept == [1.0, 2.0]


async def drive(clock: ManualClock, task: asyncio.Task[Any]) -> None:
    """Advance the manual clock to each sleeper's deadline until the task ends."""
    while not task.done():
        await asyncio.sleep(0)
        if clock.pending_sleepers:
            clock.advance(clock.slept[-1])


async def test_async_retries_sleep_on_the_clock(clock: ManualClock) -> None:
    dep = Flaky(Down(), Down(), "done")

    @retry_with_backoff(max_retries=3, clock=clock)
    async def call() -> Any:
        return dep()

    task = asyncio.create_task(call())
    await drive(clock, task)
    assert task.result() == "done"
    assert clock.slept == [1.0, 2.0]
    assert clock.monotonic() == 1003.0


async def test_async_retry_gives_up_and_does_not_retry_cancellation(clock: ManualClock) -> None:
    dep = Flaky(*(Down() for _ in range(5)))

    @retry_with_backoff(max_retries=2, base_delay=0.25, clock=clock)
    async def call() -> Any:
        return dep()

    task = asyncio.create_task(call())
    await drive(clock, task)
    with pytest.raises(Down):
        task.result()
    assert clock.slept == [0.25, 0.5]

    @retry_with_backoff(clock=clock)
    async def cancelled() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await cancelled()
    assert clock.slept == [0.25, 0.5]


# -- thread safety ---------------------------------------------------------------------------------------------


def hammer(threads: int, calls: int, func: Callable[[int], None]) -> None:
    barrier = threading.Barrier(threads)

    def worker(index: int) -> None:
        barrier.wait()
        for i in range(calls):
            func(index * calls + i)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()


def test_eight_threads_keep_the_counts_consistent(clock: ManualClock, registry: BreakerRegistry) -> None:
    outcomes = {"ok": 0, "down": 0}
    lock = threading.Lock()

    @circuit_breaker("hot", failure_threshold=1_000_000, clock=clock, registry=registry)
    def call(n: int) -> None:
        if n % 3 == 0:
            raise Down()

    def run(n: int) -> None:
        try:
            call(n)
            kind = "ok"
        except Down:
            kind = "down"
        with lock:
            outcomes[kind] += 1

    hammer(8, 2_000, run)
    snap = registry.get("hot").snapshot()
    assert outcomes == {"ok": 16_000 - 5_334, "down": 5_334}
    assert (snap.total_successes, snap.total_failures, snap.total_rejected) == (10_666, 5_334, 0)
    assert snap.failures_in_window == 5_334


def test_eight_threads_tripping_one_breaker_trip_it_once(clock: ManualClock, registry: BreakerRegistry) -> None:
    seen: list[Transition] = []
    executed = 0
    rejected = 0
    lock = threading.Lock()

    @circuit_breaker("trip", failure_threshold=100, clock=clock, registry=registry, on_transition=seen.append)
    def call() -> None:
        nonlocal executed
        with lock:
            executed += 1
        raise Down()

    def run(_: int) -> None:
        nonlocal rejected
        try:
            call()
        except CircuitOpenError:
            with lock:
                rejected += 1
        except Down:
            pass

    hammer(8, 500, run)
    snap = registry.get("trip").snapshot()
    assert [(t.from_state, t.to_state) for t in seen] == [(State.CLOSED, State.OPEN)]
    # Exactly the threshold counted; calls admitted just before the trip ended stale and were ignored.
    assert snap.total_failures == 100
    assert executed >= 100 and executed + rejected == 4_000
    assert snap.total_rejected == rejected


# -- health ----------------------------------------------------------------------------------------------------


def test_health_all_healthy_with_breakers(clock: ManualClock, registry: BreakerRegistry) -> None:
    circuit_breaker("data-service", clock=clock, registry=registry)(Flaky())
    report = health_check_endpoint({"database": lambda: True, "cache": lambda: True}, registry=registry)
    assert report["status"] == "healthy"
    assert set(report) == {"status", "timestamp", "checks", "circuit_breakers"}
    stamp = datetime.datetime.fromisoformat(report["timestamp"])
    assert stamp.utcoffset() == datetime.timedelta(0)
    assert report["checks"]["database"]["healthy"] is True
    assert report["checks"]["database"]["error"] is None
    assert report["checks"]["database"]["latency_ms"] >= 0
    assert report["circuit_breakers"] == {"data-service": {"state": "closed", "failures": 0, "retry_in": 0.0}}


def test_health_a_failing_or_raising_check_is_unhealthy(registry: BreakerRegistry) -> None:
    def kafka() -> bool:
        raise TimeoutError("no broker answered")

    report = health_check_endpoint({"database": lambda: False, "kafka": kafka, "ok": lambda: True}, registry=registry)
    assert report["status"] == "unhealthy"
    assert report["checks"]["database"] == {**report["checks"]["database"], "healthy": False, "error": None}
    assert report["checks"]["kafka"]["error"] == "TimeoutError: no broker answered"
    assert report["checks"]["ok"]["healthy"] is True


def test_health_an_open_breaker_is_degraded(clock: ManualClock, registry: BreakerRegistry) -> None:
    guarded = circuit_breaker("redis", failure_threshold=2, timeout=60.0, clock=clock, registry=registry)(
        Flaky(Down(), Down())
    )
    call_n(guarded, 2)
    clock.advance(20)
    report = health_check_endpoint({"database": lambda: True}, registry=registry)
    assert report["status"] == "degraded"
    assert report["circuit_breakers"]["redis"] == {"state": "open", "failures": 2, "retry_in": 40.0}
    without = health_check_endpoint({"database": lambda: True}, include_circuit_breakers=False, registry=registry)
    assert without["status"] == "healthy" and "circuit_breakers" not in without


def test_health_sync_endpoint_runs_an_async_check_when_no_loop_runs(registry: BreakerRegistry) -> None:
    async def ping() -> bool:
        await asyncio.sleep(0)
        return True

    assert health_check_endpoint({"mlflow": ping}, registry=registry)["status"] == "healthy"


async def test_health_sync_endpoint_inside_a_loop_reports_async_checks(registry: BreakerRegistry) -> None:
    async def ping() -> bool:
        return True

    report = health_check_endpoint({"mlflow": ping}, registry=registry)
    assert report["status"] == "unhealthy"
    assert "use the async endpoint" in report["checks"]["mlflow"]["error"]


async def test_health_async_endpoint_mixes_checks_and_bounds_each(
    clock: ManualClock, registry: BreakerRegistry
) -> None:
    hang = asyncio.Event()

    async def hung() -> bool:
        await hang.wait()
        return True

    async def fine() -> bool:
        return True

    checks: dict[str, Callable[[], bool | Awaitable[bool]]] = {"db": fine, "sync": lambda: True, "kafka": hung}
    report = await health_check_endpoint_async(checks, timeout=0.001, registry=registry)
    assert report["status"] == "unhealthy"
    assert report["checks"]["db"]["healthy"] and report["checks"]["sync"]["healthy"]
    assert report["checks"]["kafka"] == {
        **report["checks"]["kafka"],
        "healthy": False,
        "error": "timed out after 0.001s",
    }
    assert report["circuit_breakers"] == {}
    healthy = await health_check_endpoint_async({"db": fine}, registry=registry)
    assert healthy["status"] == "healthy"
