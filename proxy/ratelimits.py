"""One upstream's outbound rate limit, live: its gate, where it counts, and what its answers teach it.

Built from the policy's ``rate_limit`` by ``UpstreamRuntime``. The data plane asks it for tokens (admission and
each retry, through ``gate``) and hands it every upstream answer (``settle_answer``): a status in
``cooldown_on`` with a ``Retry-After`` pauses the upstream; usage headers (``observe``) correct the count, so
the sidecar slows down before the upstream has to say 429.

Where it counts: this process (``LocalBackend``), or Redis with ``shared`` (``RedisBackend``), every sidecar on
the same key spending one budget; while Redis is unreachable, ``fallback_share`` of the limits locally.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.policy.model import UpstreamPolicy
from proxy.policy.rate_model import RateLimitPolicy
from proxy.resilience.clock import Clock
from proxy.resilience.ratelimit import (
    Backend,
    LocalBackend,
    RateGate,
    RateSnapshot,
    Refusal,
    SharedState,
)
from proxy.resilience.retry import parse_retry_after
from proxy.resilience.usage import UsageHeaders, read_usage

log = logging.getLogger("seawall.ratelimit")


@dataclass(slots=True)
class RateCounts:
    """Plain counters for the metrics: refusals by reason, cool-downs started."""

    refused: dict[str, int] = field(default_factory=dict)
    cooldowns: int = 0

    def refuse(self, reason: Refusal) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


def _usage_headers(policy: RateLimitPolicy) -> UsageHeaders | None:
    observe = policy.observe
    if observe is None:
        return None

    def name(header: str | None) -> bytes | None:
        return header.lower().encode("latin-1") if header else None

    return UsageHeaders(
        used=name(observe.used),
        remaining=name(observe.remaining),
        reset=name(observe.reset),
        limit=observe.limit,
        standard=observe.standard,
    )


class UpstreamRateLimit:
    """The ``rate_limit`` of one upstream: the gate requests wait at, and the cool-down and usage it learns."""

    def __init__(self, upstream: UpstreamPolicy, clock: Clock, backend: Backend | None = None) -> None:
        policy = upstream.rate_limit
        assert policy is not None
        self.policy = policy
        self.name = upstream.name
        self.clock = clock
        specs = upstream.rate_limit_specs()
        self.specs = specs
        epoch_offset = clock.wall() - clock.monotonic()
        if backend is None:
            shared = policy.shared
            if shared is None:
                backend = LocalBackend(specs, epoch_offset=epoch_offset)
            else:
                # Imported only where a budget is shared: Redis' client costs ~10 MB of RSS in every sidecar.
                from proxy.upstream.shared_limit import RedisBackend

                fallback = LocalBackend(specs, epoch_offset=epoch_offset, share=shared.fallback_share)
                backend = RedisBackend(
                    specs,
                    url=shared.redis,
                    key=shared.key,
                    fallback=fallback,
                    clock=clock,
                    timeout=shared.timeout,
                    on_change=self._shared_changed,
                    upstream=upstream.name,
                )
        self.backend = backend
        self.gate = RateGate(backend, clock)
        self.max_wait = policy.max_wait
        self.cooldown_on = frozenset(policy.cooldown_on)
        self.max_cooldown = policy.max_cooldown
        self.usage = _usage_headers(policy)
        self.counts = RateCounts()
        self.shared_state = SharedState.LOCAL if policy.shared is None else SharedState.SHARED
        self.on_shared_change: Callable[[SharedState], None] | None = None

    def _shared_changed(self, state: SharedState) -> None:
        self.shared_state = state
        if self.on_shared_change is not None:
            self.on_shared_change(state)

    def settle_answer(self, status: int, header: Callable[[bytes], bytes | None]) -> bool:
        """An upstream answer arrived: learn from it. True if its status is in ``cooldown_on`` (and, with a
        Retry-After, it paused the upstream): such an answer is delivered as it came, never retried, and is neither
        a success nor a failure to the breaker."""
        usage = self.usage
        if usage is None and status not in self.cooldown_on:
            return False  # the common answer: nothing to learn (no clock read, no header lookups)
        now = self.clock.monotonic()
        if usage is not None:
            for observation in read_usage(usage, header, self.clock.wall()):
                observation.apply(self.backend, now)
        if status not in self.cooldown_on:
            return False
        wait = parse_retry_after(header(b"retry-after"), self.clock.wall())
        if wait is None:
            # No Retry-After: no pause to start (the limits keep pacing), but it is still the upstream's word on
            # its limit — delivered as it came, never retried (a 418 is a ban), no verdict for the breaker.
            return True
        wait = min(wait, self.max_cooldown)
        if wait > 0:
            self.backend.cool_down(wait, now)
            self.counts.cooldowns += 1
            log.warning(
                "upstream %s answered %d: paused for %.3gs (Retry-After)",
                self.name,
                status,
                wait,
                extra={"event": "rate_limit_cooldown", "upstream": self.name, "status": status, "seconds": wait},
            )
        return True

    def snapshot(self) -> RateSnapshot:
        return self.gate.snapshot(self.clock.monotonic())

    def describe(self) -> dict[str, object]:
        """The rate limit as ``/breakers`` and the dashboard show it."""
        snap = self.snapshot()
        return {
            "limits": [
                {
                    "requests": s.spec.requests,
                    "per_seconds": s.spec.per,
                    "window": "fixed" if s.spec.fixed else "sliding",
                    "route": s.spec.scope,
                    "left": s.left,
                }
                for s in snap.limits
            ],
            "waiting": snap.waiting,
            "cooldown_seconds": round(snap.cooldown_left, 3),
            "max_wait_seconds": self.max_wait,
            "counted": snap.shared.value,
            "refused": dict(self.counts.refused),
            "cooldowns": self.counts.cooldowns,
        }

    async def close(self) -> None:
        closer = getattr(self.backend, "close", None)
        if closer is not None:
            await closer()


def limit_label(requests: int, per: float, fixed: bool, scope: str | None) -> str:
    """The ``limit`` label of a limit's metrics: bounded, from the policy file (e.g. ``10/1s``)."""
    label = f"{requests}/{per:g}s{' fixed' if fixed else ''}"
    return f"{scope}:{label}" if scope else label


def retry_after_seconds(wait: float) -> int:
    """Whole seconds for ``Retry-After``, rounded up, at least 1 (``inf``: a request that can never fit)."""
    if math.isinf(wait):
        return 60
    return max(1, math.ceil(wait))
