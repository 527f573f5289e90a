"""Retries, pure: when to try again, how long to wait, and how many retries the traffic can afford.

- ``backoff_delays`` is a generator: ``base · 2ⁿ`` capped at ``max``, optionally with full jitter
  (a uniform draw in ``[0, delay]``, from a seedable ``random.Random``), as AWS's backoff article recommends.
- ``RetryRules`` answers whether an outcome is worth retrying for a method.
- ``RetryBudget`` (in ``proxy.resilience.budget``) caps retries to a share of recent requests, so a failing
  upstream cannot turn every caller into a retry storm.

Sleeping is the caller's business (through its ``Clock``); nothing here touches asyncio.
"""

from __future__ import annotations

import datetime
import email.utils
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
