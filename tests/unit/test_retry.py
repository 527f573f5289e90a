"""The retry core: backoff schedule, what is retryable, Retry-After, and the retry budget on its boundaries."""

from __future__ import annotations

import calendar
import itertools
import random
import time
from collections.abc import Iterator

import pytest

from proxy.resilience.budget import RetryBudget
from proxy.resilience.failures import FailureKind
from proxy.resilience.retry import (
    RetryRules,
    backoff_delays,
    choose_delay,
    parse_retry_after,
)

CONNECT_ERROR, RESET, TIMEOUT = FailureKind.CONNECT_ERROR, FailureKind.RESET, FailureKind.TIMEOUT


def take(n: int, delays: Iterator[float]) -> list[float]:
    return list(itertools.islice(delays, n))


# -- backoff ---------------------------------------------------------------------------------------------------


def test_backoff_doubles_from_base_and_stays_at_the_cap() -> None:
    assert take(6, backoff_delays(1.0, 4.0, jitter=False)) == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0]


def test_backoff_cap_between_powers_of_two() -> None:
    assert take(4, backoff_delays(0.05, 0.3, jitter=False)) == [0.05, 0.1, 0.2, 0.3]


def test_backoff_with_cap_below_base_waits_the_cap() -> None:
    assert take(3, backoff_delays(2.0, 0.5, jitter=False)) == [0.5, 0.5, 0.5]


def test_backoff_keeps_going_without_overflow() -> None:
    delays = take(2000, backoff_delays(1.0, 4.0, jitter=False))
    assert delays[-1] == 4.0


def test_full_jitter_stays_within_zero_and_the_delay() -> None:
    rng = random.Random(1)
    ceilings = take(200, backoff_delays(1.0, 4.0, jitter=False))
    for ceiling, delay in zip(ceilings, take(200, backoff_delays(1.0, 4.0, jitter=True, rng=rng)), strict=True):
        assert 0.0 <= delay <= ceiling
    assert len(set(take(20, backoff_delays(1.0, 4.0, jitter=True, rng=rng)))) > 1  # it does vary


def test_jitter_is_reproducible_with_a_seeded_random() -> None:
    first = take(10, backoff_delays(1.0, 4.0, jitter=True, rng=random.Random(42)))
    second = take(10, backoff_delays(1.0, 4.0, jitter=True, rng=random.Random(42)))
    assert first == second
    reference = random.Random(42)
    assert first[:4] == [reference.uniform(0, d) for d in (1.0, 2.0, 4.0, 4.0)]


# -- retry rules -----------------------------------------------------------------------------------------------

RULES = RetryRules(
    max_retries=3,
    retry_on_kinds=frozenset({CONNECT_ERROR, RESET}),
    retry_on_statuses=frozenset({502, 503, 504}),
    methods=frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"}),
)


@pytest.mark.parametrize(
    ("method", "allowed"),
    [("GET", True), ("PUT", True), ("DELETE", True), ("POST", False), ("PATCH", False), ("get", False)],
)
def test_methods(method: str, allowed: bool) -> None:
    assert RULES.method_allows(method) is allowed


@pytest.mark.parametrize(
    ("kind", "status", "allowed"),
    [
        (CONNECT_ERROR, 0, True),
        (RESET, 0, True),
        (TIMEOUT, 0, False),  # not listed: a timed-out request may have had its effect
        (None, 503, True),
        (None, 502, True),
        (None, 500, False),
        (None, 429, False),
        (None, 200, False),
        (CONNECT_ERROR, 503, True),  # a locally detected failure is judged by its kind
        (TIMEOUT, 503, False),
    ],
)
def test_outcomes(kind: str | None, status: int, allowed: bool) -> None:
    assert RULES.outcome_allows(kind, status) is allowed


# -- Retry-After -----------------------------------------------------------------------------------------------

# Sun, 06 Nov 1994 08:49:37 GMT, the RFC's own example.
EPOCH = float(calendar.timegm((1994, 11, 6, 8, 49, 37, 0, 0, 0)))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (b"3", 3.0),
        (" 5 ", 5.0),
        ("0", 0.0),
        (None, None),
        ("", None),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        (b"\xb2", None),  # "²" is a digit to str.isdigit but not a delay
    ],
)
def test_retry_after_seconds(value: str | bytes | None, expected: float | None) -> None:
    assert parse_retry_after(value, now_epoch=EPOCH) == expected


@pytest.mark.parametrize(
    "date",
    [
        "Sun, 06 Nov 1994 08:49:37 GMT",  # IMF-fixdate
        "Sunday, 06-Nov-94 08:49:37 GMT",  # obsolete RFC 850
        "Sun Nov  6 08:49:37 1994",  # obsolete asctime: no zone, but HTTP dates are UTC
    ],
)
def test_retry_after_http_date(date: str) -> None:
    assert parse_retry_after(date, now_epoch=EPOCH - 30) == 30.0
    assert parse_retry_after(date.encode(), now_epoch=EPOCH - 0.5) == 0.5
    assert parse_retry_after(date, now_epoch=EPOCH + 60) == 0.0  # a date in the past: no wait


def test_retry_after_http_date_ignores_the_local_time_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(time, "tzset"):
        pytest.skip("needs time.tzset")
    monkeypatch.setenv("TZ", "EST+5")  # POSIX form: needs no zoneinfo files
    time.tzset()
    try:
        assert parse_retry_after("Sun Nov  6 08:49:37 1994", now_epoch=EPOCH - 30) == 30.0
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize(
    ("backoff", "retry_after", "max_delay", "expected"),
    [
        (2.0, None, 4.0, 2.0),  # no header: the backoff
        (2.0, 0.5, 4.0, 0.5),  # asks for less: its shorter wait
        (2.0, 0.0, 4.0, 0.0),
        (1.0, 3.0, 4.0, 3.0),  # asks for more, within max_delay: honoured
        (1.0, 4.0, 4.0, 4.0),  # exactly max_delay
        (1.0, 4.001, 4.0, None),  # beyond max_delay: "not soon", give up
        (1.0, 3600.0, 4.0, None),
    ],
)
def test_choose_delay(backoff: float, retry_after: float | None, max_delay: float, expected: float | None) -> None:
    assert choose_delay(backoff, retry_after, max_delay) == expected


# -- retry budget ----------------------------------------------------------------------------------------------

T0 = 1000.0


def spend_all(budget: RetryBudget, now: float) -> int:
    spent = 0
    while budget.try_spend(now):
        spent += 1
        assert spent < 10_000
    return spent


def test_budget_allowance_is_floor_plus_ratio_of_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=1.0, window=10.0)
    assert budget.allowance(T0) == 10.0
    for _ in range(50):
        budget.record_request(T0)
    assert budget.allowance(T0) == 20.0
    assert budget.totals(T0) == (50, 0)


def test_budget_refuses_exactly_past_the_allowance() -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, window=10.0)
    assert not budget.try_spend(T0)  # no traffic, no floor: no retries
    for _ in range(4):
        budget.record_request(T0)
    assert budget.try_spend(T0)
    assert budget.try_spend(T0)
    assert not budget.try_spend(T0)  # 2 = 0.5 · 4
    assert budget.totals(T0) == (4, 2)
    budget.record_request(T0)
    assert not budget.try_spend(T0)  # 2.5 allowed and 2 spent: a third would make 3 > 2.5
    budget.record_request(T0)
    assert budget.try_spend(T0)  # 3 = 0.5 · 6


def test_budget_a_fraction_of_a_retry_is_not_a_retry() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, window=10.0)
    budget.record_request(T0)
    assert not budget.try_spend(T0)  # 0.2 · 1 request
    for _ in range(4):
        budget.record_request(T0)
    assert budget.try_spend(T0)  # 0.2 · 5 = 1
    assert not budget.try_spend(T0)


def test_budget_rounding_does_not_lose_a_retry() -> None:
    budget = RetryBudget(ratio=0.29, min_per_second=0.0, window=10.0)
    for _ in range(100):
        budget.record_request(T0)
    assert spend_all(budget, T0) == 29  # 0.29 · 100 is 28.999999999999996 in floating point


def test_budget_floor_alone() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=0.5, window=10.0)
    assert spend_all(budget, T0) == 5


def test_budget_requests_expire_after_the_window() -> None:
    # Ten 1 s buckets: what happened at T0 counts until just before T0 + 10 s.
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, window=10.0)
    for _ in range(3):
        budget.record_request(T0)
    assert budget.allowance(T0 + 9.999) == 3.0
    assert budget.allowance(T0 + 10.0) == 0.0
    assert not budget.try_spend(T0 + 10.0)


def test_budget_spent_retries_expire_too() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=0.2, window=10.0)  # 2 per window
    assert spend_all(budget, T0) == 2
    assert not budget.try_spend(T0 + 9.999)
    assert budget.try_spend(T0 + 10.0)
    assert budget.totals(T0 + 10.0) == (0, 1)


def test_budget_buckets_are_reused_without_leaking_old_counts() -> None:
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, window=10.0)
    for _ in range(7):
        budget.record_request(T0)
    budget.record_request(T0 + 10.5)  # same slot as T0 (epoch mod 10): T0's 7 must be gone
    assert budget.totals(T0 + 10.5) == (1, 0)
