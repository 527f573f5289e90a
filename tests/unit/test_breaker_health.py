"""The breaker's recovery by active checks and its report of an elapsed open interval, on an injected clock."""

from __future__ import annotations

from proxy.policy.loader import load_text
from proxy.resilience.breaker import BreakerSettings, CircuitBreaker, Override, State, Transition
from proxy.resilience.clock import ManualClock
from proxy.runtime import UpstreamRuntime
from proxy.upstream.health import CheckResult

OPEN_FOR = 60.0


def opened(seen: list[Transition] | None = None) -> CircuitBreaker:
    breaker = CircuitBreaker(
        "db",
        BreakerSettings(failure_threshold=1, open_duration=OPEN_FOR),
        on_transition=seen.append if seen is not None else None,
    )
    permit = breaker.try_acquire(0.0)
    assert permit is not None
    breaker.record_failure(permit, 0.0)
    assert breaker.state is State.OPEN
    return breaker


def test_passing_checks_close_an_open_breaker_at_once() -> None:
    seen: list[Transition] = []
    breaker = opened(seen)
    assert breaker.close_on_health(1.0) is True
    assert breaker.state is State.CLOSED
    assert (seen[-1].from_state, seen[-1].to_state, seen[-1].reason, seen[-1].at) == (
        State.OPEN,
        State.CLOSED,
        "health_check_passed",
        1.0,
    )
    assert breaker.try_acquire(1.0) is not None, "closed: calls go through without a probe"


def test_a_probe_admitted_before_the_health_close_cannot_move_the_breaker_later() -> None:
    breaker = opened()
    probe = breaker.try_acquire(OPEN_FOR)
    assert probe is not None and probe.probe and breaker.state is State.HALF_OPEN
    assert breaker.close_on_health(OPEN_FOR + 1) is True
    breaker.record_failure(probe, OPEN_FOR + 2)  # the old probe fails late: from an older generation, ignored
    assert breaker.state is State.CLOSED
    assert breaker.snapshot(OPEN_FOR + 2).half_open_in_flight == 0


def test_a_forced_open_breaker_stays_open_whatever_the_checks_say() -> None:
    breaker = opened()
    breaker.set_override(Override.FORCE_OPEN, 1.0)
    assert breaker.close_on_health(2.0) is False
    assert breaker.state is State.OPEN and breaker.snapshot(2.0).effective_state is State.OPEN


def test_a_closed_breaker_is_left_as_it_is() -> None:
    seen: list[Transition] = []
    breaker = CircuitBreaker("db", BreakerSettings(), on_transition=seen.append)
    assert breaker.close_on_health(5.0) is False
    assert seen == []


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
    probe = breaker.try_acquire(OPEN_FOR + 8.0)
    assert probe is not None and probe.probe, "the next request is the probe"
    assert len(seen) == 2, "the transition is recorded once"


def test_exactly_at_open_duration_the_breaker_reads_half_open() -> None:
    assert opened().snapshot(OPEN_FOR).state is State.HALF_OPEN


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


def test_healthy_threshold_checks_passed_after_the_opening_close_it() -> None:
    clock = ManualClock(100.0)
    config, issues = load_text(POLICY)
    assert config is not None, issues
    rt = UpstreamRuntime(config.upstream("db"), clock)
    for _ in range(5):
        rt.record_check(check(True))  # passing all along, while closed: counts for nothing later
    permit = rt.breaker.try_acquire(clock.monotonic())
    assert permit is not None
    rt.breaker.record_failure(permit, clock.monotonic())
    assert rt.breaker.state is State.OPEN
    rt.record_check(check(True))
    rt.record_check(check(False))  # a failed check starts the count again
    rt.record_check(check(True))
    rt.record_check(check(True))
    clock.advance(1.0)
    assert rt.breaker.state is State.OPEN and rt.stats.health_recoveries == 0
    rt.record_check(check(True))  # the third in a row since the opening
    assert rt.breaker.state is State.CLOSED
    assert rt.breaker.last_transition is not None and rt.breaker.last_transition.reason == "health_check_passed"
    assert rt.stats.health_recoveries == 1
    assert rt.stats.transitions[("open", "closed")] == 1
    rt.record_check(check(False))
    rt.record_check(check(False))
    assert rt.breaker.state is State.CLOSED, "failing checks never open a breaker"


def test_probes_admitted_before_the_health_close_that_end_late_change_nothing() -> None:
    seen: list[Transition] = []
    breaker = CircuitBreaker(
        "db",
        BreakerSettings(failure_threshold=1, open_duration=OPEN_FOR, half_open_max_calls=2),
        on_transition=seen.append,
    )
    first = breaker.try_acquire(0.0)
    assert first is not None
    breaker.record_failure(first, 0.0)
    probes = [breaker.try_acquire(OPEN_FOR), breaker.try_acquire(OPEN_FOR)]
    assert all(p is not None and p.probe for p in probes) and breaker.state is State.HALF_OPEN
    assert breaker.close_on_health(OPEN_FOR + 1) is True
    moves = len(seen)
    ok, gave_up = probes
    assert ok is not None and gave_up is not None
    breaker.record_success(ok, OPEN_FOR + 2)  # from the older generation: no second close
    breaker.record_ignored(gave_up)  # nor does freeing its slot touch the new generation's probe count
    assert breaker.state is State.CLOSED and len(seen) == moves
    snap = breaker.snapshot(OPEN_FOR + 2)
    assert (snap.half_open_in_flight, snap.failures_in_window) == (0, 0), "the window starts afresh"


def test_health_close_from_half_open_reported_after_the_interval() -> None:
    seen: list[Transition] = []
    breaker = opened(seen)
    assert breaker.snapshot(OPEN_FOR).state is State.HALF_OPEN  # reported half-open, no request yet
    assert breaker.close_on_health(OPEN_FOR + 0.5) is True
    assert [(t.from_state, t.to_state) for t in seen[-2:]] == [
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]
    assert seen[-1].reason == "health_check_passed"


def test_a_forced_open_breaker_whose_interval_elapsed_still_reads_open() -> None:
    breaker = opened()
    breaker.set_override(Override.FORCE_OPEN, 1.0)
    snap = breaker.snapshot(OPEN_FOR * 2)
    assert snap.effective_state is State.OPEN, "the override, not the elapsed interval, decides what is reported"
    assert breaker.try_acquire(OPEN_FOR * 2) is None
    assert breaker.close_on_health(OPEN_FOR * 2) is False


def test_checks_never_undo_a_force_open_and_close_the_breaker_beneath_once_it_ends() -> None:
    clock = ManualClock(100.0)
    config, issues = load_text(POLICY)
    assert config is not None, issues
    rt = UpstreamRuntime(config.upstream("db"), clock)
    permit = rt.breaker.try_acquire(clock.monotonic())
    assert permit is not None
    rt.breaker.record_failure(permit, clock.monotonic())
    rt.breaker.set_override(Override.FORCE_OPEN, clock.monotonic(), ttl=10.0)
    for _ in range(4):
        rt.record_check(check(True))
    assert rt.effective_state() is State.OPEN and rt.stats.health_recoveries == 0, "the operator's word stays"
    clock.advance(10.0)  # the ttl ends: the open breaker beneath it is back in charge
    assert rt.effective_state() is State.OPEN
    rt.record_check(check(True))  # the passes counted meanwhile already make healthy_threshold
    assert rt.effective_state() is State.CLOSED and rt.stats.health_recoveries == 1
