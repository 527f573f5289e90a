"""Active checks end an open interval early into half-open, and real calls decide; the report of an elapsed
open interval. On an injected clock (ManualClock), at the boundaries."""

from __future__ import annotations

import pytest

from proxy.policy.loader import load_text
from proxy.resilience.breaker import (
    _TRANSITIONS,
    BreakerSettings,
    CircuitBreaker,
    Event,
    IllegalTransition,
    Override,
    Permit,
    State,
    Transition,
)
from proxy.resilience.clock import ManualClock
from proxy.runtime import UpstreamRuntime
from proxy.upstream.health import CheckResult

OPEN_FOR = 60.0


ONE_FAILURE = BreakerSettings(failure_threshold=1, open_duration=OPEN_FOR)


def opened(seen: list[Transition] | None = None, settings: BreakerSettings = ONE_FAILURE) -> CircuitBreaker:
    """A breaker tripped at t=0 by one failure."""
    breaker = CircuitBreaker("db", settings, on_transition=seen.append if seen is not None else None)
    permit = breaker.try_acquire(0.0)
    assert permit is not None
    breaker.record_failure(permit, 0.0)
    assert state(breaker) is State.OPEN
    return breaker


def probe(breaker: CircuitBreaker, now: float) -> Permit:
    permit = breaker.try_acquire(now)
    assert permit is not None and permit.probe, (permit, breaker.state)
    return permit


def state(breaker: CircuitBreaker) -> State:
    """Read afresh (mypy would otherwise keep an attribute narrowed across the calls that move it)."""
    return breaker.state


def moves(seen: list[Transition]) -> list[tuple[str, str, str]]:
    return [(t.from_state.value, t.to_state.value, t.reason) for t in seen]


def test_a_passing_check_ends_the_open_interval_into_half_open_not_closed() -> None:
    seen: list[Transition] = []
    breaker = opened(seen)
    assert breaker.half_open_on_health(1.0) is True
    assert state(breaker) is State.HALF_OPEN
    assert (seen[-1].from_state, seen[-1].to_state, seen[-1].reason, seen[-1].at) == (
        State.OPEN,
        State.HALF_OPEN,
        "health_check_passed",
        1.0,
    )
    snap = breaker.snapshot(1.0)
    assert snap.retry_in == 0.0 and snap.health_armed
    first = probe(breaker, 1.0)  # the next real call is a probe; a second one waits for its verdict
    assert breaker.try_acquire(1.0) is None
    breaker.record_success(first, 1.5)
    assert state(breaker) is State.CLOSED
    assert moves(seen)[-1] == ("half_open", "closed", "probe_succeeded")


def test_a_failed_probe_after_a_passing_check_leaves_the_interval_to_open_duration() -> None:
    seen: list[Transition] = []
    breaker = opened(seen)
    assert breaker.half_open_on_health(1.0) is True
    breaker.record_failure(probe(breaker, 2.0), 2.0)  # the check passed, the call failed: a shallow /health
    assert state(breaker) is State.OPEN and not breaker.health_armed
    reopened_at = 2.0
    for at in (3.0, 30.0, reopened_at + OPEN_FOR - 1e-6):  # checks keep passing within that interval
        assert breaker.half_open_on_health(at) is False
        assert breaker.snapshot(at).state is State.OPEN
        assert breaker.try_acquire(at) is None, "requests are still refused"
    snap = breaker.snapshot(reopened_at + OPEN_FOR)  # ... until open_duration has elapsed, as always
    assert snap.state is State.HALF_OPEN and not snap.health_armed
    assert moves(seen)[-1] == ("open", "half_open", "open_duration_elapsed")
    assert seen[-1].at == reopened_at + OPEN_FOR
    breaker.record_failure(probe(breaker, 70.0), 70.0)  # still failing: open again, checks still disarmed
    assert breaker.half_open_on_health(71.0) is False and state(breaker) is State.OPEN
    breaker.record_success(probe(breaker, 70.0 + OPEN_FOR), 70.0 + OPEN_FOR)
    assert state(breaker) is State.CLOSED
    assert [m[2] for m in moves(seen)].count("health_check_passed") == 1


def test_a_new_trip_from_closed_re_arms_the_checks() -> None:
    breaker = opened()
    breaker.half_open_on_health(1.0)
    breaker.record_failure(probe(breaker, 1.0), 1.0)
    assert not breaker.health_armed
    breaker.record_success(probe(breaker, 1.0 + OPEN_FOR), 1.0 + OPEN_FOR)
    assert state(breaker) is State.CLOSED and breaker.health_armed, "closing ends the outage"
    now = 100.0
    breaker.record_failure(breaker.try_acquire(now) or pytest.fail("closed refused"), now)
    assert state(breaker) is State.OPEN and breaker.health_armed
    assert breaker.half_open_on_health(now + 1) is True and state(breaker) is State.HALF_OPEN


def test_a_reset_then_a_trip_re_arms_the_checks() -> None:
    breaker = opened()
    breaker.half_open_on_health(1.0)
    breaker.record_failure(probe(breaker, 1.0), 1.0)
    breaker.reset(2.0)
    breaker.record_failure(breaker.try_acquire(3.0) or pytest.fail("closed refused"), 3.0)
    assert breaker.half_open_on_health(4.0) is True


def test_a_probe_failing_after_open_duration_does_not_disarm_the_checks() -> None:
    """The checks had not vouched for that probe (they may have been failing too: a deep /health), so they may
    still end the next interval early when the upstream comes back."""
    breaker = opened()
    breaker.record_failure(probe(breaker, OPEN_FOR), OPEN_FOR)
    assert state(breaker) is State.OPEN and breaker.health_armed
    assert breaker.half_open_on_health(OPEN_FOR + 1) is True


def test_a_slow_probe_after_a_passing_check_disarms_the_checks_too() -> None:
    slow = BreakerSettings(
        failure_threshold=1, open_duration=OPEN_FOR, slow_call_duration=1.0, slow_call_rate_threshold=50.0
    )
    breaker = opened(settings=slow)
    breaker.half_open_on_health(1.0)
    breaker.record_success(probe(breaker, 1.0), 3.0, duration=2.0)
    assert state(breaker) is State.OPEN and breaker.last_transition is not None
    assert breaker.last_transition.reason == "slow_probe" and not breaker.health_armed


def test_checks_leave_a_half_open_breaker_to_its_probes() -> None:
    seen: list[Transition] = []
    breaker = opened(seen)
    assert breaker.snapshot(OPEN_FOR).state is State.HALF_OPEN  # elapsed: reported half-open, no request yet
    count = len(seen)
    assert breaker.half_open_on_health(OPEN_FOR + 0.5) is False
    assert state(breaker) is State.HALF_OPEN and len(seen) == count
    assert (State.HALF_OPEN, Event.HEALTH_PASSED) not in _TRANSITIONS
    with pytest.raises(IllegalTransition):  # the table's word, should anything fire it anyway
        breaker._fire(Event.HEALTH_PASSED, OPEN_FOR + 0.5, Event.HEALTH_PASSED.value)


def test_exactly_at_open_duration_the_interval_ends_by_itself_not_by_the_check() -> None:
    seen: list[Transition] = []
    just_before = opened(seen)
    assert just_before.half_open_on_health(OPEN_FOR - 1e-6) is True
    assert seen[-1].reason == "health_check_passed"
    seen = []
    at_the_end = opened(seen)
    assert at_the_end.half_open_on_health(OPEN_FOR) is False  # nobody looked before: it ended all the same
    assert state(at_the_end) is State.HALF_OPEN
    assert [t.reason for t in seen] == ["1_failures_in_60s", "open_duration_elapsed"]


def test_a_forced_open_breaker_stays_open_whatever_the_checks_say() -> None:
    breaker = opened()
    breaker.set_override(Override.FORCE_OPEN, 1.0)
    assert breaker.half_open_on_health(2.0) is False
    assert state(breaker) is State.OPEN and breaker.snapshot(2.0).effective_state is State.OPEN
    snap = breaker.snapshot(OPEN_FOR * 2)
    assert snap.effective_state is State.OPEN, "the override, not the elapsed interval, decides what is reported"
    assert breaker.try_acquire(OPEN_FOR * 2) is None
    assert breaker.half_open_on_health(OPEN_FOR * 2) is False


def test_a_closed_breaker_is_left_as_it_is() -> None:
    seen: list[Transition] = []
    breaker = CircuitBreaker("db", BreakerSettings(), on_transition=seen.append)
    assert breaker.half_open_on_health(5.0) is False
    assert seen == [] and state(breaker) is State.CLOSED


def test_an_elapsed_open_interval_is_reported_half_open_without_a_request() -> None:
    seen: list[Transition] = []
    breaker = opened(seen)
    just_before = OPEN_FOR - 1e-6
    assert breaker.snapshot(just_before).state is State.OPEN
    assert breaker.snapshot(just_before).retry_in > 0
    snap = breaker.snapshot(OPEN_FOR + 7.0)  # looked at 7 s after the interval ended
    assert snap.state is State.HALF_OPEN and snap.retry_in == 0.0
    last = seen[-1]
    assert (last.from_state, last.to_state, last.reason) == (State.OPEN, State.HALF_OPEN, "open_duration_elapsed")
    assert last.at == OPEN_FOR, "dated when the interval ended, not when someone looked"
    probe(breaker, OPEN_FOR + 8.0)  # the next request is the probe
    assert len(seen) == 2, "the transition is recorded once"


# -- through the upstream's runtime: healthy_threshold, the counter, force-open ----------------------------------

POLICY = """
upstreams:
  db:
    listen: 127.0.0.1:1
    targets: [http://127.0.0.1:9]
    breaker: {failure_threshold: 1, open_duration: 60s}
    health: {healthy_threshold: 3}
"""


def check(passed: bool) -> CheckResult:
    return CheckResult(passed, 0.001, "" if passed else "status 503")


def runtime(clock: ManualClock) -> UpstreamRuntime:
    config, issues = load_text(POLICY)
    assert config is not None, issues
    return UpstreamRuntime(config.upstream("db"), clock)


def trip(rt: UpstreamRuntime, clock: ManualClock) -> None:
    permit = rt.breaker.try_acquire(clock.monotonic())
    assert permit is not None and not permit.probe
    rt.breaker.record_failure(permit, clock.monotonic())
    assert state(rt.breaker) is State.OPEN


def test_healthy_threshold_checks_passed_after_the_opening_half_open_it_and_a_call_closes_it() -> None:
    clock = ManualClock(100.0)
    rt = runtime(clock)
    for _ in range(5):
        rt.record_check(check(True))  # passing all along, while closed: counts for nothing later
    trip(rt, clock)
    rt.record_check(check(True))
    rt.record_check(check(False))  # a failed check starts the count again
    rt.record_check(check(True))
    rt.record_check(check(True))
    clock.advance(1.0)
    assert state(rt.breaker) is State.OPEN and rt.stats.health_recoveries == 0
    rt.record_check(check(True))  # the third in a row since the opening
    assert state(rt.breaker) is State.HALF_OPEN
    assert rt.breaker.last_transition is not None and rt.breaker.last_transition.reason == "health_check_passed"
    assert rt.stats.health_recoveries == 1 and rt.stats.transitions == {("closed", "open"): 1, ("open", "half_open"): 1}
    for _ in range(3):
        rt.record_check(check(True))  # half-open: the probes decide, checks change nothing
    assert state(rt.breaker) is State.HALF_OPEN and rt.stats.health_recoveries == 1
    rt.breaker.record_success(probe(rt.breaker, clock.monotonic()), clock.monotonic())
    assert state(rt.breaker) is State.CLOSED and rt.stats.transitions[("half_open", "closed")] == 1
    rt.record_check(check(False))
    rt.record_check(check(False))
    assert state(rt.breaker) is State.CLOSED, "failing checks never open a breaker"


def test_after_a_failed_probe_checks_never_end_the_interval_early_until_a_new_trip() -> None:
    clock = ManualClock(100.0)
    rt = runtime(clock)
    trip(rt, clock)
    for _ in range(3):
        rt.record_check(check(True))
    assert state(rt.breaker) is State.HALF_OPEN and rt.stats.health_recoveries == 1
    clock.advance(0.5)
    rt.breaker.record_failure(probe(rt.breaker, clock.monotonic()), clock.monotonic())
    reopened = clock.monotonic()
    for _ in range(10):  # a shallow /health keeps passing
        clock.advance(5.0)
        rt.record_check(check(True))
        assert state(rt.breaker) is State.OPEN, clock.monotonic() - reopened
    assert rt.stats.health_recoveries == 1
    clock.advance(reopened + OPEN_FOR - clock.monotonic())
    rt.record_check(check(True))
    assert rt.effective_state() is State.HALF_OPEN
    assert rt.breaker.last_transition is not None and rt.breaker.last_transition.reason == "open_duration_elapsed"
    rt.breaker.record_success(probe(rt.breaker, clock.monotonic()), clock.monotonic())
    assert state(rt.breaker) is State.CLOSED
    trip(rt, clock)  # a new outage: the checks may end its interval early again
    for _ in range(3):
        rt.record_check(check(True))
    assert state(rt.breaker) is State.HALF_OPEN and rt.stats.health_recoveries == 2


def test_checks_never_undo_a_force_open_and_half_open_the_breaker_beneath_once_it_ends() -> None:
    clock = ManualClock(100.0)
    rt = runtime(clock)
    trip(rt, clock)
    rt.breaker.set_override(Override.FORCE_OPEN, clock.monotonic(), ttl=10.0)
    for _ in range(4):
        rt.record_check(check(True))
    assert rt.effective_state() is State.OPEN and rt.stats.health_recoveries == 0, "the operator's word stays"
    clock.advance(10.0)  # the ttl ends: the open breaker beneath it is back in charge
    assert rt.effective_state() is State.OPEN
    rt.record_check(check(True))  # the passes counted meanwhile already make healthy_threshold
    assert rt.effective_state() is State.HALF_OPEN and rt.stats.health_recoveries == 1
    rt.breaker.record_success(probe(rt.breaker, clock.monotonic()), clock.monotonic())
    assert rt.effective_state() is State.CLOSED
