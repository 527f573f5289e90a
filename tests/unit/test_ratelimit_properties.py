"""Properties of the local rate-limit counter over random traffic: what it grants never exceeds any limit.

Every time, period, margin and offset is a multiple of 1/64 s, so window arithmetic is exact in floats and the
checks below can compare times with ``>`` and ``//`` as an upstream counting the same sends would.
"""

from __future__ import annotations

import asyncio
import copy
import math
from collections import defaultdict
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.resilience.clock import ManualClock
from proxy.resilience.ratelimit import LimitSpec, LocalBackend, RateGate, Refusal, Verdict

T0 = 1000.0
TICK = 1 / 64
ROUTES = (None, "a", "b")

specs = st.builds(
    LimitSpec,
    requests=st.integers(1, 8),
    per=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    fixed=st.booleans(),
    scope=st.sampled_from(ROUTES),
    margin=st.sampled_from([0.0, TICK, 0.125]),
)


@dataclass(frozen=True)
class Send:
    advance: int  # ticks before it
    weight: int
    route: str | None


@dataclass(frozen=True)
class Report:
    """An upstream's usage header on limit number ``limit``: ``used``, or ``remaining`` until ``reset_ticks``."""

    limit: int
    used: int | None
    remaining: int | None
    reset_ticks: int


# Advances of whole periods and margins make sends land exactly where a window ends: where off-by-one bugs live.
advances = st.one_of(st.sampled_from([0, 1, 8, 16, 17, 32, 33, 64, 72, 128]), st.integers(0, 40))
sends = st.builds(Send, advances, st.integers(1, 4), st.sampled_from(ROUTES))
reports = st.one_of(
    st.builds(Report, st.integers(0, 2), st.integers(0, 12), st.none(), st.just(0)),
    st.builds(Report, st.integers(0, 2), st.none(), st.integers(0, 4), st.integers(0, 80)),
)
steps = st.lists(st.one_of(sends, sends, sends, reports), max_size=120)
Granted = list[tuple[float, int, str | None]]


def applies(spec: LimitSpec, route: str | None) -> bool:
    return spec.scope is None or spec.scope == route


def assert_within(spec: LimitSpec, offset: float, granted: Granted, share: int) -> None:
    capacity = max(1, spec.requests // share)
    mine = [(t, w) for t, w, route in granted if applies(spec, route)]
    if spec.fixed:
        windows: dict[float, int] = defaultdict(int)
        for t, w in mine:
            windows[(t + offset) // spec.per] += w
        assert max(windows.values(), default=0) <= capacity, (spec, mine)
        return
    span = spec.per + spec.margin
    for end, _ in mine:  # the fullest intervals (end - span, end] end on a send
        held = sum(w for t, w in mine if end - span < t <= end)
        assert held <= capacity, (spec, end, mine)


@settings(max_examples=300, deadline=None)
@given(
    limits=st.lists(specs, min_size=1, max_size=3),
    offset_ticks=st.integers(0, 200),
    share=st.sampled_from([1, 1, 2]),
    script=steps,
)
def test_granted_sends_never_exceed_any_window_nor_what_the_upstream_said_remains(
    limits: list[LimitSpec], offset_ticks: int, share: int, script: list[Send | Report]
) -> None:
    offset = offset_ticks * TICK
    backend = LocalBackend(limits, epoch_offset=offset, share=share)
    now = T0
    granted: Granted = []
    caps: list[tuple[LimitSpec, int, float, int]] = []  # (limit, first grant after it, until, weight allowed)
    for step in script:
        if isinstance(step, Report):
            reset = step.reset_ticks * TICK
            backend.observe(step.limit, now, used=step.used, remaining=step.remaining, reset=reset)
            if step.remaining is not None and step.limit < len(limits) and reset > 0:
                caps.append((limits[step.limit], len(granted), now + reset, step.remaining // share))
            continue
        now += step.advance * TICK
        verdict = backend.take_now(step.weight, step.route, now)
        if verdict.granted:
            granted.append((now, step.weight, step.route))
        else:
            check_refusal_wait(backend, step.weight, step.route, now, verdict.wait)
    for spec in limits:
        assert_within(spec, offset, granted, share)
    for spec, first, until, allowed in caps:
        after = sum(w for t, w, route in granted[first:] if t < until and applies(spec, route))
        assert after <= allowed, (spec, until, allowed, granted[first:])


def check_refusal_wait(backend: LocalBackend, weight: int, route: str | None, now: float, wait: float) -> None:
    """A refusal's wait is exact: still refused just before it, granted at it (if nothing else is sent)."""
    assert wait > 0
    if math.isinf(wait):
        return
    before = copy.deepcopy(backend).take_now(weight, route, now + wait - TICK / 2)
    assert before.reason is Refusal.RATE_LIMITED, (now, wait)
    assert copy.deepcopy(backend).take_now(weight, route, now + wait).granted, (now, wait)


@settings(max_examples=100, deadline=None)
@given(cool=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 40)), max_size=20))
def test_a_cool_down_ends_at_the_latest_end_asked_for(cool: list[tuple[int, int]]) -> None:
    backend = LocalBackend([LimitSpec(1000, 1.0)])
    now, end = T0, T0
    for advance, seconds in cool:
        now += advance * TICK
        backend.cool_down(seconds * TICK, now)
        end = max(end, now + seconds * TICK)
        verdict = backend.take_now(1, None, now)
        if now < end:
            assert verdict.reason is Refusal.UPSTREAM_COOLDOWN and verdict.wait == end - now
        else:
            assert verdict.granted


@dataclass(frozen=True)
class Caller:
    arrive: int  # tick
    weight: int
    max_wait: int  # ticks
    cancel_after: int | None  # ticks after arriving, if the client hangs up


callers = st.lists(
    st.builds(Caller, st.integers(0, 60), st.integers(1, 3), st.integers(0, 48), st.none() | st.integers(0, 40)),
    max_size=30,
)


@settings(max_examples=150, deadline=None)
@given(crowd=callers)
def test_the_gate_serves_in_arrival_order_within_max_wait_and_hang_ups_spend_nothing(crowd: list[Caller]) -> None:
    asyncio.run(run_crowd(sorted(crowd, key=lambda c: c.arrive)))


async def run_crowd(crowd: list[Caller]) -> None:
    clock = ManualClock(T0)
    spec = LimitSpec(3, 0.25)
    gate = RateGate(LocalBackend([spec]), clock)
    tasks: dict[int, asyncio.Task[Verdict]] = {}
    granted: list[tuple[int, float]] = []  # (caller, when), in the order the gate granted them

    async def call(number: int, caller: Caller) -> Verdict:
        verdict = await gate.acquire(caller.weight, None, caller.max_wait * TICK)
        if verdict.granted:
            granted.append((number, clock.monotonic()))
        return verdict

    for tick in range(200):
        for number, caller in enumerate(crowd):
            if caller.arrive == tick:
                tasks[number] = asyncio.create_task(call(number, caller))
            if caller.cancel_after is not None and caller.arrive + caller.cancel_after == tick:
                tasks[number].cancel()
        for _ in range(12):
            await asyncio.sleep(0)
        clock.advance(TICK)
    assert all(task.done() for task in tasks.values())  # nobody is left waiting past every max_wait

    order = [number for number, _ in granted]
    assert order == sorted(order)  # arrival order (callers are numbered by arrival)
    for number, when in granted:
        caller = crowd[number]
        assert when - (T0 + caller.arrive * TICK) <= caller.max_wait * TICK
        assert not tasks[number].cancelled()
    for task in tasks.values():
        if not task.cancelled() and not task.result().granted:
            assert task.result().wait > 0
    end = clock.monotonic()
    live = sum(crowd[n].weight for n, when in granted if when > end - spec.per)
    assert gate.snapshot(end).limits[0].left == spec.requests - live  # the cancelled spent nothing
    assert gate.waiting == 0 and clock.pending_sleepers == 0
