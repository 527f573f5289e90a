"""Retries, pure: when to try again, how long to wait, and how many retries the traffic can afford.

- ``backoff_delays`` is a generator: ``base · 2ⁿ`` capped at ``max``, optionally with full jitter
  (a uniform draw in ``[0, delay]``, from a seedable ``random.Random``), as AWS's backoff article recommends.
- ``RetryRules`` answers whether an outcome is worth retrying for a method.
- ``decide_retry`` is the whole decision after a failed attempt — the forwarder's attempt loop and
  ``sidecar explain`` both ask it — returning a ``RetryDecision``: retry after a delay, or the ``NoRetry``
  reason not to.
- ``RetryBudget`` (in ``proxy.resilience.budget``) caps retries to a share of recent requests, so a failing
  upstream cannot turn every caller into a retry storm.

Sleeping is the caller's business (through its ``Clock``); nothing here touches asyncio.
"""

from __future__ import annotations

import datetime
import email.utils
import enum
import random
from collections.abc import Iterator
from dataclasses import dataclass

from proxy.resilience.failures import FailureKind


def backoff_delays(
    base_delay: float, max_delay: float, jitter: bool, rng: random.Random | None = None
) -> Iterator[float]:
    """Delays before retry 1, 2, 3, …: ``base_delay · 2ⁿ`` capped at ``max_delay``."""
    draw = (rng or random.Random()).uniform
    delay = base_delay
    while True:
        capped = min(delay, max_delay)
        yield draw(0.0, capped) if jitter else capped
        if delay < max_delay:  # stop doubling once capped, so the value never overflows
            delay *= 2


@dataclass(frozen=True, slots=True)
class RetryRules:
    max_retries: int
    retry_on_kinds: frozenset[FailureKind]
    retry_on_statuses: frozenset[int]
    methods: frozenset[str]

    def method_allows(self, method: str) -> bool:
        return method in self.methods

    def outcome_allows(self, kind: FailureKind | None, status: int) -> bool:
        """``kind`` is a failure kind for locally detected failures, else None and ``status`` is the answer's."""
        if kind is not None:
            return kind in self.retry_on_kinds
        return status in self.retry_on_statuses


def parse_retry_after(value: bytes | str | None, now_epoch: float) -> float | None:
    """Seconds an upstream asked us to wait (RFC 9110 §10.2.3: delay-seconds or an HTTP-date)."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    if text.isascii() and text.isdigit():  # "²" (latin-1 \xb2) is a digit to isdigit() but not to float()
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # asctime and "-0000" dates parse naive; HTTP dates are always UTC, not local time
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - now_epoch)


def choose_delay(backoff: float, retry_after: float | None, max_delay: float) -> float | None:
    """The wait before the next try, honouring an upstream's Retry-After.

    An upstream asking for less than the backoff gets its shorter wait; asking for more is honoured up to
    ``max_delay``; asking for longer than that means "not soon": None, do not retry.
    """
    if retry_after is None:
        return backoff
    if retry_after <= max(backoff, max_delay):
        return retry_after
    return None


class NoRetry(enum.StrEnum):
    """Why a failed attempt is not tried again, in the words of ``x-sidecar-decision`` (checked in this order)."""

    RETRIES_EXHAUSTED = "retries_exhausted"
    METHOD_NOT_RETRIED = "method_not_retried"
    OUTCOME_NOT_RETRIED = "outcome_not_retried"
    BODY_NOT_REPLAYABLE = "body_not_replayable"
    RETRY_AFTER_TOO_LONG = "retry_after_too_long"
    DEADLINE = "deadline"
    RETRY_BUDGET = "retry_budget"
    BREAKER_OPEN = "breaker_open"


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """``reason`` None: try again after ``delay`` seconds; else the reason not to."""

    reason: NoRetry | None
    delay: float = 0.0

    @property
    def retry(self) -> bool:
        return self.reason is None


def decide_retry(
    rules: RetryRules,
    *,
    attempts: int,
    method: str,
    kind: FailureKind | None,
    status: int,
    body_replayable: bool,
    backoff: Iterator[float],
    retry_after: float | None,
    max_delay: float,
    now: float,
    deadline: float,
    budget_allows: bool = True,
    breaker_retry_in: float = 0.0,
    breaker_enforced: bool = True,
) -> RetryDecision:
    """After attempt number ``attempts`` failed (``kind``, or an answer with ``status``): go again, and when?

    In order: at most ``rules.max_retries`` retries; the method and the outcome must be listed; the body must
    still be replayable; an upstream's ``retry_after`` (seconds) is honoured up to ``max_delay`` (longer: not
    soon, give up); the retry must start before ``deadline`` (starting exactly on it is too late); the retry
    budget must allow one more; and an enforced breaker must be due to admit a call (``breaker_retry_in`` seconds
    from ``now``) by the time the delay is over — else the next try would only be refused.

    ``backoff`` is advanced only once the first four checks pass, so a jittered schedule draws exactly when a
    delay is needed. Spending from the budget is the caller's, and only on a ``retry`` decision: a retry that
    is not sent costs nothing.
    """
    if attempts > rules.max_retries:
        return RetryDecision(NoRetry.RETRIES_EXHAUSTED)
    if not rules.method_allows(method):
        return RetryDecision(NoRetry.METHOD_NOT_RETRIED)
    if not rules.outcome_allows(kind, status):
        return RetryDecision(NoRetry.OUTCOME_NOT_RETRIED)
    if not body_replayable:
        return RetryDecision(NoRetry.BODY_NOT_REPLAYABLE)
    delay = choose_delay(next(backoff), retry_after, max_delay)
    if delay is None:
        return RetryDecision(NoRetry.RETRY_AFTER_TOO_LONG)
    if now + delay >= deadline:
        return RetryDecision(NoRetry.DEADLINE)
    if not budget_allows:
        return RetryDecision(NoRetry.RETRY_BUDGET)
    if breaker_enforced and breaker_retry_in > delay:
        return RetryDecision(NoRetry.BREAKER_OPEN)  # no point waiting: the next try would be refused
    return RetryDecision(None, delay)
