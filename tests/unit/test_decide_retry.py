"""``decide_retry`` on its boundaries: the one retry decision the forwarder and ``sidecar explain`` share.

Times are binary fractions so a boundary is exactly the boundary.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.resilience.failures import FailureKind
from proxy.resilience.retry import NoRetry, RetryDecision, RetryRules, backoff_delays, decide_retry

RULES = RetryRules(
    max_retries=3,
    retry_on_kinds=frozenset({FailureKind.CONNECT_ERROR, FailureKind.RESET}),
    retry_on_statuses=frozenset({502, 503, 504}),
    methods=frozenset({"GET", "PUT"}),
)
NOW = 1000.0


def schedule() -> Iterator[float]:
    return backoff_delays(1.0, 4.0, jitter=False)  # 1, 2, 4, 4, …


def decide(**overrides: Any) -> RetryDecision:
    arguments: dict[str, Any] = {
        "attempts": 1,
        "method": "GET",
        "kind": FailureKind.CONNECT_ERROR,
        "status": 0,
        "body_replayable": True,
        "backoff": schedule(),
        "retry_after": None,
        "max_delay": 4.0,
        "now": NOW,
        "deadline": NOW + 15.0,
        "budget_allows": True,
        "breaker_retry_in": 0.0,
        "breaker_enforced": True,
    }
    arguments.update(overrides)
    return decide_retry(RULES, **arguments)


def test_a_retryable_failure_is_retried_after_the_backoff() -> None:
    decision = decide()
    assert decision == RetryDecision(None, 1.0) and decision.retry


def test_the_reasons_are_the_words_of_x_sidecar_decision() -> None:
    assert [reason.value for reason in NoRetry] == [
        "retries_exhausted",
        "method_not_retried",
        "outcome_not_retried",
        "body_not_replayable",
        "retry_after_too_long",
        "deadline",
        "retry_budget",
        "breaker_open",
    ]


# -- attempts ------------------------------------------------------------------------------------------------


def test_attempts_equal_to_max_retries_still_allow_the_last_retry() -> None:
    assert decide(attempts=3).retry  # attempt 3 failed: retry 3 of 3 may follow
    assert decide(attempts=4).reason is NoRetry.RETRIES_EXHAUSTED


def test_no_retries_configured_means_the_first_failure_is_final() -> None:
    rules = RetryRules(0, RULES.retry_on_kinds, RULES.retry_on_statuses, RULES.methods)
    decision = decide_retry(
        rules,
        attempts=1,
        method="GET",
        kind=FailureKind.CONNECT_ERROR,
        status=0,
        body_replayable=True,
        backoff=schedule(),
        retry_after=None,
        max_delay=4.0,
        now=NOW,
        deadline=NOW + 15.0,
    )
    assert decision.reason is NoRetry.RETRIES_EXHAUSTED


# -- what may be retried ---------------------------------------------------------------------------------------


def test_a_method_not_listed_is_not_retried() -> None:
    assert decide(method="POST").reason is NoRetry.METHOD_NOT_RETRIED


@pytest.mark.parametrize(
    ("kind", "status", "retried"),
    [
        (FailureKind.CONNECT_ERROR, 0, True),
        (FailureKind.TIMEOUT, 0, False),
        (FailureKind.BAD_RESPONSE, 503, False),  # a locally detected failure is judged by its kind
        (None, 503, True),
        (None, 500, False),
    ],
)
def test_the_outcome_must_be_listed(kind: FailureKind | None, status: int, retried: bool) -> None:
    decision = decide(kind=kind, status=status)
    assert decision.retry is retried
    if not retried:
        assert decision.reason is NoRetry.OUTCOME_NOT_RETRIED


def test_a_body_that_cannot_be_replayed_stops_retries() -> None:
    assert decide(body_replayable=False).reason is NoRetry.BODY_NOT_REPLAYABLE


# -- Retry-After -----------------------------------------------------------------------------------------------


def test_retry_after_up_to_max_delay_is_honoured_and_beyond_it_ends_the_retries() -> None:
    assert decide(kind=None, status=503, retry_after=0.5).delay == 0.5  # shorter than the backoff: its wait
    assert decide(kind=None, status=503, retry_after=4.0) == RetryDecision(None, 4.0)  # exactly max_delay
    assert decide(kind=None, status=503, retry_after=4.0625).reason is NoRetry.RETRY_AFTER_TOO_LONG


# -- the deadline ----------------------------------------------------------------------------------------------


def test_a_retry_must_start_before_the_deadline() -> None:
    assert decide(deadline=NOW + 1.0).reason is NoRetry.DEADLINE  # the backoff ends exactly on it: too late
    assert decide(deadline=NOW + 1.0 + 2**-20) == RetryDecision(None, 1.0)


def test_the_deadline_applies_to_the_retry_after_delay_too() -> None:
    assert decide(kind=None, status=503, retry_after=3.0, deadline=NOW + 3.0).reason is NoRetry.DEADLINE


# -- budget and breaker ----------------------------------------------------------------------------------------


def test_a_refusing_budget_stops_the_retry() -> None:
    assert decide(budget_allows=False).reason is NoRetry.RETRY_BUDGET


def test_an_open_breaker_that_outlasts_the_delay_stops_the_retry() -> None:
    assert decide(breaker_retry_in=1.0 + 2**-20).reason is NoRetry.BREAKER_OPEN
    assert decide(breaker_retry_in=1.0).retry  # due exactly when the backoff ends: worth the wait
    assert decide(breaker_retry_in=60.0, breaker_enforced=False).retry  # shadow mode never stops a retry


def test_reasons_are_checked_in_order() -> None:
    everything_wrong = {
        "attempts": 4,
        "method": "POST",
        "kind": FailureKind.TIMEOUT,
        "body_replayable": False,
        "retry_after": 60.0,
        "deadline": NOW,
        "budget_allows": False,
        "breaker_retry_in": 60.0,
    }
    seen = []
    fixed: dict[str, Any] = {}
    right = {
        "attempts": 1,
        "method": "GET",
        "kind": FailureKind.CONNECT_ERROR,
        "body_replayable": True,
        "retry_after": None,
        "deadline": NOW + 15.0,
        "budget_allows": True,
        "breaker_retry_in": 0.0,
    }
    for key in everything_wrong:
        decision = decide(**{**everything_wrong, **fixed})
        seen.append(decision.reason)
        fixed[key] = right[key]
    assert seen == list(NoRetry)
    assert decide(**{**everything_wrong, **fixed}).retry


# -- the backoff schedule --------------------------------------------------------------------------------------


def test_the_backoff_is_drawn_only_when_a_delay_is_needed() -> None:
    delays = schedule()
    for _ in range(3):
        assert decide(method="POST", backoff=delays).reason is NoRetry.METHOD_NOT_RETRIED
    assert decide(backoff=delays).delay == 1.0  # the first delay still: nothing was drawn above
    assert decide(backoff=delays, deadline=NOW).reason is NoRetry.DEADLINE  # drawn (2.0) and refused
    assert list(itertools.islice(delays, 2)) == [4.0, 4.0]
