"""The balancer and outlier ejection, driven with explicit ``now`` values that sit on each boundary.

Times are binary fractions (or exact sums of them) so no assertion depends on float rounding.
"""

from __future__ import annotations

import pytest

from proxy.policy.model import OutlierPolicy
from proxy.policy.values import Target
from proxy.upstream.balancer import Balancer, TargetState

T0 = 1000.0


def targets(n: int) -> tuple[Target, ...]:
    return tuple(Target("http", "127.0.0.1", 20000 + i) for i in range(n))


def make(n: int = 2, balance: str = "round_robin", **outlier: float) -> Balancer:
    policy: dict[str, float] = {
        "consecutive_failures": 3,
        "interval": 8.0,
        "base_ejection": 4.0,
        "max_ejection": 12.0,
        "max_ejected_percent": 50,
    }
    policy.update(outlier)
    return Balancer(targets(n), balance, OutlierPolicy(**policy), idle_timeout=30.0)  # type: ignore[arg-type]


def fail(balancer: Balancer, state: TargetState, times: int, now: float) -> str | None:
    reason = None
    for _ in range(times):
        reason = balancer.report(state, ok=False, now=now, kind="5xx")
    return reason


# -- picking ------------------------------------------------------------------------------------------------


def test_round_robin_takes_turns() -> None:
    balancer = make(3)
    picked = [balancer.pick(T0).target.port for _ in range(6)]
    assert picked == [20000, 20001, 20002, 20000, 20001, 20002]


def test_least_request_picks_the_target_with_fewer_outstanding() -> None:
    balancer = make(2, balance="least_request")
    a, b = balancer.states
    a.outstanding, b.outstanding = 5, 1
    # With two candidates the power-of-two choice compares both: always the less busy one.
    assert all(balancer.pick(T0) is b for _ in range(20))
    a.outstanding = 0
    assert all(balancer.pick(T0) is a for _ in range(20))


def test_retry_prefers_a_different_target() -> None:
    balancer = make(3)
    for state in balancer.states:
        assert all(balancer.pick(T0, exclude=state) is not state for _ in range(6))


def test_exclude_is_ignored_when_it_is_the_only_target_left() -> None:
    balancer = make(2)
    a, b = balancer.states
    assert fail(balancer, a, 3, T0) is not None
    assert balancer.pick(T0, exclude=b) is b  # b failed last time, but a is ejected: b is all there is


def test_single_target_has_no_ejection() -> None:
    balancer = make(1)
    (only,) = balancer.states
    assert fail(balancer, only, 50, T0) is None
    assert balancer.pick(T0) is only and balancer.pick(T0, exclude=only) is only


# -- ejection ------------------------------------------------------------------------------------------------


def test_consecutive_failures_eject_on_the_threshold_and_a_success_resets_the_count() -> None:
    balancer = make(2)
    a, _ = balancer.states
    assert fail(balancer, a, 2, T0) is None
    balancer.report(a, ok=True, now=T0)
    assert fail(balancer, a, 2, T0) is None  # the count restarted
    assert fail(balancer, a, 1, T0) == "3_consecutive_5xx"
    assert a.ejected(T0) and a.ejected_until == T0 + 4.0
    assert a.ejection_reason == "3_consecutive_5xx" and a.total_ejections == 1


def test_ejected_target_gets_no_traffic_and_returns_exactly_at_its_ejection_time() -> None:
    balancer = make(2)
    a, b = balancer.states
    fail(balancer, a, 3, T0)
    assert {balancer.pick(T0 + 3.999).target for _ in range(4)} == {b.target}
    assert a.ejected(T0 + 3.999) and not a.ejected(T0 + 4.0)
    assert {balancer.pick(T0 + 4.0).target for _ in range(4)} == {a.target, b.target}


def test_failures_while_ejected_do_not_count_toward_the_next_ejection() -> None:
    balancer = make(2)
    a, _ = balancer.states
    fail(balancer, a, 3, T0)
    assert fail(balancer, a, 5, T0 + 1.0) is None  # late answers from requests started before the ejection
    assert a.consecutive_failures == 0
    assert fail(balancer, a, 2, T0 + 4.0) is None  # back in: it takes the full count again
    assert fail(balancer, a, 1, T0 + 4.0) is not None


def test_ejection_time_grows_with_each_repeat_and_is_capped() -> None:
    balancer = make(2)  # base 4 s, cap 12 s, decay interval 8 s
    a, _ = balancer.states
    now = T0
    expected = [4.0, 8.0, 12.0, 12.0]  # base × ejections, capped at max_ejection
    for duration in expected:
        fail(balancer, a, 3, now)
        assert a.ejected_until == now + duration
        now = a.ejected_until  # fail again the moment it returns: no healthy interval, no decay
    assert a.ejections == 4 and a.total_ejections == 4


def test_multiplier_decays_by_one_per_healthy_interval() -> None:
    balancer = make(2)  # base 4 s, interval 8 s
    a, _ = balancer.states
    fail(balancer, a, 3, T0)  # out until T0 + 4
    fail(balancer, a, 3, T0 + 4.0)  # out for 8 s, until T0 + 12; multiplier 2
    back = T0 + 12.0
    # One interval minus a hair of health: still multiplier 2, so the next ejection is 3 × 4 s.
    balancer.report(a, ok=True, now=back + 7.999)
    assert a.ejections == 2
    # Exactly one interval: decays to 1.
    balancer.report(a, ok=True, now=back + 8.0)
    assert a.ejections == 1
    # The next ejection is then the second one's length again: 2 × 4 s.
    fail(balancer, a, 3, back + 8.0)
    assert a.ejected_until == back + 8.0 + 8.0


def test_multiplier_decays_several_steps_at_once_and_never_below_zero() -> None:
    balancer = make(2)
    a, _ = balancer.states
    fail(balancer, a, 3, T0)
    fail(balancer, a, 3, T0 + 4.0)  # multiplier 2, back at T0 + 12
    # No report for a long while: the decay is computed from the time passed, not from reports seen.
    fail(balancer, a, 3, T0 + 12.0 + 2 * 8.0)
    assert a.ejected_until == T0 + 28.0 + 4.0  # decayed to 0, then this ejection is the first again
    balancer.report(a, ok=True, now=T0 + 32.0 + 100 * 8.0)
    assert a.ejections == 0


@pytest.mark.parametrize(
    ("n", "percent", "cap"),
    [(2, 50, 1), (2, 49, 0), (3, 50, 1), (3, 67, 2), (4, 50, 2), (4, 100, 4), (5, 0, 0)],
)
def test_max_ejected_percent_is_a_floor_never_exceeded(n: int, percent: int, cap: int) -> None:
    balancer = make(n, max_ejected_percent=percent)
    assert balancer.max_ejected(balancer.outlier) == cap  # type: ignore[arg-type]
    for state in balancer.states:
        fail(balancer, state, 3, T0)
    assert balancer.ejected_count(T0) == cap


def test_with_every_target_failing_ejection_stops_at_the_cap_and_resumes_when_room_frees() -> None:
    balancer = make(2)  # 50 % of 2 → one target at most
    a, b = balancer.states
    assert fail(balancer, a, 3, T0) is not None
    assert fail(balancer, b, 10, T0) is None  # at the cap: b stays in, still counting failures
    assert b.consecutive_failures == 10 and not b.ejected(T0)
    assert {balancer.pick(T0).target for _ in range(4)} == {b.target}
    # a comes back at T0 + 4: room for one again, and b's next failure ejects it.
    assert fail(balancer, b, 1, T0 + 4.0) is not None
    assert b.ejected(T0 + 4.0) and not a.ejected(T0 + 4.0)


def test_all_ejected_still_picks_a_target() -> None:
    balancer = make(2, max_ejected_percent=100)
    for state in balancer.states:
        fail(balancer, state, 3, T0)
    assert balancer.ejected_count(T0) == 2
    assert balancer.pick(T0) in balancer.states  # the breaker, not an empty list, decides what happens next
