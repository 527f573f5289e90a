"""The circuit breaker: a pure state machine, driven by an injected ``now``.

States and the only legal moves between them (one table, as in h11's ``_state.py``)::

    CLOSED ──trip──▶ OPEN ──open_duration elapsed──▶ HALF_OPEN ──probe succeeded──▶ CLOSED
                      ▲ │                              ▲   │
                      │ └──health check passed─────────┘   │
                      └───────probe failed─────────────────┘
    any state ──reset──▶ CLOSED

Passing active checks end an open interval early, into HALF_OPEN, never into CLOSED: whether the upstream is back
is for real calls to prove. A ``/health`` that passes while the calls fail is common (a shallow check), so once a
probe let through by a check has failed, checks end no more open intervals of that outage (until the breaker
closes; the next trip starts afresh); ``open_duration`` still does.

An event the table does not list raises ``IllegalTransition``. Every transition is reported once to
``on_transition`` (which the sidecar turns into one log line and one metric sample).

What trips it, in CLOSED:
- ``failure_threshold`` failures within the last ``window`` seconds (always on);
- optionally a failure rate: ``failure_rate_threshold`` percent of the calls in ``window``, once at least
  ``minimum_calls`` were made (resilience4j's time-based sliding window, in ten buckets);
- optionally slow calls: ``slow_call_rate_threshold`` percent of calls took ``slow_call_duration`` or longer.

Operator overrides (force open / force close, optionally with a time to live) sit on top of the machine:
they change what ``try_acquire`` answers, not the state underneath, so the breaker resumes where it was.

No asyncio and no I/O here: the sidecar is single-threaded, the in-process decorators add a lock.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from proxy.resilience.window import BucketedWindow


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Event(enum.Enum):
    TRIP = "trip"
    COOL_DOWN_ELAPSED = "open_duration_elapsed"
    PROBE_SUCCEEDED = "probe_succeeded"
    PROBE_FAILED = "probe_failed"
    RESET = "reset"
    HEALTH_PASSED = "health_check_passed"


_TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.CLOSED, Event.TRIP): State.OPEN,
    (State.OPEN, Event.COOL_DOWN_ELAPSED): State.HALF_OPEN,
    (State.HALF_OPEN, Event.PROBE_SUCCEEDED): State.CLOSED,
    (State.HALF_OPEN, Event.PROBE_FAILED): State.OPEN,
    (State.CLOSED, Event.RESET): State.CLOSED,
    (State.OPEN, Event.RESET): State.CLOSED,
    (State.HALF_OPEN, Event.RESET): State.CLOSED,
    # Active checks passed (``healthy_threshold`` in a row since it opened): the upstream may be back, so the
    # next calls probe it without waiting out open_duration. Not listed from HALF_OPEN: there the probes decide.
    (State.OPEN, Event.HEALTH_PASSED): State.HALF_OPEN,
}


class IllegalTransition(RuntimeError):
    """An event arrived that the transition table does not allow in the current state."""


class Override(enum.Enum):
    FORCE_OPEN = "force_open"
    FORCE_CLOSE = "force_close"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    failure_threshold: int = 5
    window: float = 60.0
    open_duration: float = 60.0
    half_open_max_calls: int = 1
    failure_rate_threshold: float | None = None  # percent, 0 < x <= 100
    slow_call_duration: float | None = None
    slow_call_rate_threshold: float | None = None  # percent
    minimum_calls: int = 10


@dataclass(frozen=True, slots=True)
class Transition:
    breaker: str
    from_state: State
    to_state: State
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class Permit:
    """Proof that a call was admitted; hand it back with the call's outcome.

    ``generation`` changes on every transition, so an outcome that arrives after the breaker moved on (a slow
    call admitted while CLOSED that ends after the breaker opened) is ignored instead of being misread.
    """

    generation: int
    probe: bool


@dataclass(frozen=True, slots=True)
class Snapshot:
    name: str
    state: State
    override: Override | None
    override_until: float | None
    failures_in_window: int
    calls_in_window: int
    failure_rate: float | None
    slow_call_rate: float | None
    opened_at: float | None
    retry_in: float
    half_open_in_flight: int
    health_armed: bool  # passing checks may still end an open interval early (see ``half_open_on_health``)
    last_transition: Transition | None
    total_successes: int
    total_failures: int
    total_rejected: int

    @property
    def effective_state(self) -> State:
        if self.override is Override.FORCE_OPEN:
            return State.OPEN
        if self.override is Override.FORCE_CLOSE:
            return State.CLOSED
        return self.state


def _seconds(value: float) -> str:
    return f"{value:g}s" if value < 120 or value % 60 else f"{value / 60:g}m"


# Members bound once: reading an attribute of an Enum class costs ~60 ns in CPython 3.11 (try_acquire runs per
# request).
_CLOSED, _OPEN, _HALF_OPEN = State.CLOSED, State.OPEN, State.HALF_OPEN


class CircuitBreaker:
    """One upstream's breaker. All methods take ``now`` from the caller's clock."""

    def __init__(
        self,
        name: str,
        settings: BreakerSettings,
        on_transition: Callable[[Transition], None] | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.on_transition = on_transition
        self._state = _CLOSED
        self._generation = 0
        self._closed_permit = Permit(0, probe=False)
        self._recent_failures: deque[float] = deque(maxlen=settings.failure_threshold)
        # Calls, failures and slow calls over ``window``, for the rate modes.
        self._rates = (
            BucketedWindow(settings.window, counters=3)
            if settings.failure_rate_threshold is not None or settings.slow_call_rate_threshold is not None
            else None
        )
        self._opened_at: float | None = None
        self._probes_in_flight = 0
        # Whether passing checks may still end an open interval early: disarmed for the rest of an outage (until
        # the breaker closes, so every trip from CLOSED starts armed) when a probe that a check let through fails:
        # the check passed while calls failed, it does not see this failure.
        self._health_armed = True
        self._half_open_by_health = False
        self._override: Override | None = None
        self._override_until: float | None = None
        self._last_transition: Transition | None = None
        self.total_successes = 0
        self.total_failures = 0
        self.total_rejected = 0

    # -- admission -------------------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    def try_acquire(self, now: float) -> Permit | None:
        """Admit a call (a ``Permit``) or refuse it (``None``)."""
        if self._override is not None and not self._override_expired(now):
            if self._override is Override.FORCE_CLOSE:
                return self._closed_permit if self._state is _CLOSED else Permit(self._generation, False)
            self.total_rejected += 1
            return None
        state = self._state
        if state is _CLOSED:
            return self._closed_permit
        if state is _OPEN:
            assert self._opened_at is not None
            if now - self._opened_at < self.settings.open_duration:
                self.total_rejected += 1
                return None
            self._fire(Event.COOL_DOWN_ELAPSED, now, Event.COOL_DOWN_ELAPSED.value)
        # HALF_OPEN: a bounded number of probes at once; everyone else waits for their verdict.
        if self._probes_in_flight >= self.settings.half_open_max_calls:
            self.total_rejected += 1
            return None
        self._probes_in_flight += 1
        return Permit(self._generation, probe=True)

    def rejecting(self, now: float) -> bool:
        """Would ``try_acquire`` refuse because the breaker is open? (A peek: takes no probe slot.)"""
        if self._override is not None and not self._override_expired(now):
            return self._override is Override.FORCE_OPEN
        if self._state is _OPEN:
            assert self._opened_at is not None
            return now - self._opened_at < self.settings.open_duration
        return False

    def retry_in(self, now: float) -> float:
        """Seconds until a refused caller may expect a probe to be admitted."""
        if self._override is Override.FORCE_OPEN and not self._override_expired(now):
            if self._override_until is not None:
                return max(0.0, self._override_until - now)
            return self.settings.open_duration
        if self._state is _OPEN and self._opened_at is not None:
            return max(0.0, self._opened_at + self.settings.open_duration - now)
        return 0.0

    # -- outcomes --------------------------------------------------------------------------------------------

    def record_success(self, permit: Permit, now: float, duration: float = 0.0) -> None:
        if permit.generation != self._generation:
            return
        self.total_successes += 1
        slow = self._is_slow(duration)
        if permit.probe:
            self._probes_in_flight -= 1
            if slow and self.settings.slow_call_rate_threshold is not None:
                self._fire(Event.PROBE_FAILED, now, "slow_probe")
            else:
                self._fire(Event.PROBE_SUCCEEDED, now, Event.PROBE_SUCCEEDED.value)
            return
        if self._rates is not None and self._state is _CLOSED:
            self._rates.add_each(now, 1, 0, slow)
            self._trip_on_rates(now)

    def record_failure(self, permit: Permit, now: float, duration: float = 0.0) -> None:
        if permit.generation != self._generation:
            return
        self.total_failures += 1
        if permit.probe:
            self._probes_in_flight -= 1
            self._fire(Event.PROBE_FAILED, now, Event.PROBE_FAILED.value)
            return
        if self._state is not _CLOSED:
            return  # admitted under a force-close override while not closed: reported, not counted
        recent = self._recent_failures
        recent.append(now)
        threshold = self.settings.failure_threshold
        if len(recent) == threshold and now - recent[0] < self.settings.window:
            self._fire(Event.TRIP, now, f"{threshold}_failures_in_{_seconds(self.settings.window)}")
            return
        if self._rates is not None:
            self._rates.add_each(now, 1, 1, self._is_slow(duration))
            self._trip_on_rates(now)

    def record_ignored(self, permit: Permit) -> None:
        """The call ended without a verdict (client gave up, request rejected locally): free its slot."""
        if permit.probe and permit.generation == self._generation:
            self._probes_in_flight -= 1

    def half_open_on_health(self, now: float) -> bool:
        """Active checks say the upstream is back: end the open interval early, so that the next calls probe it
        (True if the breaker moved to HALF_OPEN).

        Only from OPEN: half-open, the probes decide; closed, there is nothing to end. Not once a probe that a
        check let through has failed, until the breaker closes again (``health_armed``). A force-open override
        is the operator's word and stays; so does the state beneath it."""
        if self._override is Override.FORCE_OPEN and not self._override_expired(now):
            return False
        self._elapse(now)  # an interval that ended by itself ended by open_duration, whatever the checks say
        if self._state is not _OPEN or not self._health_armed:
            return False
        self._fire(Event.HEALTH_PASSED, now, Event.HEALTH_PASSED.value)
        return True

    @property
    def health_armed(self) -> bool:
        """May passing checks still end an open interval early (see ``half_open_on_health``)?"""
        return self._health_armed

    # -- operator controls -----------------------------------------------------------------------------------

    def reset(self, now: float, reason: str = "manual_reset") -> None:
        """Back to CLOSED with every count cleared (the original design's manual reset)."""
        self._override = None
        self._override_until = None
        self._fire(Event.RESET, now, reason)

    def set_override(self, override: Override | None, now: float, ttl: float | None = None) -> None:
        self._override = override
        self._override_until = None if override is None or ttl is None else now + ttl

    @property
    def override(self) -> Override | None:
        return self._override

    @property
    def last_transition(self) -> Transition | None:
        return self._last_transition

    # -- reporting -------------------------------------------------------------------------------------------

    def snapshot(self, now: float) -> Snapshot:
        self._override_expired(now)
        # Reported as it is: half-open (the next call is a probe), without waiting for a request to move it.
        self._elapse(now)
        window_start = now - self.settings.window
        failures = sum(1 for t in self._recent_failures if t > window_start)
        calls = 0
        failure_rate = slow_rate = None
        if self._rates is not None:
            calls, rate_failures, slow = self._rates.totals(now)
            failures = max(failures, rate_failures)
            if calls:
                failure_rate = 100.0 * rate_failures / calls
                slow_rate = 100.0 * slow / calls
        return Snapshot(
            name=self.name,
            state=self._state,
            override=self._override,
            override_until=self._override_until,
            failures_in_window=failures,
            calls_in_window=calls,
            failure_rate=failure_rate,
            slow_call_rate=slow_rate,
            opened_at=self._opened_at,
            retry_in=self.retry_in(now),
            half_open_in_flight=self._probes_in_flight,
            health_armed=self._health_armed,
            last_transition=self._last_transition,
            total_successes=self.total_successes,
            total_failures=self.total_failures,
            total_rejected=self.total_rejected,
        )

    # -- internals -------------------------------------------------------------------------------------------

    def _is_slow(self, duration: float) -> bool:
        limit = self.settings.slow_call_duration
        return limit is not None and duration >= limit

    def _elapse(self, now: float) -> None:
        """An open interval that has elapsed is half-open from then on, whether a request came or not; the
        transition is dated when the interval elapsed, not when someone looked."""
        if self._state is _OPEN and self._opened_at is not None:
            elapsed_at = self._opened_at + self.settings.open_duration
            if now >= elapsed_at:
                self._fire(Event.COOL_DOWN_ELAPSED, elapsed_at, Event.COOL_DOWN_ELAPSED.value)

    def _trip_on_rates(self, now: float) -> None:
        assert self._rates is not None
        settings = self.settings
        calls, failures, slow = self._rates.totals(now)
        if calls < settings.minimum_calls:
            return
        rate_limit = settings.failure_rate_threshold
        if rate_limit is not None and 100.0 * failures / calls >= rate_limit:
            self._fire(Event.TRIP, now, f"failure_rate_{math.floor(100 * failures / calls)}%_of_{calls}_calls")
            return
        slow_limit = settings.slow_call_rate_threshold
        if slow_limit is not None and 100.0 * slow / calls >= slow_limit:
            self._fire(Event.TRIP, now, f"slow_call_rate_{math.floor(100 * slow / calls)}%_of_{calls}_calls")

    def _override_expired(self, now: float) -> bool:
        until = self._override_until
        if until is not None and now >= until:
            self._override = None
            self._override_until = None
            return True
        return self._override is None

    def _fire(self, event: Event, now: float, reason: str) -> None:
        from_state = self._state
        to_state = _TRANSITIONS.get((from_state, event))
        if to_state is None:
            raise IllegalTransition(f"breaker {self.name!r}: {event.value} is not allowed in {from_state.value}")
        self._state = to_state
        self._generation += 1
        self._closed_permit = Permit(self._generation, probe=False)
        self._probes_in_flight = 0
        if event is Event.PROBE_FAILED and self._half_open_by_health:
            self._health_armed = False
        self._half_open_by_health = event is Event.HEALTH_PASSED
        if to_state is _OPEN:
            self._opened_at = now
        elif to_state is _CLOSED:
            self._health_armed = True  # the outage is over: the next trip starts one the checks may end early
            self._opened_at = None
            self._recent_failures.clear()
            if self._rates is not None:
                self._rates.clear()
        transition = Transition(self.name, from_state, to_state, reason, now)
        self._last_transition = transition
        if self.on_transition is not None:
            self.on_transition(transition)
