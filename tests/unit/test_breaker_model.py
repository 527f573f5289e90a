"""The breaker (count mode) against a tiny reference model, over random sequences of calls and time.

The model is written from the contract, not from the implementation: it keeps the list of failure times and
asks "are there ``threshold`` failures in the last ``window`` seconds?", and it marks a permit dead when any
transition happens after it was issued. Times are multiples of 1/8 s, so both sides compute them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from proxy.resilience.breaker import BreakerSettings, CircuitBreaker, Permit, State, Transition

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class ModelPermit:
    probe: bool
    transitions_at_issue: int  # how many transitions had happened when it was issued


@dataclass
class Model:
    threshold: int
    window: float
    open_duration: float
    max_probes: int
    state: str = CLOSED
    opened_at: float = 0.0
    failures: list[float] = field(default_factory=list)
    probes: int = 0
    moves: list[tuple[str, str]] = field(default_factory=list)
    # Passing checks may end an open interval early until a probe they let through fails, for the rest of
    # that outage (until the breaker closes).
    checks_armed: bool = True
    half_open_by_check: bool = False

    def move(self, to: str, now: float, by_check: bool = False) -> None:
        if self.half_open_by_check and self.state == HALF_OPEN and to == OPEN:
            self.checks_armed = False
        self.half_open_by_check = by_check
        self.moves.append((self.state, to))
        self.state = to
        self.probes = 0
        if to == OPEN:
            self.opened_at = now
        if to == CLOSED:
            self.failures = []
            self.checks_armed = True

    def check_passed(self, now: float) -> bool:
        """Checks passed (healthy_threshold of them): an open interval ends early, into half-open."""
        self.observe(now)
        if self.state == OPEN and self.checks_armed:
            self.move(HALF_OPEN, now, by_check=True)
            return True
        return False

    def live(self, permit: ModelPermit) -> bool:
        return permit.transitions_at_issue == len(self.moves)

    def failures_in_window(self, now: float) -> int:
        return sum(1 for t in self.failures if now - t < self.window)

    def observe(self, now: float) -> None:
        """A report looks: an open interval that has elapsed is half-open from then on, asked or not."""
        if self.state == OPEN and now - self.opened_at >= self.open_duration:
            self.move(HALF_OPEN, now)

    def acquire(self, now: float) -> ModelPermit | None:
        self.observe(now)
        if self.state == CLOSED:
            return ModelPermit(False, len(self.moves))
        if self.state == HALF_OPEN and self.probes < self.max_probes:
            self.probes += 1
            return ModelPermit(True, len(self.moves))
        return None

    def success(self, permit: ModelPermit, now: float) -> None:
        if self.live(permit) and permit.probe:
            self.move(CLOSED, now)

    def failure(self, permit: ModelPermit, now: float) -> None:
        if not self.live(permit):
            return
        if permit.probe:
            self.move(OPEN, now)
            return
        self.failures.append(now)
        if self.failures_in_window(now) >= self.threshold:
            self.move(OPEN, now)

    def ignore(self, permit: ModelPermit) -> None:
        if self.live(permit) and permit.probe:
            self.probes -= 1


class BreakerVersusModel(RuleBasedStateMachine):
    permits = Bundle("permits")

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.seen: list[Transition] = []
        self.breaker: CircuitBreaker
        self.model: Model

    @initialize(
        threshold=st.integers(1, 4),
        window_eighths=st.integers(1, 16),
        open_eighths=st.integers(0, 16),
        max_probes=st.integers(1, 3),
    )
    def setup(self, threshold: int, window_eighths: int, open_eighths: int, max_probes: int) -> None:
        window, open_duration = window_eighths / 8, open_eighths / 8
        self.breaker = CircuitBreaker(
            "model",
            BreakerSettings(
                failure_threshold=threshold,
                window=window,
                open_duration=open_duration,
                half_open_max_calls=max_probes,
            ),
            on_transition=self.seen.append,
        )
        self.model = Model(threshold, window, open_duration, max_probes)

    @rule(target=permits)
    def acquire(self) -> object:
        expected = self.model.acquire(self.now)
        got = self.breaker.try_acquire(self.now)
        assert (got is None) == (expected is None), (expected, got)
        if got is None or expected is None:
            return multiple()  # refused: nothing to hand back later
        assert got.probe == expected.probe
        return expected, got

    # Each permit is handed back at most once, as the forwarder does.
    @rule(pair=consumes(permits))
    def succeed(self, pair: tuple[ModelPermit, Permit]) -> None:
        self.model.success(pair[0], self.now)
        self.breaker.record_success(pair[1], self.now)

    @rule(pair=consumes(permits))
    def fail(self, pair: tuple[ModelPermit, Permit]) -> None:
        self.model.failure(pair[0], self.now)
        self.breaker.record_failure(pair[1], self.now)

    @rule(pair=consumes(permits))
    def ignore(self, pair: tuple[ModelPermit, Permit]) -> None:
        self.model.ignore(pair[0])
        self.breaker.record_ignored(pair[1])

    @rule(eighths=st.integers(1, 24))
    def advance(self, eighths: int) -> None:
        self.now += eighths / 8

    # Random steps rarely land on a deadline; these two jump exactly onto one, where off-by-one bugs live.
    @precondition(lambda self: self.model.state == OPEN)
    @rule()
    def advance_to_open_deadline(self) -> None:
        self.now = max(self.now, self.model.opened_at + self.model.open_duration)

    @precondition(lambda self: self.model.failures_in_window(self.now) > 0)
    @rule()
    def advance_until_oldest_failure_expires(self) -> None:
        oldest = min(t for t in self.model.failures if self.now - t < self.model.window)
        self.now = oldest + self.model.window

    @rule()
    def health_check_passed(self) -> None:
        expected = self.model.check_passed(self.now)
        assert self.breaker.half_open_on_health(self.now) is expected

    @rule()
    def reset(self) -> None:
        self.model.move(CLOSED, self.now)
        self.breaker.reset(self.now)

    @invariant()
    def same_state_and_counts(self) -> None:
        snap = self.breaker.snapshot(self.now)
        self.model.observe(self.now)
        assert snap.state.value == self.model.state
        assert snap.half_open_in_flight == self.model.probes
        assert snap.failures_in_window == self.model.failures_in_window(self.now)
        assert snap.health_armed == self.model.checks_armed
        if self.model.state == OPEN:
            expected_wait = max(0.0, self.model.opened_at + self.model.open_duration - self.now)
            assert snap.retry_in == expected_wait
        else:
            assert snap.retry_in == 0.0

    @invariant()
    def same_transitions_each_reported_once(self) -> None:
        assert [(t.from_state.value, t.to_state.value) for t in self.seen] == self.model.moves
        # Every reported move is one the table allows (resets go to CLOSED from anywhere).
        legal = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED), (HALF_OPEN, OPEN)}
        for t in self.seen:
            assert t.to_state is State.CLOSED or (t.from_state.value, t.to_state.value) in legal


BreakerVersusModel.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestBreakerVersusModel = BreakerVersusModel.TestCase
