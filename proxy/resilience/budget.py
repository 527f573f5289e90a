"""The retry budget: retries allowed as a share of recent traffic (Linkerd's and Finagle's budget).

Over the last ``window`` seconds the budget allows ``min_per_second · window + ratio · requests`` retries: a
floor so a quiet upstream can still be retried, and a ratio so a failing busy one gets at most that share of
its traffic again instead of a retry storm. Requests and spent retries both live in one ``BucketedWindow``, so
both expire the same way.
"""

from __future__ import annotations

from proxy.resilience.window import BucketedWindow

_REQUESTS, _RETRIES = 0, 1  # the window's counters


class RetryBudget:
    """Retries allowed in the last ``window`` seconds: ``min_per_second · window + ratio · requests``."""

    __slots__ = ("_counts", "_min_per_second", "_ratio", "window")

    def __init__(self, ratio: float, min_per_second: float, window: float = 10.0) -> None:
        self._ratio = ratio
        self._min_per_second = min_per_second
        self.window = window
        self._counts = BucketedWindow(window, counters=2)

    def record_request(self, now: float) -> None:
        self._counts.add(now, _REQUESTS)

    def totals(self, now: float) -> tuple[int, int]:
        """(requests, retries) in the window."""
        requests, retries = self._counts.totals(now)
        return requests, retries

    def allowance(self, now: float) -> float:
        requests, _ = self.totals(now)
        return self._min_per_second * self.window + self._ratio * requests

    def allows(self, now: float) -> bool:
        """Would one more retry fit? (A peek: spends nothing.)"""
        requests, retries = self.totals(now)
        # This retry must fit too (retries + 1 ≤ allowance), else 0.2 · 1 request would allow a whole retry;
        # the epsilon keeps products like 0.29 · 100 = 28.999999999999996 from losing a retry to rounding.
        return retries + 1 <= self._min_per_second * self.window + self._ratio * requests + 1e-9

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget, or refuse."""
        if not self.allows(now):
            return False
        self._counts.add(now, _RETRIES)
        return True
