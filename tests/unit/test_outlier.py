"""The outlier detector on its own (no balancer, no pools), and the balancer's injected random choice.

The balancer-level boundaries (ejection growth, decay, the cap) are in ``tests/balancing/test_balancer_unit.py``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from proxy.policy.values import Target
from proxy.resilience.outlier import EjectionRecord, OutlierDetector, max_ejected
from proxy.upstream.balancer import Balancer

T0 = 1000.0


@dataclass(frozen=True)
class Settings:
    consecutive_failures: int = 2
    interval: float = 8.0
    base_ejection: float = 4.0
    max_ejection: float = 12.0
    max_ejected_percent: int = 50


def test_consecutive_failures_eject_for_the_base_time_and_name_the_kind() -> None:
    records = [EjectionRecord(), EjectionRecord()]
    detector = OutlierDetector(Settings(), records)
    first, _ = records
    assert detector.report(first, ok=False, now=T0, kind="reset") is None
    assert detector.report(first, ok=False, now=T0, kind="reset") == "2_consecutive_reset"
    assert first.ejected(T0 + 3.999) and not first.ejected(T0 + 4.0)
    assert detector.ejected_count(T0) == 1


def test_a_kindless_failure_is_named_failures() -> None:
    records = [EjectionRecord(), EjectionRecord()]
    detector = OutlierDetector(Settings(consecutive_failures=1), records)
    assert detector.report(records[0], ok=False, now=T0) == "1_consecutive_failures"


def test_at_the_cap_no_more_targets_are_ejected() -> None:
    records = [EjectionRecord() for _ in range(3)]
    detector = OutlierDetector(Settings(consecutive_failures=1, max_ejected_percent=50), records)
    assert detector.max_ejected() == 1
    assert detector.report(records[0], ok=False, now=T0) is not None
    assert detector.report(records[1], ok=False, now=T0) is None
    assert records[1].consecutive_failures == 1 and not records[1].ejected(T0)


def test_max_ejected_is_the_floor_of_the_percentage() -> None:
    assert [max_ejected(n, 50) for n in (1, 2, 3, 4)] == [0, 1, 1, 2]
    assert max_ejected(3, 67) == 2 and max_ejected(5, 0) == 0 and max_ejected(4, 100) == 4


def test_least_request_draws_its_two_choices_from_the_injected_random() -> None:
    def picks(seed: int) -> list[int]:
        targets = tuple(Target("http", "127.0.0.1", 20000 + i) for i in range(4))
        balancer = Balancer(targets, "least_request", None, idle_timeout=30.0, rng=random.Random(seed))
        for i, state in enumerate(balancer.states):
            state.outstanding = i  # all different: the draw decides which pairs compete
        return [balancer.pick(T0).target.port for _ in range(20)]

    assert picks(7) == picks(7)
    assert len(set(picks(7))) > 1
