"""The outbound rate limit's local counter and its gate, standing exactly on each window's boundaries.

Times are binary fractions of a second (or exact sums of them) where an assertion compares them exactly.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from proxy.resilience.clock import ManualClock
from proxy.resilience.ratelimit import (
    GRANTED,
    LimitSpec,
    LocalBackend,
    RateGate,
    Refusal,
    SharedState,
    Verdict,
)

T0 = 1000.0
SLIDING_10_PER_S = LimitSpec(10, 1.0)


def fill(backend: LocalBackend, n: int, now: float, route: str | None = None, weight: int = 1) -> None:
    for _ in range(n):
        assert backend.take_now(weight, route, now) is GRANTED


def refused(wait: float, reason: Refusal = Refusal.RATE_LIMITED) -> Verdict:
    return Verdict(wait, reason)


# -- sliding windows ---------------------------------------------------------------------------------------------


def test_a_full_sliding_window_refuses_until_the_first_send_is_a_whole_window_old() -> None:
    backend = LocalBackend([SLIDING_10_PER_S])
    fill(backend, 10, T0)
    assert backend.take_now(1, None, T0) == refused(1.0)
    verdict = backend.take_now(1, None, T0 + 0.999)
    assert verdict.reason is Refusal.RATE_LIMITED
    assert verdict.wait == pytest.approx(0.001, abs=1e-9)
    assert backend.take_now(1, None, T0 + 1.0) is GRANTED


def test_a_sliding_wait_is_when_enough_of_the_oldest_sends_expire() -> None:
    backend = LocalBackend([SLIDING_10_PER_S])
    fill(backend, 4, T0)
    fill(backend, 4, T0 + 0.25)
    fill(backend, 2, T0 + 0.5)
    assert backend.take_now(5, None, T0 + 0.75) == refused(0.5)  # the 4 of T0 are not enough: wait for T0+0.25's
    assert backend.take_now(4, None, T0 + 0.75) == refused(0.25)
    assert backend.take_now(4, None, T0 + 1.0) is GRANTED
    assert backend.snapshot(T0 + 1.0).limits[0].left == 0


def test_a_margin_keeps_a_send_counted_past_per() -> None:
    backend = LocalBackend([LimitSpec(2, 1.0, margin=0.125)])
    fill(backend, 2, T0)
    assert backend.take_now(1, None, T0 + 1.0) == refused(0.125)
    assert backend.take_now(1, None, T0 + 1.125) is GRANTED


def test_the_sliding_log_stays_within_requests_entries() -> None:
    backend = LocalBackend([LimitSpec(5, 1.0)])
    for step in range(1000):
        backend.take_now(1, None, T0 + step / 64)
    limit = backend._limits[0]
    assert len(limit.expiries) <= 5  # type: ignore[attr-defined]


def test_sends_within_a_millisecond_share_a_log_entry_and_count_until_the_latest_expires() -> None:
    backend = LocalBackend([LimitSpec(100_000, 1.0)])
    for step in range(10_000):  # 10,000 sends over 100 ms: one entry per millisecond, not per send
        assert backend.take_now(1, None, T0 + step * 1e-5).granted
    limit = backend._limits[0]
    assert len(limit.expiries) <= 101  # type: ignore[attr-defined]
    # Merging only ever counts a send longer: the first send of the first entry is still counted a second later.
    assert backend.snapshot(T0 + 1.0 + 5e-4).limits[0].left < 100_000
    assert backend.snapshot(T0 + 1.1).limits[0].left == 100_000


def test_sends_granted_on_credit_never_exceed_a_sliding_window_and_count_until_the_latest_expires() -> None:
    """Requests the hot path grants without asking each limit (its credit) are counted as one send at the latest
    of them: a burst within a millisecond fills the window exactly, and frees it one period after its last send."""
    backend = LocalBackend([LimitSpec(5, 1.0), LimitSpec(1000, 60.0, fixed=True)])
    times = [T0 + i * 1e-4 for i in range(5)]
    assert all(backend.take_now(1, None, t) is GRANTED for t in times)
    verdict = backend.take_now(1, None, T0 + 5e-4)
    assert verdict.reason is Refusal.RATE_LIMITED
    assert verdict.wait == pytest.approx(1.0 + 4e-4 - 5e-4)  # until the burst's last send expires
    assert backend.snapshot(T0 + 1.0 + 3.9e-4).limits[0].left == 0  # the first send, counted with the last
    assert backend.snapshot(T0 + 1.0 + 4e-4).limits[0].left == 5
    assert backend.snapshot(T0 + 1.0 + 4e-4).limits[1].left == 995


def test_credit_never_lets_any_window_hold_more_than_its_limit_under_sub_millisecond_traffic() -> None:
    import random

    rng = random.Random(7)
    spec = LimitSpec(20, 0.05)  # grain: 50 µs
    backend = LocalBackend([spec, LimitSpec(450, 1.0, fixed=True)], epoch_offset=0.25)
    now, sent = T0, []
    for _ in range(5000):
        now += rng.choice((0.0, 1e-6, 3e-5, 2e-4, 1e-3))
        weight = rng.choice((1, 1, 2))
        if backend.take_now(weight, None, now).granted:
            sent.append((now, weight))
    for i, (start, _) in enumerate(sent):  # every interval of length per that starts at a send
        assert sum(w for t, w in sent[i:] if t < start + spec.per) <= spec.requests
    windows: dict[float, int] = {}
    for t, w in sent:
        windows[(t + 0.25) // 1.0] = windows.get((t + 0.25) // 1.0, 0) + w
    assert max(windows.values()) <= 450
    assert sum(w for _, w in sent) > 450  # the limits were reached, not just never approached


# -- fixed windows -----------------------------------------------------------------------------------------------

EPOCH = 1_700_000_000.0 - T0  # wall time minus the monotonic clock: T0 sits on a whole minute (1.7e9 = 60 × …)


def test_a_fixed_window_resets_on_the_calendar_edge() -> None:
    assert (T0 + EPOCH) % 60 == 20.0  # 1.7e9 is 20 s past a whole minute
    backend = LocalBackend([LimitSpec(3, 60.0, fixed=True)], epoch_offset=EPOCH)
    edge = T0 + 40.0
    fill(backend, 3, T0)
    assert backend.take_now(1, None, T0) == refused(40.0)
    assert backend.take_now(1, None, edge - 0.0625) == refused(0.0625)
    fill(backend, 3, edge)  # a new window: the full three again, right after the old window's three
    assert backend.take_now(1, None, edge + 59.5) == refused(0.5)


def test_a_fixed_window_does_not_slide() -> None:
    backend = LocalBackend([LimitSpec(3, 1.0, fixed=True)])
    fill(backend, 3, T0 + 0.875)
    assert backend.take_now(1, None, T0 + 0.875) == refused(0.125)
    fill(backend, 3, T0 + 1.0)  # six within 1/8 s: as a calendar counter counts them


def test_a_weight_above_a_limit_never_fits() -> None:
    backend = LocalBackend([LimitSpec(10, 1.0), LimitSpec(100, 60.0, fixed=True)])
    assert backend.take_now(11, None, T0) == refused(math.inf)
    assert backend.take_now(10, None, T0) is GRANTED


def test_weights_count_as_many_requests() -> None:
    backend = LocalBackend([LimitSpec(10, 1.0)])
    assert backend.take_now(6, None, T0) is GRANTED
    assert backend.take_now(5, None, T0) == refused(1.0)
    assert backend.take_now(4, None, T0) is GRANTED
    assert backend.snapshot(T0).limits[0].left == 0


# -- scopes and all-or-none --------------------------------------------------------------------------------------


def test_a_scoped_limit_counts_only_its_route_and_every_limit_must_allow() -> None:
    everyone = LimitSpec(5, 1.0)
    depth = LimitSpec(2, 1.0, scope="depth")
    backend = LocalBackend([everyone, depth])
    fill(backend, 2, T0, route="depth")
    assert backend.take_now(1, "depth", T0) == refused(1.0)  # the route's own limit is full
    fill(backend, 3, T0, route="ticker")  # others only see the upstream's limit, with 3 left
    assert backend.take_now(1, None, T0) == refused(1.0)
    left = [state.left for state in backend.snapshot(T0).limits]
    assert left == [0, 0]


def test_a_refused_request_spends_on_no_limit() -> None:
    backend = LocalBackend([LimitSpec(5, 1.0), LimitSpec(3, 60.0, fixed=True)])
    fill(backend, 3, T0)
    assert backend.take_now(1, None, T0 + 0.5).reason is Refusal.RATE_LIMITED  # the fixed one is full
    assert [s.left for s in backend.snapshot(T0 + 0.5).limits] == [2, 0]  # the sliding one was not spent


def test_a_share_divides_every_limit() -> None:
    backend = LocalBackend([LimitSpec(10, 1.0), LimitSpec(2, 1.0, fixed=True, scope="x")], share=3)
    fill(backend, 3, T0)
    assert backend.take_now(1, None, T0) == refused(1.0)
    assert backend.take_now(1, "x", T0 + 1.0) is GRANTED  # 2 // 3 is still 1
    assert backend.take_now(1, "x", T0 + 1.5).reason is Refusal.RATE_LIMITED
    with pytest.raises(ValueError):
        LocalBackend([], share=0)


# -- cool-down -----------------------------------------------------------------------------------------------------


def test_a_cool_down_refuses_everything_until_it_ends_and_only_grows() -> None:
    backend = LocalBackend([LimitSpec(10, 1.0)])
    backend.cool_down(2.0, T0)
    backend.cool_down(1.0, T0 + 0.5)  # ends sooner than the one running: ignored
    assert backend.take_now(1, None, T0 + 0.5) == refused(1.5, Refusal.UPSTREAM_COOLDOWN)
    assert backend.take_now(11, None, T0 + 1.0) == refused(1.0, Refusal.UPSTREAM_COOLDOWN)  # checked first
    assert backend.snapshot(T0 + 1.75).cooldown_left == 0.25
    assert backend.take_now(1, None, T0 + 2.0) is GRANTED
    assert backend.snapshot(T0 + 2.0).cooldown_left == 0.0


# -- observed usage --------------------------------------------------------------------------------------------------


def test_observed_used_above_our_count_is_phantom_usage() -> None:
    backend = LocalBackend([LimitSpec(10, 1.0), LimitSpec(100, 60.0, fixed=True)])
    fill(backend, 2, T0)
    backend.observe(0, T0 + 0.5, used=6)  # someone else sent 4
    backend.observe(1, T0 + 0.5, used=1)  # below our own count: ignored
    assert [s.left for s in backend.snapshot(T0 + 0.5).limits] == [4, 98]
    fill(backend, 4, T0 + 0.5)
    assert backend.take_now(1, None, T0 + 0.5) == refused(0.5)  # our first two expire at T0 + 1
    fill(backend, 2, T0 + 1.0)
    assert backend.take_now(1, None, T0 + 1.0) == refused(0.5)  # the phantom four expire at T0 + 1.5
    backend.observe(1, T0 + 1.0, used=99)
    assert backend.snapshot(T0 + 1.0).limits[1].left == 1


def test_observed_used_beyond_the_limit_fills_the_window_for_a_whole_per() -> None:
    backend = LocalBackend([LimitSpec(10, 1.0)])
    fill(backend, 5, T0)
    backend.observe(0, T0 + 0.5, used=25)
    assert backend.take_now(1, None, T0 + 1.0) == refused(0.5)  # not freed when our own five expire
    assert backend.take_now(10, None, T0 + 1.5) is GRANTED
    assert len(backend._limits[0].expiries) <= 10  # type: ignore[attr-defined]


def test_remaining_caps_sends_until_reset() -> None:
    backend = LocalBackend([LimitSpec(100, 60.0, fixed=True)])
    backend.observe(0, T0, remaining=2, reset=4.0)
    fill(backend, 2, T0)
    assert backend.take_now(1, None, T0 + 1.0) == refused(3.0)
    assert backend.snapshot(T0 + 1.0).limits[0].left == 0
    backend.observe(0, T0 + 1.0, remaining=50, reset=2.0)  # looser and shorter: says nothing new
    assert backend.take_now(1, None, T0 + 1.0) == refused(3.0)
    assert backend.take_now(1, None, T0 + 4.0) is GRANTED


def test_remaining_zero_means_wait_until_reset() -> None:
    backend = LocalBackend([LimitSpec(10, 1.0)])
    backend.observe(0, T0, remaining=0, reset=2.5)
    assert backend.take_now(1, None, T0) == refused(2.5)
    assert backend.take_now(1, None, T0 + 2.5) is GRANTED


def test_caps_from_two_windows_both_hold() -> None:
    backend = LocalBackend([LimitSpec(1000, 60.0)])
    backend.observe(0, T0, remaining=1, reset=1.0)  # the upstream's current window: one left for a second
    backend.observe(0, T0, remaining=5, reset=10.0)  # and a report of the next one
    assert backend.take_now(1, None, T0) is GRANTED
    assert backend.take_now(1, None, T0) == refused(1.0)
    fill(backend, 4, T0 + 1.0)
    assert backend.take_now(1, None, T0 + 1.0) == refused(9.0)


def test_a_shorter_stricter_cap_does_not_drop_a_longer_looser_one() -> None:
    backend = LocalBackend([LimitSpec(1000, 60.0)])
    backend.observe(0, T0, remaining=5, reset=10.0)
    backend.observe(0, T0, remaining=1, reset=1.0)
    fill(backend, 1, T0)
    assert backend.take_now(1, None, T0) == refused(1.0)
    fill(backend, 4, T0 + 1.0)
    assert backend.take_now(1, None, T0 + 1.0) == refused(9.0)


def test_too_many_caps_merge_into_a_stricter_one() -> None:
    backend = LocalBackend([LimitSpec(1000, 60.0)])
    for i in range(10):  # each lasts longer and allows more: none says more than another
        backend.observe(0, T0, remaining=i + 1, reset=i + 1.0)
    assert len(backend._limits[0].caps) == 8
    fill(backend, 1, T0)
    assert backend.take_now(1, None, T0) == refused(3.0)  # the first three merged: 1 left until T0 + 3


def test_remaining_without_reset_reads_as_used_and_bad_observations_are_ignored() -> None:
    backend = LocalBackend([LimitSpec(10, 1.0)])
    backend.observe(0, T0, remaining=7)
    backend.observe(5, T0, used=10)
    backend.observe(0, T0, remaining=-1, reset=3.0)
    backend.observe(0, T0, remaining=0, reset=0.0)
    assert backend.snapshot(T0).limits[0].left == 7


def test_a_shared_remaining_is_divided_by_the_share() -> None:
    backend = LocalBackend([LimitSpec(100, 1.0)], share=2)
    backend.observe(0, T0, remaining=5, reset=1.0)
    fill(backend, 2, T0)
    assert backend.take_now(1, None, T0).reason is Refusal.RATE_LIMITED


def test_a_snapshot_is_local_and_shows_what_is_left() -> None:
    backend = LocalBackend([LimitSpec(10, 1.0), LimitSpec(3, 60.0, fixed=True, scope="a")])
    fill(backend, 2, T0, route="a")
    snapshot = backend.snapshot(T0)
    assert [s.left for s in snapshot.limits] == [8, 1]
    assert snapshot.limits[1].spec.scope == "a"
    assert (snapshot.cooldown_left, snapshot.waiting, snapshot.shared) == (0.0, 0, SharedState.LOCAL)


async def test_take_answers_as_take_now() -> None:
    backend = LocalBackend([LimitSpec(1, 1.0)])
    assert await backend.take(1, None, T0) is GRANTED
    assert await backend.take(1, None, T0) == refused(1.0)


# -- the gate --------------------------------------------------------------------------------------------------------


def gate_on(*specs: LimitSpec, clock: ManualClock | None = None) -> tuple[RateGate, ManualClock]:
    clock = clock or ManualClock(T0)
    return RateGate(LocalBackend(specs), clock), clock


async def settle() -> None:
    """Let every ready task run until it blocks again (on the clock or on its turn)."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_try_acquire_answers_at_once_while_nobody_waits() -> None:
    gate, _ = gate_on(LimitSpec(1, 1.0))
    assert gate.try_acquire(1, None) is GRANTED
    assert gate.try_acquire(1, None) == refused(1.0)  # would not wait: final
    assert gate.try_acquire(1, None, max_wait=1.0) is None  # would wait: in line, through acquire
    assert gate.try_acquire(1, None, max_wait=0.5) == refused(1.0)


async def test_waiters_are_served_in_arrival_order() -> None:
    gate, clock = gate_on(LimitSpec(2, 1.0))
    assert gate.try_acquire(2, None) is GRANTED
    done: list[str] = []

    async def caller(name: str, weight: int) -> Verdict:
        verdict = await gate.acquire(weight, None, max_wait=5.0)
        done.append(name)
        return verdict

    heavy = asyncio.create_task(caller("heavy", 2))
    await settle()
    light = [asyncio.create_task(caller(f"light{i}", 1)) for i in range(3)]
    await settle()
    assert gate.waiting == 4
    assert gate.try_acquire(1, None) is None  # a newcomer never jumps the line
    clock.advance(1.0)
    await settle()
    assert done == ["heavy"]  # the two light ones could have fitted first, had they jumped the heavy one
    clock.advance(1.0)
    await settle()
    assert done == ["heavy", "light0", "light1"]
    clock.advance(1.0)
    await settle()
    assert done == ["heavy", "light0", "light1", "light2"]
    assert all(task.result() is GRANTED for task in [heavy, *light])
    assert gate.waiting == 0
    assert gate.try_acquire(1, None) is GRANTED  # the line is empty: the room light2 left is anyone's
    assert gate.try_acquire(1, None) == refused(1.0)


async def test_a_wait_beyond_max_wait_is_refused_at_once_with_the_time_until_it_could_go() -> None:
    gate, clock = gate_on(LimitSpec(2, 1.0))
    assert gate.try_acquire(2, None) is GRANTED
    clock.advance(0.25)
    assert await gate.acquire(1, None, max_wait=0.5) == refused(0.75)
    assert await gate.acquire(1, None, max_wait=0.0) == refused(0.75)
    assert await gate.acquire(3, None, max_wait=10.0) == refused(math.inf)
    assert clock.slept == []  # nobody waited on the clock


async def test_a_waiter_behind_someone_who_goes_too_late_is_refused_at_once() -> None:
    gate, clock = gate_on(LimitSpec(1, 1.0))
    assert gate.try_acquire(1, None) is GRANTED
    first = asyncio.create_task(gate.acquire(1, None, max_wait=2.0))
    await settle()
    clock.advance(0.5)
    assert await gate.acquire(1, None, max_wait=0.25) == refused(0.5)  # the first goes at T0 + 1
    assert await gate.acquire(1, None, max_wait=0.0) == refused(0.5)
    # One that would wait long enough for the first, but not for its own tokens after it: refused at its deadline.
    second = asyncio.create_task(gate.acquire(1, None, max_wait=0.75))
    await settle()
    clock.advance(0.5)
    await settle()
    assert await first is GRANTED
    assert await second == refused(1.0)  # its turn came at T0 + 1; the next room is at T0 + 2, past T0 + 1.25
    assert gate.waiting == 0


async def test_a_waiter_whose_turn_never_comes_in_time_is_refused_at_its_deadline() -> None:
    gate, clock = gate_on(LimitSpec(1, 1.0))
    assert gate.try_acquire(1, None) is GRANTED
    first = asyncio.create_task(gate.acquire(1, None, max_wait=1.0))
    await settle()
    gate.backend.cool_down(5.0, clock.monotonic())  # the upstream says wait; the first is still asleep
    second = asyncio.create_task(gate.acquire(1, None, max_wait=0.5))
    await settle()
    clock.advance(0.5)
    await settle()
    verdict = await second
    assert verdict.reason is Refusal.RATE_LIMITED and verdict.wait > 0  # refused behind the first, in time
    clock.advance(0.5)
    assert await first == refused(4.0, Refusal.UPSTREAM_COOLDOWN)


async def test_a_cancelled_waiter_spends_nothing_and_the_next_goes() -> None:
    gate, clock = gate_on(LimitSpec(2, 1.0))
    assert gate.try_acquire(2, None) is GRANTED
    first = asyncio.create_task(gate.acquire(2, None, max_wait=5.0))
    second = asyncio.create_task(gate.acquire(2, None, max_wait=5.0))
    await settle()
    assert gate.waiting == 2
    first.cancel()
    await settle()
    assert first.cancelled() and gate.waiting == 1
    clock.advance(1.0)
    assert await second is GRANTED  # the tokens the first waited for
    assert gate.waiting == 0


async def test_a_cancelled_waiter_behind_the_first_just_leaves() -> None:
    gate, clock = gate_on(LimitSpec(1, 1.0))
    assert gate.try_acquire(1, None) is GRANTED
    first = asyncio.create_task(gate.acquire(1, None, max_wait=5.0))
    second = asyncio.create_task(gate.acquire(1, None, max_wait=5.0))
    third = asyncio.create_task(gate.acquire(1, None, max_wait=5.0))
    await settle()
    second.cancel()
    await settle()
    assert gate.waiting == 2
    clock.advance(1.0)
    assert await first is GRANTED
    clock.advance(1.0)
    assert await third is GRANTED
    assert gate.backend.snapshot(clock.monotonic()).limits[0].left == 0


async def test_the_gate_waits_out_a_cool_down_that_max_wait_covers() -> None:
    gate, clock = gate_on(LimitSpec(10, 1.0))
    gate.backend.cool_down(0.5, T0)
    assert gate.try_acquire(1, None) == refused(0.5, Refusal.UPSTREAM_COOLDOWN)
    waiter = asyncio.create_task(gate.acquire(1, None, max_wait=1.0))
    await settle()
    snapshot = gate.snapshot(clock.monotonic())
    assert (snapshot.waiting, snapshot.cooldown_left) == (1, 0.5)
    clock.advance(0.5)
    assert await waiter is GRANTED
    assert clock.slept == [0.5]


class RemoteBackend(LocalBackend):
    """A backend that cannot answer without I/O (as the Redis-shared one when it must ask Redis)."""

    def take_now(self, weight: int, route: str | None, now: float) -> Verdict | None:  # type: ignore[override]
        return None

    async def take(self, weight: int, route: str | None, now: float) -> Verdict:
        await asyncio.sleep(0)  # the round trip
        return super().take_now(weight, route, now)


async def test_a_backend_that_needs_io_is_asked_through_acquire() -> None:
    clock = ManualClock(T0)
    gate = RateGate(RemoteBackend([LimitSpec(1, 1.0)]), clock)
    assert gate.try_acquire(1, None) is None
    assert await gate.acquire(1, None, max_wait=0.0) is GRANTED
    assert await gate.acquire(1, None, max_wait=0.0) == refused(1.0)
    waiter = asyncio.create_task(gate.acquire(1, None, max_wait=1.0))
    await settle()
    assert gate.waiting == 1 and clock.slept == [1.0]
    clock.advance(1.0)
    assert await waiter is GRANTED
