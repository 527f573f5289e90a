"""The in-process API (the original design's ``common_utils.circuit_breaker``), on the sidecar's own cores.

::

    @circuit_breaker(name="data-service", failure_threshold=5, timeout=60.0, fallback=lambda *a, **k: {"cached": False})
    @retry_with_backoff(max_retries=3, base_delay=1.0, exceptions=(ConnectionError,))
    async def fetch_features(symbol: str) -> dict[str, float]: ...

    health_check_endpoint({"database": db_ping, "cache": redis_ping})

- ``circuit_breaker`` wraps sync and async functions. While the breaker is open it calls ``fallback`` with the
  same arguments, or raises ``CircuitOpenError`` (with ``retry_in``). Exceptions in ``expected_exceptions``
  count as failures; any other ``Exception`` means the dependency answered (like a 4xx) and counts as a
  success; cancellation and other ``BaseException`` s give no verdict.
- ``retry_with_backoff`` retries on ``exceptions`` with ``base_delay · 2ⁿ`` capped at ``max_delay`` (1 s → 2 s →
  4 s by default, no jitter, as the original design specifies). It never retries ``CircuitOpenError``: once the
  breaker has opened, more attempts would only be refused.
- Breakers live in a registry by name, so ``/health`` and ``health_check_endpoint`` can report them.

The core (``proxy.resilience.breaker``) is single-threaded by design; here each breaker gets a lock held only around
core calls, never around the user's function.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import inspect
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar, cast

from proxy.resilience.breaker import BreakerSettings, CircuitBreaker, Permit, Snapshot, State, Transition
from proxy.resilience.clock import Clock, SystemClock
from proxy.resilience.ratelimit import LimitSpec, LocalBackend, RateGate, RateSnapshot, Verdict
from proxy.resilience.retry import backoff_delays

__all__ = [
    "BreakerRegistry",
    "CircuitOpenError",
    "InProcessBreaker",
    "InProcessRateLimit",
    "RateLimitedError",
    "all_breakers",
    "circuit_breaker",
    "get_breaker",
    "get_rate_limit",
    "health_check_endpoint",
    "health_check_endpoint_async",
    "rate_limit",
    "reset",
    "retry_with_backoff",
]

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("seawall.inprocess")


class CircuitOpenError(Exception):
    """The breaker refused the call; ``retry_in`` is the number of seconds until it will try a probe."""

    def __init__(self, name: str, retry_in: float) -> None:
        super().__init__(f"circuit {name!r} is open; retry in {retry_in:.3g}s")
        self.name = name
        self.retry_in = retry_in


class InProcessBreaker:
    """One named breaker: the pure core, its clock, and a lock so threads can share it."""

    def __init__(
        self,
        name: str,
        settings: BreakerSettings,
        clock: Clock | None = None,
        on_transition: Callable[[Transition], None] | None = None,
    ) -> None:
        self.name = name
        self.clock: Clock = clock or SystemClock()
        self._listener = on_transition
        # Reentrant: an on_transition listener may read the breaker's snapshot.
        self._lock = threading.RLock()
        self._core = CircuitBreaker(name, settings, on_transition=self._on_transition)

    @property
    def settings(self) -> BreakerSettings:
        return self._core.settings

    def _on_transition(self, transition: Transition) -> None:
        log.warning(
            "circuit %s: %s -> %s (%s)",
            transition.breaker,
            transition.from_state.value,
            transition.to_state.value,
            transition.reason,
        )
        if self._listener is not None:
            self._listener(transition)

    def acquire(self) -> Permit | None:
        with self._lock:
            return self._core.try_acquire(self.clock.monotonic())

    def record_success(self, permit: Permit, duration: float = 0.0) -> None:
        with self._lock:
            self._core.record_success(permit, self.clock.monotonic(), duration)

    def record_failure(self, permit: Permit, duration: float = 0.0) -> None:
        with self._lock:
            self._core.record_failure(permit, self.clock.monotonic(), duration)

    def record_ignored(self, permit: Permit) -> None:
        with self._lock:
            self._core.record_ignored(permit)

    def reset(self) -> None:
        """Manual reset: failures to 0, state CLOSED, any override cleared."""
        with self._lock:
            self._core.reset(self.clock.monotonic())

    def retry_in(self) -> float:
        with self._lock:
            return self._core.retry_in(self.clock.monotonic())

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._core.snapshot(self.clock.monotonic())

    @property
    def state(self) -> State:
        return self.snapshot().effective_state

    @property
    def failures(self) -> int:
        return self.snapshot().failures_in_window

    def open_error(self) -> CircuitOpenError:
        return CircuitOpenError(self.name, self.retry_in())


class BreakerRegistry:
    """Breakers by name. The first registration of a name decides its settings; later ones share it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._breakers: dict[str, InProcessBreaker] = {}

    def get_or_create(
        self,
        name: str,
        settings: BreakerSettings,
        clock: Clock | None = None,
        on_transition: Callable[[Transition], None] | None = None,
    ) -> InProcessBreaker:
        with self._lock:
            breaker = self._breakers.get(name)
            if breaker is None:
                breaker = InProcessBreaker(name, settings, clock, on_transition)
                self._breakers[name] = breaker
            elif breaker.settings != settings:
                log.warning("circuit %s already registered with other settings; sharing the first", name)
            return breaker

    def get(self, name: str) -> InProcessBreaker:
        with self._lock:
            try:
                return self._breakers[name]
            except KeyError:
                known = ", ".join(sorted(self._breakers)) or "none"
                raise KeyError(f"no circuit breaker named {name!r} (registered: {known})") from None

    def all(self) -> dict[str, InProcessBreaker]:
        with self._lock:
            return dict(self._breakers)

    def reset(self, name: str) -> None:
        self.get(name).reset()

    def remove(self, name: str) -> None:
        with self._lock:
            self._breakers.pop(name, None)


REGISTRY = BreakerRegistry()


def get_breaker(name: str) -> InProcessBreaker:
    """The registered breaker called ``name``; KeyError (listing the known names) if there is none."""
    return REGISTRY.get(name)


def all_breakers() -> dict[str, InProcessBreaker]:
    return REGISTRY.all()


def reset(name: str) -> None:
    """Manual reset of one breaker: failures to 0, state CLOSED."""
    REGISTRY.reset(name)


def _qualified_name(func: Callable[..., Any]) -> str:
    # Callable objects and partials have no __qualname__; fall back to their type's.
    owner = func if hasattr(func, "__qualname__") else type(func)
    return f"{owner.__module__}.{owner.__qualname__}"


# -- circuit_breaker -------------------------------------------------------------------------------------------


def circuit_breaker(
    name: str | None = None,
    failure_threshold: int = 5,
    timeout: float = 60.0,
    fallback: Callable[..., Any] | None = None,
    expected_exceptions: tuple[type[BaseException], ...] = (Exception,),
    clock: Clock | None = None,
    *,
    window: float = 60.0,
    half_open_max_calls: int = 1,
    on_transition: Callable[[Transition], None] | None = None,
    registry: BreakerRegistry | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Guard a sync or async function with the named breaker (``timeout`` is the open duration, in seconds).

    ``name`` defaults to the function's qualified name. ``fallback`` may be sync or async for an async function.
    """
    settings = BreakerSettings(
        failure_threshold=failure_threshold,
        window=window,
        open_duration=timeout,
        half_open_max_calls=half_open_max_calls,
    )

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        breaker = (registry or REGISTRY).get_or_create(name or _qualified_name(func), settings, clock, on_transition)
        monotonic = breaker.clock.monotonic

        def settle(permit: Permit, started: float, exc: BaseException | None) -> None:
            duration = monotonic() - started
            if exc is None:
                breaker.record_success(permit, duration)
            elif isinstance(exc, expected_exceptions):
                breaker.record_failure(permit, duration)
            elif isinstance(exc, Exception):
                breaker.record_success(permit, duration)  # the dependency answered, with an error of ours
            else:
                breaker.record_ignored(permit)  # cancelled or interrupted: no verdict, free a probe slot

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                permit = breaker.acquire()
                if permit is None:
                    if fallback is None:
                        raise breaker.open_error()
                    result = fallback(*args, **kwargs)
                    return await result if inspect.isawaitable(result) else result
                started = monotonic()
                try:
                    value = await func(*args, **kwargs)
                except BaseException as exc:
                    settle(permit, started, exc)
                    raise
                settle(permit, started, None)
                return value

            return cast(Callable[P, R], async_wrapper)

        @functools.wraps(func)
        def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            permit = breaker.acquire()
            if permit is None:
                if fallback is None:
                    raise breaker.open_error()
                return cast(R, fallback(*args, **kwargs))
            started = monotonic()
            try:
                value = func(*args, **kwargs)
            except BaseException as exc:
                settle(permit, started, exc)
                raise
            settle(permit, started, None)
            return value

        return sync_wrapper

    return decorate


# -- rate_limit ------------------------------------------------------------------------------------------------


class RateLimitedError(Exception):
    """The call could not get its tokens within ``max_wait``; ``retry_in`` seconds until it could."""

    def __init__(self, name: str, retry_in: float, reason: str) -> None:
        super().__init__(f"rate limit {name!r}: {reason}; retry in {retry_in:.3g}s")
        self.name = name
        self.retry_in = retry_in
        self.reason = reason


class InProcessRateLimit:
    """One named outbound rate limit on the sidecar's core (``proxy.resilience.ratelimit``): exact sliding or
    calendar windows, weights, a FIFO line. Threads take turns in arrival order (a ticket line under a condition
    variable); async callers wait in the core's ``RateGate`` on their event loop; both spend from one backend,
    under one lock held only around the core's calls."""

    def __init__(
        self,
        name: str,
        limits: Sequence[LimitSpec],
        clock: Clock | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.name = name
        self.clock: Clock = clock or SystemClock()
        self._sleep = sleep
        self.backend = LocalBackend(limits, epoch_offset=self.clock.wall() - self.clock.monotonic())
        self._lock = threading.Lock()
        self._turns = threading.Condition(threading.Lock())
        self._next_ticket = 0
        self._serving = 0
        self._abandoned: set[int] = set()  # tickets whose callers gave up before their turn
        self._gates: dict[asyncio.AbstractEventLoop, RateGate] = {}

    def cool_down(self, seconds: float) -> None:
        """Pause every caller for ``seconds`` (e.g. on a 429 with Retry-After)."""
        with self._lock:
            self.backend.cool_down(seconds, self.clock.monotonic())

    def _take_now(self, weight: int) -> Verdict:
        with self._lock:
            verdict = self.backend.take_now(weight, None, self.clock.monotonic())
        assert verdict is not None  # a local backend always answers at once
        return verdict

    def acquire_sync(self, weight: int, max_wait: float) -> None:
        """Block until the tokens are spent, in arrival order among threads; RateLimitedError past max_wait."""
        deadline = self.clock.monotonic() + max_wait
        with self._turns:
            ticket = self._next_ticket
            self._next_ticket += 1
            while self._serving != ticket:
                left = deadline - self.clock.monotonic()
                timed_out = left <= 0 or not self._turns.wait(left)
                if timed_out and self._serving != ticket:
                    # Too late for our turn: leave the line without holding up those behind us.
                    self._abandoned.add(ticket)
                    raise RateLimitedError(self.name, max(left, 0.001), "rate_limited")
        try:
            while True:
                verdict = self._take_now(weight)
                if verdict.granted:
                    return
                if self.clock.monotonic() + verdict.wait > deadline:
                    raise RateLimitedError(self.name, verdict.wait, str(verdict.reason))
                self._sleep(verdict.wait)
        finally:
            with self._turns:
                self._serving += 1
                self._skip_abandoned()
                self._turns.notify_all()

    def _skip_abandoned(self) -> None:
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1

    async def acquire_async(self, weight: int, max_wait: float) -> None:
        loop = asyncio.get_running_loop()
        gate = self._gates.get(loop)
        if gate is None:
            gate = self._gates[loop] = RateGate(_LockedBackend(self.backend, self._lock), self.clock)
        verdict = gate.try_acquire(weight, None, max_wait)
        if verdict is None:
            verdict = await gate.acquire(weight, None, max_wait)
        if not verdict.granted:
            raise RateLimitedError(self.name, verdict.wait, str(verdict.reason))

    def snapshot(self) -> RateSnapshot:
        with self._lock:
            return self.backend.snapshot(self.clock.monotonic())


class _LockedBackend:
    """The shared local backend seen from one event loop's gate: every call under the limit's lock."""

    def __init__(self, backend: LocalBackend, lock: threading.Lock) -> None:
        self._backend = backend
        self._lock = lock

    def take_now(self, weight: int, route: str | None, now: float) -> Verdict | None:
        with self._lock:
            return self._backend.take_now(weight, route, now)

    async def take(self, weight: int, route: str | None, now: float) -> Verdict:
        verdict = self.take_now(weight, route, now)
        assert verdict is not None
        return verdict

    def cool_down(self, seconds: float, now: float) -> None:
        with self._lock:
            self._backend.cool_down(seconds, now)

    def observe(
        self,
        limit: int,
        now: float,
        *,
        used: int | None = None,
        remaining: int | None = None,
        reset: float | None = None,
    ) -> None:
        with self._lock:
            self._backend.observe(limit, now, used=used, remaining=remaining, reset=reset)

    def snapshot(self, now: float) -> RateSnapshot:
        with self._lock:
            return self._backend.snapshot(now)


_RATE_LIMITS: dict[str, InProcessRateLimit] = {}
_RATE_LIMITS_LOCK = threading.Lock()


def get_rate_limit(name: str) -> InProcessRateLimit:
    return _RATE_LIMITS[name]


def rate_limit(
    name: str | None = None,
    *,
    limits: Sequence[tuple[int, float] | LimitSpec],
    max_wait: float = 0.0,
    weight: int = 1,
    clock: Clock | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Limit a sync or async function's calls: every limit ``(requests, per_seconds)`` (sliding: no span of
    ``per`` holds more) or ``LimitSpec`` (``fixed=True`` for calendar windows) must allow a call, which costs
    ``weight``. A caller waits in line up to ``max_wait``, else ``RateLimitedError``. Functions decorated with
    the same ``name`` share one budget."""
    specs = [spec if isinstance(spec, LimitSpec) else LimitSpec(requests=spec[0], per=spec[1]) for spec in limits]

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        key = name or _qualified_name(func)
        with _RATE_LIMITS_LOCK:
            limiter = _RATE_LIMITS.get(key)
            if limiter is None:
                limiter = _RATE_LIMITS[key] = InProcessRateLimit(key, specs, clock, sleep)

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                await limiter.acquire_async(weight, max_wait)
                return await func(*args, **kwargs)

            return cast(Callable[P, R], async_wrapper)

        @functools.wraps(func)
        def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            limiter.acquire_sync(weight, max_wait)
            return func(*args, **kwargs)

        return sync_wrapper

    return decorate


# -- retry_with_backoff ----------------------------------------------------------------------------------------


def retry_with_backoff(
    max_retries: int = 3,
    base_delay: float = 1.0,
    max_delay: float = 4.0,
    exceptions: tuple[type[BaseException], ...] = (Exception,),
    jitter: bool = False,
    clock: Clock | None = None,
    *,
    sleeper: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Retry a sync or async function on ``exceptions``, up to ``max_retries`` times after the first call.

    Sync functions wait with ``sleeper`` (``time.sleep``); async ones with ``clock.sleep``. The last exception
    is re-raised when the retries run out.
    """
    if max_retries < 0:
        raise ValueError("max_retries must be ≥ 0")

    def retryable(exc: BaseException) -> bool:
        return isinstance(exc, exceptions) and not isinstance(exc, CircuitOpenError)

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        label = _qualified_name(func)
        if inspect.iscoroutinefunction(func):
            waiter: Clock = clock or SystemClock()

            @functools.wraps(func)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                delays = backoff_delays(base_delay, max_delay, jitter, rng)
                for attempt in range(max_retries + 1):
                    try:
                        return await func(*args, **kwargs)
                    except BaseException as exc:
                        if attempt == max_retries or not retryable(exc):
                            raise
                        delay = next(delays)
                        log.info("retry %d/%d of %s in %.3gs: %r", attempt + 1, max_retries, label, delay, exc)
                    await waiter.sleep(delay)
                raise AssertionError("unreachable")  # the loop returns or raises

            return cast(Callable[P, R], async_wrapper)

        @functools.wraps(func)
        def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            delays = backoff_delays(base_delay, max_delay, jitter, rng)
            for attempt in range(max_retries + 1):
                try:
                    return func(*args, **kwargs)
                except BaseException as exc:
                    if attempt == max_retries or not retryable(exc):
                        raise
                    delay = next(delays)
                    log.info("retry %d/%d of %s in %.3gs: %r", attempt + 1, max_retries, label, delay, exc)
                sleeper(delay)
            raise AssertionError("unreachable")

        return sync_wrapper

    return decorate


# -- health ----------------------------------------------------------------------------------------------------

HealthCheck = Callable[[], bool | Awaitable[bool]]


def _check_result(healthy: bool, started: float, error: str | None) -> dict[str, Any]:
    return {
        "healthy": healthy,
        "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        "error": error,
    }


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _run_sync_check(check: HealthCheck) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        result = check()
        if inspect.isawaitable(result):
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                result = asyncio.run(_await(result))
            else:
                if inspect.iscoroutine(result):
                    result.close()  # never awaited: close it rather than leak a warning
                return _check_result(False, started, "async check inside a running loop: use the async endpoint")
        return _check_result(bool(result), started, None)
    except Exception as exc:
        return _check_result(False, started, _describe(exc))


async def _await(result: Awaitable[bool]) -> bool:
    return await result


async def _run_async_check(check: HealthCheck, timeout: float | None) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            result = check()
            if inspect.isawaitable(result):
                result = await result
        return _check_result(bool(result), started, None)
    except TimeoutError:
        return _check_result(False, started, f"timed out after {timeout:g}s")
    except Exception as exc:
        return _check_result(False, started, _describe(exc))


def _report(
    checks: dict[str, dict[str, Any]], include_circuit_breakers: bool, registry: BreakerRegistry | None
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "status": "healthy",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(),
        "checks": checks,
    }
    not_closed = False
    if include_circuit_breakers:
        breakers: dict[str, Any] = {}
        for name, breaker in sorted((registry or REGISTRY).all().items()):
            snap = breaker.snapshot()
            state = snap.effective_state
            not_closed |= state is not State.CLOSED
            breakers[name] = {"state": state.value, "failures": snap.failures_in_window, "retry_in": snap.retry_in}
        report["circuit_breakers"] = breakers
    # A failed check means a dependency is down; an open breaker means callers are on their fallbacks.
    if any(not c["healthy"] for c in checks.values()):
        report["status"] = "unhealthy"
    elif not_closed:
        report["status"] = "degraded"
    return report


def health_check_endpoint(
    checks: Mapping[str, HealthCheck],
    include_circuit_breakers: bool = True,
    *,
    registry: BreakerRegistry | None = None,
) -> dict[str, Any]:
    """``{status, timestamp, checks, circuit_breakers}``: unhealthy if a check fails, degraded if a breaker is
    not closed, healthy otherwise. Checks run one after another; an async check is run to completion only when
    no event loop is running (else use ``health_check_endpoint_async``)."""
    results = {name: _run_sync_check(check) for name, check in checks.items()}
    return _report(results, include_circuit_breakers, registry)


async def health_check_endpoint_async(
    checks: Mapping[str, HealthCheck],
    include_circuit_breakers: bool = True,
    *,
    timeout: float | None = 5.0,
    registry: BreakerRegistry | None = None,
) -> dict[str, Any]:
    """As ``health_check_endpoint``, with the checks run concurrently, each bounded by ``timeout`` seconds."""
    names = list(checks)
    results = await asyncio.gather(*(_run_async_check(checks[name], timeout) for name in names))
    return _report(dict(zip(names, results, strict=True)), include_circuit_breakers, registry)
