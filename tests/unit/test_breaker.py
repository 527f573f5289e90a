"""The breaker core, driven with explicit ``now`` values that sit exactly on each boundary.

Times are binary fractions of a second (or exact sums of them) so no assertion depends on float rounding.
"""

from __future__ import annotations

import pytest

from proxy.resilience.breaker import (
    BreakerSettings,
    CircuitBreaker,
    IllegalTransition,
    Override,
    Permit,
    State,
    Transition,
)

T0 = 1000.0


class Recorder:
    """Collects every transition the breaker reports."""

    def __init__(self) -> None:
        self.transitions: list[Transition] = []

    def __call__(self, transition: Transition) -> None:
        self.transitions.append(transition)

    @property
    def moves(self) -> list[tuple[str, str, str]]:
        return [(t.from_state.value, t.to_state.value, t.reason) for t in self.transitions]


def make(**overrides: object) -> tuple[CircuitBreaker, Recorder]:
    base: dict[str, object] = {"failure_threshold": 3, "window": 60.0, "open_duration": 1.0}
    base.update(overrides)
    recorder = Recorder()
    return CircuitBreaker("db", BreakerSettings(**base), on_transition=recorder), recorder  # type: ignore[arg-type]


def fail_n(breaker: CircuitBreaker, n: int, now: float) -> None:
    for _ in range(n):
        permit = breaker.try_acquire(now)
        assert permit is not None
        breaker.record_failure(permit, now)


def open_breaker(breaker: CircuitBreaker, now: float = T0) -> None:
    fail_n(breaker, breaker.settings.failure_threshold, now)
    assert breaker.state is State.OPEN


def probe(breaker: CircuitBreaker, now: float) -> Permit:
    permit = breaker.try_acquire(now)
    assert permit is not None and permit.probe
    return permit


# -- closed → open ---------------------------------------------------------------------------------------------


def test_threshold_failures_open_it_and_the_reason_names_count_and_window() -> None:
    breaker, rec = make()
    fail_n(breaker, 2, T0)
    assert breaker.state is State.CLOSED
    assert breaker.try_acquire(T0) is not None
    fail_n(breaker, 1, T0)
    assert breaker.state is State.OPEN
    assert rec.moves == [("closed", "open", "3_failures_in_60s")]
    assert rec.transitions[0].at == T0 and rec.transitions[0].breaker == "db"


@pytest.mark.parametrize(("window", "label"), [(60.0, "60s"), (120.0, "2m"), (0.5, "0.5s"), (90.0, "90s")])
def test_trip_reason_formats_the_window(window: float, label: str) -> None:
    breaker, rec = make(failure_threshold=2, window=window)
    fail_n(breaker, 2, T0)
    assert rec.moves == [("closed", "open", f"2_failures_in_{label}")]


def test_failures_spread_just_inside_the_window_trip() -> None:
    breaker, rec = make(window=60.0)
    fail_n(breaker, 1, T0)
    fail_n(breaker, 1, T0 + 30)
    fail_n(breaker, 1, T0 + 59.9990234375)  # < 60 s after the first
    assert breaker.state is State.OPEN
    assert len(rec.transitions) == 1


def test_a_failure_exactly_window_old_no_longer_counts() -> None:
    breaker, rec = make(window=60.0)
    fail_n(breaker, 1, T0)
    fail_n(breaker, 1, T0 + 30)
    fail_n(breaker, 1, T0 + 60)  # the first is now exactly 60 s old: outside
    assert breaker.state is State.CLOSED
    assert breaker.snapshot(T0 + 60).failures_in_window == 2
    fail_n(breaker, 1, T0 + 60)  # three within (T0, T0+60]
    assert breaker.state is State.OPEN
    assert rec.moves == [("closed", "open", "3_failures_in_60s")]


def test_successes_in_closed_do_not_clear_failures() -> None:
    # The count is "failures within window", not "consecutive failures".
    breaker, _ = make()
    fail_n(breaker, 2, T0)
    permit = breaker.try_acquire(T0 + 1)
    assert permit is not None
    breaker.record_success(permit, T0 + 1)
    fail_n(breaker, 1, T0 + 2)
    assert breaker.state is State.OPEN


def test_threshold_one_opens_on_the_first_failure() -> None:
    breaker, rec = make(failure_threshold=1)
    fail_n(breaker, 1, T0)
    assert rec.moves == [("closed", "open", "1_failures_in_60s")]


# -- open → half-open ------------------------------------------------------------------------------------------


def test_open_rejects_until_open_duration_then_admits_exactly_one_probe() -> None:
    breaker, rec = make(open_duration=1.0)
    open_breaker(breaker)
    assert breaker.try_acquire(T0) is None
    assert breaker.try_acquire(T0 + 0.999) is None
    assert breaker.state is State.OPEN
    assert breaker.retry_in(T0 + 0.75) == 0.25
    permit = breaker.try_acquire(T0 + 1.0)
    assert permit is not None and permit.probe
    assert breaker.state is State.HALF_OPEN
    assert breaker.retry_in(T0 + 1.0) == 0.0
    assert rec.moves[-1] == ("open", "half_open", "open_duration_elapsed")
    assert breaker.snapshot(T0 + 1.0).total_rejected == 2


def test_half_open_max_calls_one_refuses_a_second_probe_while_the_first_is_in_flight() -> None:
    breaker, _ = make(half_open_max_calls=1)
    open_breaker(breaker)
    probe(breaker, T0 + 1)
    assert breaker.try_acquire(T0 + 1) is None
    assert breaker.try_acquire(T0 + 500) is None  # a probe in flight blocks others however long it takes
    assert breaker.snapshot(T0 + 500).half_open_in_flight == 1


def test_half_open_max_calls_three_admits_exactly_three() -> None:
    breaker, _ = make(half_open_max_calls=3)
    open_breaker(breaker)
    permits = [breaker.try_acquire(T0 + 1) for _ in range(5)]
    assert [p is not None and p.probe for p in permits] == [True, True, True, False, False]
    assert breaker.snapshot(T0 + 1).half_open_in_flight == 3


def test_record_ignored_frees_a_probe_slot() -> None:
    breaker, rec = make()
    open_breaker(breaker)
    first = probe(breaker, T0 + 1)
    assert breaker.try_acquire(T0 + 1) is None
    breaker.record_ignored(first)
    assert breaker.state is State.HALF_OPEN  # no verdict: still waiting for one
    second = probe(breaker, T0 + 1)
    assert second.generation == first.generation
    assert len(rec.transitions) == 2  # trip and cool-down only


def test_record_ignored_of_a_closed_permit_changes_nothing() -> None:
    breaker, rec = make()
    permit = breaker.try_acquire(T0)
    assert permit is not None
    breaker.record_ignored(permit)
    snap = breaker.snapshot(T0)
    assert (snap.state, snap.total_successes, snap.total_failures, snap.half_open_in_flight) == (
        State.CLOSED,
        0,
        0,
        0,
    )
    assert rec.transitions == []


# -- half-open verdicts ----------------------------------------------------------------------------------------


def test_successful_probe_closes_and_resets_the_failure_count() -> None:
    breaker, rec = make()
    open_breaker(breaker)
    breaker.record_success(probe(breaker, T0 + 1), T0 + 1.5)
    assert breaker.state is State.CLOSED
    assert rec.moves[-1] == ("half_open", "closed", "probe_succeeded")
    snap = breaker.snapshot(T0 + 1.5)
    assert snap.failures_in_window == 0 and snap.opened_at is None
    # Counting starts over: the three failures before the trip no longer count.
    fail_n(breaker, 2, T0 + 2)
    assert breaker.state is State.CLOSED
    fail_n(breaker, 1, T0 + 2)
    assert breaker.state is State.OPEN


def test_failed_probe_reopens_at_once_with_a_fresh_open_duration() -> None:
    breaker, rec = make(open_duration=1.0)
    open_breaker(breaker)
    breaker.record_failure(probe(breaker, T0 + 1), T0 + 1.5)
    assert breaker.state is State.OPEN
    assert rec.moves[-1] == ("half_open", "open", "probe_failed")
    assert breaker.snapshot(T0 + 1.5).opened_at == T0 + 1.5
    assert breaker.try_acquire(T0 + 2.25) is None  # would have been allowed on the old schedule
    assert breaker.try_acquire(T0 + 2.499) is None
    assert breaker.retry_in(T0 + 2.25) == 0.25
    assert probe(breaker, T0 + 2.5).probe


def test_one_probe_verdict_decides_for_all_probes_in_flight() -> None:
    breaker, rec = make(half_open_max_calls=3)
    open_breaker(breaker)
    a, b, c = (probe(breaker, T0 + 1) for _ in range(3))
    breaker.record_success(a, T0 + 1.25)
    assert breaker.state is State.CLOSED
    # b and c belong to the previous generation now: their outcomes are not counted.
    breaker.record_failure(b, T0 + 1.25)
    breaker.record_failure(c, T0 + 1.25)
    assert breaker.state is State.CLOSED
    assert breaker.snapshot(T0 + 1.25).total_failures == 3  # only the three that tripped it
    assert [m[:2] for m in rec.moves] == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


# -- stale generations -----------------------------------------------------------------------------------------


def test_outcomes_of_calls_admitted_before_a_trip_are_ignored() -> None:
    breaker, rec = make(open_duration=1.0)
    slow = breaker.try_acquire(T0)
    assert slow is not None
    open_breaker(breaker, T0 + 0.5)
    # The slow call ends while the breaker is open: neither verdict may move it.
    breaker.record_success(slow, T0 + 0.75)
    assert breaker.state is State.OPEN
    breaker.record_failure(slow, T0 + 0.75)
    assert breaker.snapshot(T0 + 0.75).opened_at == T0 + 0.5
    assert breaker.snapshot(T0 + 0.75).total_successes == 0
    assert len(rec.transitions) == 1


def test_a_stale_probe_cannot_close_a_reopened_breaker() -> None:
    breaker, _ = make(half_open_max_calls=2)
    open_breaker(breaker)
    first = probe(breaker, T0 + 1)
    second = probe(breaker, T0 + 1)
    breaker.record_failure(first, T0 + 1.25)
    breaker.record_success(second, T0 + 1.5)
    breaker.record_ignored(second)
    assert breaker.state is State.OPEN
    assert breaker.snapshot(T0 + 1.5).half_open_in_flight == 0


# -- failure-rate and slow-call modes -----------------------------------------------------------------------------


def record(breaker: CircuitBreaker, now: float, failed: bool, duration: float = 0.0) -> None:
    permit = breaker.try_acquire(now)
    assert permit is not None
    if failed:
        breaker.record_failure(permit, now, duration)
    else:
        breaker.record_success(permit, now, duration)


def test_failure_rate_waits_for_minimum_calls() -> None:
    breaker, rec = make(failure_threshold=100, window=10.0, failure_rate_threshold=50.0, minimum_calls=4)
    record(breaker, T0, failed=True)
    record(breaker, T0, failed=True)
    record(breaker, T0, failed=True)  # 100 % of 3 calls, but fewer than minimum_calls
    assert breaker.state is State.CLOSED
    record(breaker, T0, failed=False)  # 75 % of 4
    assert rec.moves == [("closed", "open", "failure_rate_75%_of_4_calls")]


def test_failure_rate_exactly_at_threshold_trips_and_just_below_does_not() -> None:
    breaker, rec = make(failure_threshold=100, window=10.0, failure_rate_threshold=50.0, minimum_calls=4)
    for failed in (False, False, False, True):  # 25 %
        record(breaker, T0, failed)
    record(breaker, T0, failed=False)  # 20 % of 5
    assert breaker.state is State.CLOSED
    record(breaker, T0, failed=True)  # 33 % of 6
    assert breaker.state is State.CLOSED
    record(breaker, T0, failed=True)
    record(breaker, T0, failed=True)  # 4 of 8: exactly 50 %
    assert rec.moves == [("closed", "open", "failure_rate_50%_of_8_calls")]


def test_failure_rate_forgets_calls_older_than_the_window() -> None:
    # Window 10 s in ten 1 s buckets: calls at T0 drop out once T0 + 10 s is reached.
    breaker, _ = make(failure_threshold=100, window=10.0, failure_rate_threshold=50.0, minimum_calls=4)
    for _ in range(3):
        record(breaker, T0, failed=True)
    assert breaker.snapshot(T0 + 9.75).calls_in_window == 3
    assert breaker.snapshot(T0 + 10).calls_in_window == 0
    record(breaker, T0 + 10, failed=True)  # 1 call in the window, not 4
    assert breaker.state is State.CLOSED


def test_slow_calls_trip_at_the_slow_rate_and_duration_is_inclusive() -> None:
    breaker, rec = make(
        failure_threshold=100,
        window=10.0,
        slow_call_duration=2.0,
        slow_call_rate_threshold=50.0,
        minimum_calls=4,
    )
    record(breaker, T0, failed=False, duration=1.999)
    record(breaker, T0, failed=False, duration=1.5)
    record(breaker, T0, failed=False, duration=2.0)  # exactly the limit: slow
    assert breaker.snapshot(T0).slow_call_rate == pytest.approx(100 / 3)
    assert breaker.state is State.CLOSED  # 3 calls < minimum_calls
    record(breaker, T0, failed=False, duration=5.0)
    assert rec.moves == [("closed", "open", "slow_call_rate_50%_of_4_calls")]


def test_a_slow_successful_probe_counts_as_a_failed_probe() -> None:
    breaker, rec = make(slow_call_duration=2.0, slow_call_rate_threshold=50.0, minimum_calls=1)
    open_breaker(breaker)
    breaker.record_success(probe(breaker, T0 + 1), T0 + 3, duration=2.0)
    assert rec.moves[-1] == ("half_open", "open", "slow_probe")
    breaker.record_success(probe(breaker, T0 + 4), T0 + 4, duration=1.999)
    assert breaker.state is State.CLOSED


# -- overrides -------------------------------------------------------------------------------------------------


def test_force_open_with_ttl_rejects_until_exactly_ttl() -> None:
    breaker, rec = make()
    breaker.set_override(Override.FORCE_OPEN, T0, ttl=5.0)
    assert breaker.try_acquire(T0 + 4.999) is None
    assert breaker.retry_in(T0 + 4.5) == 0.5
    assert breaker.snapshot(T0 + 4.5).effective_state is State.OPEN
    assert breaker.try_acquire(T0 + 5.0) is not None
    assert breaker.override is None
    assert rec.transitions == []  # an override is not a transition of the machine underneath


def test_force_open_without_ttl_holds_until_cleared() -> None:
    breaker, _ = make(open_duration=30.0)
    breaker.set_override(Override.FORCE_OPEN, T0)
    assert breaker.try_acquire(T0 + 10_000) is None
    assert breaker.retry_in(T0 + 10_000) == 30.0
    breaker.set_override(None, T0 + 10_000)
    assert breaker.try_acquire(T0 + 10_000) is not None


def test_force_close_admits_while_open_and_the_machine_resumes_after_ttl() -> None:
    breaker, _ = make(open_duration=60.0)
    open_breaker(breaker)
    breaker.set_override(Override.FORCE_CLOSE, T0, ttl=10.0)
    permits = [breaker.try_acquire(T0 + 9.999) for _ in range(5)]
    assert all(p is not None and not p.probe for p in permits)
    assert breaker.snapshot(T0 + 9.999).effective_state is State.CLOSED
    # Failures admitted under the override are reported, not counted: nothing re-trips.
    for p in permits:
        assert p is not None
        breaker.record_failure(p, T0 + 9.999)
    assert breaker.state is State.OPEN and breaker.snapshot(T0 + 1).opened_at == T0
    assert breaker.try_acquire(T0 + 10.0) is None  # override over, still inside open_duration
    assert probe(breaker, T0 + 60.0).probe


def test_reset_clears_override_and_counts() -> None:
    breaker, rec = make()
    fail_n(breaker, 2, T0)
    breaker.set_override(Override.FORCE_OPEN, T0)
    breaker.reset(T0 + 1)
    assert breaker.override is None
    snap = breaker.snapshot(T0 + 1)
    assert (snap.state, snap.failures_in_window) == (State.CLOSED, 0)
    assert rec.moves == [("closed", "closed", "manual_reset")]


def test_reset_from_open_and_half_open() -> None:
    breaker, rec = make()
    open_breaker(breaker)
    breaker.reset(T0 + 0.5, reason="operator")
    assert breaker.state is State.CLOSED and breaker.try_acquire(T0 + 0.5) is not None
    open_breaker(breaker, T0 + 1)
    stale = probe(breaker, T0 + 2)
    breaker.reset(T0 + 2)
    breaker.record_failure(stale, T0 + 2)  # admitted before the reset: ignored
    assert breaker.state is State.CLOSED
    assert [m[:2] for m in rec.moves][-3:] == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert rec.moves[1] == ("open", "closed", "operator")


# -- the transition table --------------------------------------------------------------------------------------


def test_a_probe_verdict_while_closed_is_an_illegal_transition() -> None:
    breaker, rec = make()
    forged = Permit(generation=0, probe=True)  # a probe permit cannot legally exist while CLOSED
    with pytest.raises(IllegalTransition, match="probe_succeeded is not allowed in closed"):
        breaker.record_success(forged, T0)
    with pytest.raises(IllegalTransition, match="probe_failed is not allowed in closed"):
        breaker.record_failure(forged, T0)
    assert breaker.state is State.CLOSED
    assert rec.transitions == []


def test_every_transition_is_reported_exactly_once_in_order() -> None:
    breaker, rec = make(open_duration=1.0)
    open_breaker(breaker)  # closed → open
    for _ in range(10):
        breaker.try_acquire(T0 + 0.5)  # rejections are not transitions
    breaker.record_failure(probe(breaker, T0 + 1), T0 + 1)  # → half_open → open
    breaker.try_acquire(T0 + 1.5)
    breaker.record_success(probe(breaker, T0 + 2), T0 + 2)  # → half_open → closed
    assert rec.moves == [
        ("closed", "open", "3_failures_in_60s"),
        ("open", "half_open", "open_duration_elapsed"),
        ("half_open", "open", "probe_failed"),
        ("open", "half_open", "open_duration_elapsed"),
        ("half_open", "closed", "probe_succeeded"),
    ]
    assert [t.at for t in rec.transitions] == [T0, T0 + 1, T0 + 1, T0 + 2, T0 + 2]
    assert breaker.snapshot(T0 + 2).last_transition == rec.transitions[-1]


def test_snapshot_reports_counters() -> None:
    breaker, _ = make()
    record(breaker, T0, failed=False)
    fail_n(breaker, 3, T0)
    breaker.try_acquire(T0)
    snap = breaker.snapshot(T0 + 0.25)
    assert (snap.name, snap.state, snap.total_successes, snap.total_failures, snap.total_rejected) == (
        "db",
        State.OPEN,
        1,
        3,
        1,
    )
    assert snap.failures_in_window == 3
    assert snap.retry_in == 0.75
