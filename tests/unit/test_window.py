"""The shared bucketed window on its boundaries (the breaker's rates and the retry budget both count in it)."""

from __future__ import annotations

from proxy.resilience.window import BucketedWindow

T0 = 1000.0  # on a bucket edge: buckets are 1 s wide below


def test_a_count_on_a_bucket_edge_lasts_until_just_before_a_whole_window() -> None:
    window = BucketedWindow(10.0, counters=1)
    window.add(T0)
    assert window.totals(T0 + 9.999) == (1,)
    assert window.totals(T0 + 10.0) == (0,)


def test_a_count_inside_a_bucket_leaves_with_its_bucket() -> None:
    window = BucketedWindow(10.0, counters=1)
    window.add(T0 + 0.5)
    assert window.totals(T0 + 9.999) == (1,)
    assert window.totals(T0 + 10.0) == (0,)  # 9.5 s after it was counted: the bucket is out


def test_counters_share_buckets_and_a_reused_slot_starts_from_zero() -> None:
    window = BucketedWindow(10.0, counters=3)
    window.add_each(T0, 1, 1, 0)
    window.add_each(T0, 1)  # missing amounts are 0
    window.add(T0, counter=2, amount=5)
    assert window.totals(T0) == (2, 1, 5)
    window.add(T0 + 10.0)  # the same slot, ten buckets on: the old counts must be gone
    assert window.totals(T0 + 10.0) == (1, 0, 0)


def test_clear_forgets_everything() -> None:
    window = BucketedWindow(10.0, counters=2)
    window.add_each(T0, 3, 4)
    window.clear()
    assert window.totals(T0) == (0, 0)
