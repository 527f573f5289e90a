"""The admission pipeline: the stages every request passes, in one order, before its first attempt.

    bulkhead ──▶ breaker ──▶ rate limit ──▶ attempts
    a slot       rejecting?  tokens (may wait in line)

Each stage is a small object with the same interface: ``try_admit`` answers at once — ``None`` (go on), a
``Refusal`` (answer it), or ``WAIT`` (call ``admit``, which may wait on the clock); ``release`` gives back what
the stage holds once the exchange ends (only for stages the request passed). Adding a stage is adding one object.

Why the rate limit comes after the breaker: spending tokens cannot be undone (the upstream, or every sidecar on
a shared key, counts them), so the one irreversible stage goes last, and a request the open breaker refuses
spends nothing of the upstream's budget. The breaker stage only peeks (``rejecting``); the attempt loop takes
the permit, so a half-open breaker's probe slots are held by attempts, not by waiting requests.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Final, Protocol

from proxy.http.answers import OwnAnswer
from proxy.ratelimits import retry_after_seconds
from proxy.resilience.ratelimit import Refusal as RateRefusal

if TYPE_CHECKING:
    from proxy.runtime import Route, UpstreamRuntime


class _Wait(enum.Enum):
    WAIT = "wait"


WAIT: Final = _Wait.WAIT


# A refusal is an answer of the sidecar's own (``proxy.http.answers``); its ``decision`` is the reason part of
# x-sidecar-decision (the exchange prefixes the upstream and route) and it counts as a rejection under its reason.
Refusal = OwnAnswer

BREAKER_OPEN: Final = Refusal(503, "breaker_open", "circuit breaker is open", "breaker_open", rejected="breaker_open")


class Ticket(Protocol):
    """What a stage reads of the request it admits (the ``Exchange``)."""

    rt: UpstreamRuntime
    route: Route
    passed: int  # stages passed so far: the ones to release


class Stage(Protocol):
    def try_admit(self, ticket: Ticket) -> Refusal | _Wait | None: ...

    async def admit(self, ticket: Ticket) -> Refusal | None: ...

    def release(self, ticket: Ticket) -> None: ...


class BulkheadStage:
    """At most ``max_concurrent`` in flight; up to ``max_pending`` wait ``pending_timeout`` for a slot."""

    def try_admit(self, ticket: Ticket) -> Refusal | _Wait | None:
        return None if ticket.rt.bulkhead.try_enter() else WAIT

    async def admit(self, ticket: Ticket) -> Refusal | None:
        if await ticket.rt.bulkhead.enter():
            return None
        limit = ticket.rt.policy.limits.max_concurrent
        return Refusal(
            503,
            "overload",
            "too many requests in flight to this upstream",
            f"overload max_concurrent={limit}",
            rejected="overload",
        )

    def release(self, ticket: Ticket) -> None:
        ticket.rt.bulkhead.leave()


class BreakerStage:
    """An open, enforced breaker refuses at once (its answer: ``Retry-After``, the fallback if configured)."""

    def try_admit(self, ticket: Ticket) -> Refusal | _Wait | None:
        rt = ticket.rt
        if rt.enforce and rt.breaker.rejecting(rt.clock.monotonic()):
            return BREAKER_OPEN
        return None

    async def admit(self, ticket: Ticket) -> Refusal | None:
        verdict = self.try_admit(ticket)
        assert verdict is not WAIT
        return verdict

    def release(self, ticket: Ticket) -> None:
        pass  # the attempt loop holds and settles the permits


def rate_refusal(reason: RateRefusal, wait: float, max_wait: float) -> Refusal:
    """The 429 of a request that cannot get its tokens in time: ``rate_limited`` or ``upstream_cooldown``."""
    seconds = retry_after_seconds(wait)
    if reason is RateRefusal.UPSTREAM_COOLDOWN:
        detail = f"the upstream asked for a pause (Retry-After); {wait:.3g}s left"
    else:
        detail = f"outbound rate limit reached; tokens in {wait:.3g}s, longer than max_wait {max_wait:g}s"
    return Refusal(429, reason.value, detail, f"{reason.value} retry_in={seconds}s", seconds, reason.value)


class RateLimitStage:
    """Tokens for the first attempt (retries take their own in the attempt loop): at once, or after waiting in
    line up to ``max_wait``; else 429. A route's ``weight`` is its cost; its own limits count it too."""

    def try_admit(self, ticket: Ticket) -> Refusal | _Wait | None:
        limiter = ticket.rt.rate
        if limiter is None:
            return None
        route = ticket.route
        max_wait = route.rate_max_wait if route.rate_max_wait is not None else limiter.max_wait
        verdict = limiter.gate.try_acquire(route.weight, route.name, max_wait)
        if verdict is None:
            return WAIT  # in line behind others, or the tokens come within max_wait, or Redis must answer
        if verdict.reason is None:
            return None
        limiter.counts.refuse(verdict.reason)
        return rate_refusal(verdict.reason, verdict.wait, max_wait)

    async def admit(self, ticket: Ticket) -> Refusal | None:
        limiter = ticket.rt.rate
        assert limiter is not None
        route = ticket.route
        max_wait = route.rate_max_wait if route.rate_max_wait is not None else limiter.max_wait
        verdict = await limiter.gate.acquire(route.weight, route.name, max_wait)
        if verdict.reason is None:
            return None
        limiter.counts.refuse(verdict.reason)
        return rate_refusal(verdict.reason, verdict.wait, max_wait)

    def release(self, ticket: Ticket) -> None:
        pass  # tokens spent are spent: the request was sent


class Pipeline:
    """The stages in their one order. The ticket's ``passed`` counts the stages to release, so an exchange
    cancelled while it waits in a stage's line releases exactly what it holds."""

    __slots__ = ("stages",)

    def __init__(self, *stages: Stage) -> None:
        self.stages = stages

    def try_admit(self, ticket: Ticket) -> Refusal | _Wait | None:
        """Every stage that can answer at once, from the first one not yet passed: None (admitted), a refusal,
        or WAIT (a stage must wait: ``admit`` goes on from it). The common case creates no coroutine."""
        stages = self.stages
        while ticket.passed < len(stages):
            verdict = stages[ticket.passed].try_admit(ticket)
            if verdict is not None:
                return verdict
            ticket.passed += 1
        return None

    async def admit(self, ticket: Ticket) -> Refusal | None:
        """After ``try_admit`` said WAIT: wait in that stage, then go on through the rest (waiting where another
        must), to the end or a refusal."""
        while True:
            verdict = await self.stages[ticket.passed].admit(ticket)
            if verdict is not None:
                return verdict
            ticket.passed += 1
            after = self.try_admit(ticket)
            if after is not WAIT:
                return after

    def release(self, ticket: Ticket) -> None:
        passed, ticket.passed = ticket.passed, 0
        for stage in reversed(self.stages[:passed]):
            stage.release(ticket)


PIPELINE: Final = Pipeline(BulkheadStage(), BreakerStage(), RateLimitStage())
