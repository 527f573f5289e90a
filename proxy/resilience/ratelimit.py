"""Outbound rate limits: never send an upstream more than it allows, counted as it counts.

The vocabulary shared by the local counter (this module), the Redis-shared one (``proxy.upstream.shared_limit``)
and the data plane's admission stage::

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

import enum
from dataclasses import dataclass
from typing import Protocol


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
        self, limit: int, now: float, *, used: int | None = None, remaining: int | None = None, reset: float | None = None
    ) -> None:
        """What the upstream reported about limit number ``limit`` after an answer: ``used`` weight in its current
        window, or ``remaining`` weight until ``reset`` seconds from now. The count only ever grows from it: the
        sidecar slows down when someone else spends the same budget, and never speeds up past its own limits."""
        ...

    def snapshot(self, now: float) -> RateSnapshot: ...
