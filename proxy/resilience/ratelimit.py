"""Outbound rate limits: never send an upstream more than it allows, counted as it counts.

The vocabulary shared by the local counter (this module), the Redis-shared one (``proxy.upstream.shared_limit``)
and the data plane's admission stage::

    RateGate.try_acquire(weight, route, max_wait)   the hot path: no await
        nobody in line and the backend answers at once ── granted, or refused for longer than max_wait: that
        otherwise ── None: await acquire
    RateGate.acquire(weight, route, max_wait)
        somebody already waiting? ── join the FIFO line behind them
        backend.take(weight, route, now) ── Verdict(wait=0)  → spent on every limit: send
                                         ── Verdict(wait=w)  → w ≤ what is left of max_wait: sleep w, take again
                                                             → else refused: 429 with Retry-After ⌈w⌉
        a caller that goes away leaves the line and spends nothing

Limits (``LimitSpec``): ``requests`` weighted sends per ``per`` seconds, each either *sliding* (no interval of
length ``per`` ever holds more than ``requests``; a token bucket does not promise that) or *fixed* (calendar
windows aligned to the epoch, as Binance counts). A limit with a ``scope`` counts only the requests of that
route; one without counts every request of the upstream. A request must fit every limit that applies to it,
and is spent on all of them at once or on none.

A cool-down (an upstream's 429/418 with Retry-After) pauses the whole upstream: ``take`` answers
``upstream_cooldown`` with the time left until it ends.

Times are seconds on the injected clock's ``monotonic``; fixed windows are aligned with ``epoch_offset`` (wall
time minus monotonic, taken once), so tests can stand on a window's edge with a ``ManualClock``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from proxy.resilience.clock import Clock


class Refusal(enum.StrEnum):
    """Why a request may not go yet: also its ``x-sidecar-reason`` and its ``sidecar_rate_limited_total`` label."""

    RATE_LIMITED = "rate_limited"  # a limit of ours has no room for it
    UPSTREAM_COOLDOWN = "upstream_cooldown"  # the upstream said to wait (429/418 + Retry-After)


@dataclass(frozen=True, slots=True)
class LimitSpec:
    requests: int  # weighted sends allowed in one window
    per: float  # the window, in seconds
    fixed: bool = False  # True: calendar windows aligned to the epoch; False: sliding
    scope: str | None = None  # a route's name: only that route's requests count here; None: every request
    margin: float = 0.0  # sliding: a send counts for per + margin, so jitter on the way cannot put two sends
    # that left ``per`` apart into one of the upstream's windows


@dataclass(frozen=True, slots=True)
class Verdict:
    wait: float  # 0.0: granted, the weight is spent; else seconds until it could be granted (inf: never)
    reason: Refusal | None = None  # None exactly when granted

    @property
    def granted(self) -> bool:
        return self.reason is None


GRANTED = Verdict(0.0)


@dataclass(frozen=True, slots=True)
class LimitState:
    """One limit as reports show it."""

    spec: LimitSpec
    left: int  # weight that could be sent now without waiting


class SharedState(enum.StrEnum):
    LOCAL = "local"  # counted in this process only
    SHARED = "shared"  # counted in Redis, together with every sidecar on the same key
    FALLBACK = "fallback"  # Redis unreachable: a local share of the limits (``fallback_share``)


@dataclass(frozen=True, slots=True)
class RateSnapshot:
    limits: tuple[LimitState, ...]
    cooldown_left: float  # seconds until a cool-down ends; 0 when none
    waiting: int  # requests in the line
    shared: SharedState


class Backend(Protocol):
    """Where the windows and the cool-down are counted: this process, or Redis."""

    def take_now(self, weight: int, route: str | None, now: float) -> Verdict | None:
        """Spend ``weight`` on every limit that applies if all have room, else say how long until they would.
        None: this backend cannot answer without I/O; call ``take``."""
        ...

    async def take(self, weight: int, route: str | None, now: float) -> Verdict:
        """As ``take_now``, allowed to do I/O (never for longer than a few milliseconds)."""
        ...

    def cool_down(self, seconds: float, now: float) -> None:
        """Pause the upstream until ``now + seconds`` (or later, if a cool-down already runs past that)."""
        ...

    def observe(
        self,
        limit: int,
        now: float,
        *,
        used: int | None = None,
        remaining: int | None = None,
        reset: float | None = None,
    ) -> None:
        """What the upstream reported about limit number ``limit`` after an answer: ``used`` weight in its current
        window, or ``remaining`` weight until ``reset`` seconds from now. The count only ever grows from it: the
        sidecar slows down when someone else spends the same budget, and never speeds up past its own limits."""
        ...

    def snapshot(self, now: float) -> RateSnapshot: ...


# ---------------------------------------------------------------------------------------------------------------
# The local counter: exact windows in this process (and the fallback of the Redis-shared one).

MIN_WAIT = 1e-9  # the least wait a refusal says: 0 means granted
SLIDING_GRAIN = 1e-3  # sends closer than this (and than per / 1000) share one log entry
MAX_CAPS = 8  # ``remaining``/``reset`` caps kept per limit; more are merged into a stricter one


class _Limit:
    """What the two kinds of window share: the spec, the room after ``share``, and the caps from ``observe``."""

    __slots__ = ("capacity", "caps", "spec")

    def __init__(self, spec: LimitSpec, share: int) -> None:
        self.spec = spec
        self.capacity = max(1, spec.requests // share)
        # [until, left]: the upstream allows at most ``left`` more until ``until``; sorted by ``until`` with ``left``
        # growing along it (a cap that is both shorter and looser than another says nothing and is dropped).
        self.caps: list[list[float]] = []

    def used(self, now: float) -> int:
        """Weight counted in the window that holds ``now``."""
        raise NotImplementedError

    def room_wait(self, weight: int, now: float) -> float:
        """Seconds until the window has room for ``weight`` ≤ capacity; called right after ``used(now)``."""
        raise NotImplementedError

    def count(self, weight: int, now: float) -> None:
        raise NotImplementedError

    def add_used(self, amount: int, now: float) -> None:
        """Phantom usage: ``amount`` spent by someone else, counted as if sent at ``now``."""
        raise NotImplementedError

    def fits(self, weight: int, now: float) -> bool:
        """The hot path's one question: does ``weight`` fit now, with no cap to consult? (False: ask ``wait``.)"""
        raise NotImplementedError

    def credit(self, now: float) -> tuple[int, float]:
        """Right after ``fits(…, now)``: weight that may be sent without asking again, and until when. The room
        only grows as time passes (sends expire) until the horizon (a fixed window's end, or ``grain`` for a
        sliding log, whose sends in between then share one entry)."""
        raise NotImplementedError

    def wait(self, weight: int, now: float) -> float:
        """Seconds until ``weight`` fits this limit (0: now; ``inf``: never)."""
        if self.used(now) + weight <= self.capacity and not self.caps:
            return 0.0
        if weight > self.capacity:
            return math.inf
        wait = self.room_wait(weight, now)
        caps = self.caps
        if caps:
            while caps and caps[0][0] <= now:
                del caps[0]
            for until, left in caps:
                if weight > left and until - now > wait:
                    wait = until - now
        return wait

    def spend(self, weight: int, now: float) -> None:
        self.count(weight, now)
        for cap in self.caps:
            cap[1] -= weight

    def left(self, now: float) -> int:
        left = self.capacity - self.used(now)
        for until, cap_left in self.caps:
            if until > now:
                left = min(left, int(cap_left))
        return max(0, left)

    def cap(self, remaining: int, until: float) -> None:
        """At most ``remaining`` more until ``until``, on top of every cap already known (each one is true)."""
        caps = self.caps
        if any(u >= until and left <= remaining for u, left in caps):
            return  # an existing cap already says as much
        caps[:] = [c for c in caps if not (c[0] <= until and c[1] >= remaining)]
        caps.append([until, remaining])
        caps.sort()
        if len(caps) > MAX_CAPS:
            # Merge the two soonest into one stricter than both: the smaller left, the later end.
            first = caps.pop(0)
            caps[0][1] = min(first[1], caps[0][1])


class _Sliding(_Limit):
    """A log of sends by expiry: a send at ``t`` counts in every interval (t' - per - margin, t'] with t' < expiry.

    Sends less than ``grain`` apart share one entry that expires with the latest of them: the earlier ones count a
    little longer than they must (the safe side), and the log stays within per / grain entries however fast the
    sends come. Two parallel deques of floats and ints, so a send allocates no tuple for the collector to track.
    The log's total is kept as sends come and go, and never exceeds ``capacity``."""

    __slots__ = ("expiries", "grain", "span", "total", "weights")

    def __init__(self, spec: LimitSpec, share: int) -> None:
        super().__init__(spec, share)
        self.span = spec.per + spec.margin
        self.grain = min(SLIDING_GRAIN, spec.per / 1000)
        self.expiries: deque[float] = deque()
        self.weights: deque[int] = deque()
        self.total = 0

    def used(self, now: float) -> int:
        expiries = self.expiries
        while expiries and expiries[0] <= now:
            expiries.popleft()
            self.total -= self.weights.popleft()
        return self.total

    def fits(self, weight: int, now: float) -> bool:
        expiries = self.expiries
        if expiries and expiries[0] <= now:
            self.used(now)
        return self.total + weight <= self.capacity and not self.caps

    def credit(self, now: float) -> tuple[int, float]:
        return self.capacity - self.total, now + self.grain

    def room_wait(self, weight: int, now: float) -> float:
        excess = self.total + weight - self.capacity
        if excess <= 0:
            return 0.0
        # The earliest moment enough of the oldest sends have expired (``excess`` ≤ total, as weight ≤ capacity).
        for expiry, sent in zip(self.expiries, self.weights, strict=True):
            excess -= sent
            if excess <= 0:
                return expiry - now
        return math.inf  # unreachable while weight <= capacity

    def count(self, weight: int, now: float) -> None:
        expiry = now + self.span
        expiries = self.expiries
        if expiries and expiry - expiries[-1] <= self.grain:
            expiries[-1] = expiry
            self.weights[-1] += weight
        else:
            expiries.append(expiry)
            self.weights.append(weight)
        self.total += weight

    def add_used(self, amount: int, now: float) -> None:
        if self.used(now) + amount < self.capacity:
            self.count(amount, now)
        else:
            # Full until now + span: one full entry at ``now`` counts at least as much as the old log plus
            # ``amount`` at every later moment, and keeps the log within ``capacity``.
            self.expiries.clear()
            self.weights.clear()
            self.total = 0
            self.count(self.capacity, now)


class _Fixed(_Limit):
    """Calendar windows of ``per`` seconds: window number floor((now + epoch_offset) / per)."""

    __slots__ = ("counted", "offset", "per", "window")

    def __init__(self, spec: LimitSpec, share: int, epoch_offset: float) -> None:
        super().__init__(spec, share)
        self.per = spec.per
        self.offset = epoch_offset
        self.window = -math.inf
        self.counted = 0

    def used(self, now: float) -> int:
        window = (now + self.offset) // self.per
        if window != self.window:  # a new calendar window: nothing counted in it yet
            self.window = window
            self.counted = 0
        return self.counted

    def fits(self, weight: int, now: float) -> bool:
        window = (now + self.offset) // self.per
        if window != self.window:
            self.window = window
            self.counted = 0
        return self.counted + weight <= self.capacity and not self.caps

    def credit(self, now: float) -> tuple[int, float]:
        return self.capacity - self.counted, (self.window + 1) * self.per - self.offset

    def room_wait(self, weight: int, now: float) -> float:
        if self.counted + weight <= self.capacity:
            return 0.0
        edge = (self.window + 1) * self.per - self.offset
        return max(edge - now, MIN_WAIT)  # rounding must never turn "not yet" into a wait of 0 (granted)

    def count(self, weight: int, now: float) -> None:
        self.counted += weight  # ``used(now)`` rolled the window, just before in ``wait``

    def add_used(self, amount: int, now: float) -> None:
        self.counted = self.used(now) + amount


class LocalBackend:
    """Every limit counted exactly in this process; answers at once, never needs I/O.

    ``share`` divides every limit's ``requests`` (floor, at least 1): the fallback share of a budget that is
    normally counted in Redis together with other sidecars. ``epoch_offset`` is wall time minus the clock's
    monotonic time, so fixed windows fall on the calendar. ``now`` never goes backwards from call to call."""

    def __init__(self, specs: Sequence[LimitSpec], epoch_offset: float = 0.0, share: int = 1) -> None:
        if share < 1:
            raise ValueError("share must be at least 1")
        self.specs = tuple(specs)
        self.share = share
        self._limits: tuple[_Limit, ...] = tuple(
            _Fixed(spec, share, epoch_offset) if spec.fixed else _Sliding(spec, share) for spec in self.specs
        )
        self._cooldown_until = -math.inf
        # The limits that apply to each route: every unscoped one, plus those scoped to it.
        self._everyone = tuple(limit for limit in self._limits if limit.spec.scope is None)
        self._by_route = {
            limit.spec.scope: tuple(lim for lim in self._limits if lim.spec.scope in (None, limit.spec.scope))
            for limit in self._limits
            if limit.spec.scope is not None
        }
        # The hot path's credit: weight every unscoped limit had room for when last asked, valid until
        # ``_credit_until``; requests it grants are owed to the limits (``_owed``, the latest at ``_owed_at``) and
        # counted there at once on the next full take, ``observe`` or ``snapshot``.
        self._credit = 0
        self._credit_until = -math.inf
        self._owed = 0
        self._owed_at = 0.0

    def take_now(self, weight: int, route: str | None, now: float) -> Verdict:
        if weight <= self._credit and now < self._credit_until and route not in self._by_route:
            self._credit -= weight  # room known to be there: no limit needs asking (see credit())
            self._owed += weight
            self._owed_at = now
            return GRANTED
        self._settle_owed()
        if now < self._cooldown_until:
            return Verdict(self._cooldown_until - now, Refusal.UPSTREAM_COOLDOWN)
        limits = self._by_route.get(route, self._everyone) if route is not None else self._everyone
        for limit in limits:
            if not limit.fits(weight, now):
                return self._take_slowly(limits, weight, now)
        for limit in limits:
            limit.count(weight, now)  # no caps to spend on: ``fits`` said so
        if limits is self._everyone:
            self._extend_credit(now)
        return GRANTED

    def _extend_credit(self, now: float) -> None:
        """After a full take that every limit (none capped) had room for: what the next ones may take unasked.

        Owed sends are counted as one, sent at the latest of them: within a sliding log's grain, that is what
        ``count`` would have merged them into anyway; within a fixed window, the window they were sent in."""
        credit, until = math.inf, self._cooldown_until if self._cooldown_until > now else math.inf
        for limit in self._everyone:
            room, horizon = limit.credit(now)
            credit, until = min(credit, room), min(until, horizon)
        self._credit, self._credit_until = (0, -math.inf) if math.isinf(credit) else (int(credit), until)

    def _settle_owed(self) -> None:
        owed, self._owed = self._owed, 0
        self._credit, self._credit_until = 0, -math.inf
        if owed:
            for limit in self._everyone:
                limit.count(owed, self._owed_at)

    @staticmethod
    def _take_slowly(limits: tuple[_Limit, ...], weight: int, now: float) -> Verdict:
        """A limit is full or capped: the longest wait of them all, or spend on every one (caps included)."""
        wait = max(limit.wait(weight, now) for limit in limits)
        if wait > 0.0:
            return Verdict(wait, Refusal.RATE_LIMITED)
        for limit in limits:
            limit.spend(weight, now)
        return GRANTED

    async def take(self, weight: int, route: str | None, now: float) -> Verdict:
        return self.take_now(weight, route, now)

    def cool_down(self, seconds: float, now: float) -> None:
        self._settle_owed()
        self._cooldown_until = max(self._cooldown_until, now + seconds)

    def observe(
        self,
        limit: int,
        now: float,
        *,
        used: int | None = None,
        remaining: int | None = None,
        reset: float | None = None,
    ) -> None:
        """Corrections from the upstream's usage headers; they only ever slow the sidecar down.

        - ``used`` U above what this limit counted in its current window (sliding: the live log): the difference is
          added as phantom usage at ``now`` (sliding) or in the current window (fixed).
        - ``remaining`` R with ``reset`` T > 0: a cap — at most R (divided by ``share``) more weight on this limit
          until ``now + T``, on top of the window; R = 0 means wait until then (``rate_limited``). Caps are kept
          side by side (each is something the upstream said), so a new window's report never loosens an old one.
        - ``remaining`` without ``reset``: read as ``used = requests - R`` of this limit's own window.
        ``used`` is taken as reported, also under a ``share``: the whole budget's use then fills this share
        sooner, which is the safe side. A report arrives after sends still on their way were made, so a cap can
        be a little loose for them; the next reports (and the limits themselves) correct it.
        Anything out of range (no such limit, negative numbers) is ignored."""
        if not 0 <= limit < len(self._limits):
            return
        self._settle_owed()  # (and no credit: what the upstream said must be weighed by the next take)
        target = self._limits[limit]
        if remaining is not None and remaining >= 0:
            if reset is None:
                used = max(used or 0, target.spec.requests - remaining)
            elif reset > 0:
                target.cap(remaining // self.share, now + reset)
        if used is not None:
            extra = used - target.used(now)
            if extra > 0:
                target.add_used(extra, now)

    def snapshot(self, now: float) -> RateSnapshot:
        """Each limit as configured, with the weight it has ``left`` now (after ``share`` and the caps)."""
        self._settle_owed()
        return RateSnapshot(
            limits=tuple(LimitState(limit.spec, limit.left(now)) for limit in self._limits),
            cooldown_left=max(0.0, self._cooldown_until - now),
            waiting=0,
            shared=SharedState.LOCAL,
        )


# ---------------------------------------------------------------------------------------------------------------
# The gate: the admission stage's front, a FIFO line in front of a backend.


class RateGate:
    """Admits requests through ``backend`` in arrival order, waiting up to ``max_wait`` for their tokens.

    Only the first caller in line takes from the backend (sleeping on the clock until its tokens could be there);
    the others wait for their turn, so a newcomer never jumps a waiter, and a light request cannot starve a
    heavy one by taking the room it is waiting for. A caller that leaves the line (refused, granted, cancelled)
    hands the turn to the next. Like the bulkhead, one gate per upstream kept across reloads."""

    def __init__(self, backend: Backend, clock: Clock) -> None:
        self.backend = backend
        self.clock = clock
        self._line: deque[asyncio.Future[None]] = deque()
        # When the first in line takes again, and why it waits: a hint for callers refused behind it.
        self._retry_at = -math.inf
        self._retry_reason = Refusal.RATE_LIMITED

    @property
    def waiting(self) -> int:
        return len(self._line)

    def try_acquire(self, weight: int, route: str | None, max_wait: float = 0.0) -> Verdict | None:
        """The hot path: the backend's answer if it is final, else None: then await ``acquire``.

        Final: granted, or refused with a wait longer than ``max_wait``. None when somebody waits in line, when
        the backend needs I/O to answer, or when the caller may wait for its tokens."""
        if self._line:
            return None
        verdict = self.backend.take_now(weight, route, self.clock.monotonic())
        if verdict is None or verdict.reason is None or verdict.wait > max_wait:
            return verdict
        return None  # refused, but the caller would wait that long: in line

    async def acquire(self, weight: int, route: str | None, max_wait: float) -> Verdict:
        """Granted (the weight is spent), or refused with the time until it could go (for ``Retry-After``)."""
        now = self.clock.monotonic()
        first: Verdict | None = None
        if not self._line:
            first = await self._take(weight, route, now)
            if first.granted or first.wait > max_wait:
                return first
        deadline = now + max_wait
        if self._retry_at > deadline:  # the first in line goes later than this caller would wait: no use queueing
            return Verdict(self._retry_at - now, self._retry_reason)
        return await self._wait_in_line(weight, route, deadline, first)

    async def _wait_in_line(self, weight: int, route: str | None, deadline: float, first: Verdict | None) -> Verdict:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._line.append(turn)
        if self._line[0] is turn:
            turn.set_result(None)
        else:
            first = None  # someone came first: the earlier answer is stale by the time it is our turn
        try:
            if not await self._my_turn(turn, deadline):
                now = self.clock.monotonic()
                return Verdict(max(self._retry_at - now, MIN_WAIT), self._retry_reason)
            verdict = first
            while True:
                now = self.clock.monotonic()
                if verdict is None:
                    verdict = await self._take(weight, route, now)
                if verdict.granted or verdict.wait > deadline - now:
                    return verdict
                self._retry_at, self._retry_reason = now + verdict.wait, verdict.reason or Refusal.RATE_LIMITED
                await self.clock.sleep(verdict.wait)
                verdict = None
        finally:
            self._leave(turn)

    async def _my_turn(self, turn: asyncio.Future[None], deadline: float) -> bool:
        """Wait until ``turn`` is handed over, at most until ``deadline``; False: time ran out first."""
        if turn.done():
            return True
        timeout = deadline - self.clock.monotonic()
        if timeout <= 0:
            return False
        timer = asyncio.get_running_loop().create_task(self.clock.sleep(timeout))
        try:
            await asyncio.wait((turn, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
        return turn.done()  # handed over, possibly just as time ran out: take it

    async def _take(self, weight: int, route: str | None, now: float) -> Verdict:
        verdict = self.backend.take_now(weight, route, now)
        return verdict if verdict is not None else await self.backend.take(weight, route, now)

    def _leave(self, turn: asyncio.Future[None]) -> None:
        line = self._line
        if line[0] is turn:
            line.popleft()
            self._retry_at = -math.inf
            if line:
                line[0].set_result(None)  # the next one's turn
        else:
            line.remove(turn)

    def snapshot(self, now: float) -> RateSnapshot:
        return dataclasses.replace(self.backend.snapshot(now), waiting=len(self._line))
