"""Counts over the last ``window`` seconds, in buckets: the one sliding window the resilience cores share.

The window is cut into ``buckets`` buckets of ``window / buckets`` seconds each, aligned on multiples of that
width (bucket ``epoch = int(now // width)``, kept in slot ``epoch % buckets``). A slot is emptied when ``now``
reaches a newer epoch that maps onto it, and ``totals(now)`` sums the slots whose epoch is one of the last
``buckets`` epochs, the current one included: what was counted at ``t`` counts until just before
``t + window`` when ``t`` sits on a bucket edge, and drops out up to one bucket width earlier otherwise
(resilience4j's time-based sliding window; Finagle's retry budget works the same way).

Each window counts several things side by side in the same buckets (the breaker: calls, failures and slow
calls; the retry budget: requests and retries): ``add`` bumps one counter, ``add_each`` all of them at once.
``now`` comes from the caller's clock; nothing here reads one.
"""

from __future__ import annotations

DEFAULT_BUCKETS = 10


class BucketedWindow:
    __slots__ = ("_counts", "_epochs", "_width", "buckets")

    def __init__(self, window: float, counters: int, buckets: int = DEFAULT_BUCKETS) -> None:
        self.buckets = buckets
        self._width = window / buckets
        self._epochs = [-1] * buckets
        self._counts = [[0] * buckets for _ in range(counters)]

    def add(self, now: float, counter: int = 0, amount: int = 1) -> None:
        """Add ``amount`` to counter number ``counter`` in the bucket of ``now``."""
        self._counts[counter][self._slot(now)] += amount

    def add_each(self, now: float, *amounts: int) -> None:
        """Add ``amounts`` (one per counter, in order; missing ones are 0) to the bucket of ``now``."""
        slot = self._slot(now)
        for counter, amount in zip(self._counts, amounts, strict=False):
            counter[slot] += amount

    def _slot(self, now: float) -> int:
        """The slot of ``now``'s bucket, emptied first if it still holds an older bucket's counts."""
        epoch = int(now // self._width)
        slot = epoch % self.buckets
        if self._epochs[slot] != epoch:
            self._epochs[slot] = epoch
            for counter in self._counts:
                counter[slot] = 0
        return slot

    def totals(self, now: float) -> tuple[int, ...]:
        """Each counter's sum over the window that ends at ``now``."""
        oldest = int(now // self._width) - self.buckets
        live = [slot for slot, epoch in enumerate(self._epochs) if epoch > oldest]
        return tuple(sum(counter[slot] for slot in live) for counter in self._counts)

    def clear(self) -> None:
        self._epochs = [-1] * self.buckets
