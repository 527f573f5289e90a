"""Choosing a target: round robin or least outstanding requests, minus targets ejected as outliers.

Which targets are out, and for how long, is ``proxy.resilience.outlier``'s decision (Envoy-style consecutive
failures, with ejection times that grow with repeats and never more than ``max_ejected_percent`` of the targets
out); the balancer only skips them. ``least_request`` is the power of two choices: two candidates drawn from an
injected ``random.Random``, the less busy one wins.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from proxy.policy.model import OutlierPolicy
from proxy.policy.values import Target
from proxy.resilience.clock import Clock
from proxy.resilience.outlier import EjectionRecord, OutlierDetector, max_ejected
from proxy.upstream.h2pool import H2Pool
from proxy.upstream.pool import DEFAULT_MAX_HEAD_BYTES, TargetPool
from proxy.upstream.tls import ClientContext


@dataclass(slots=True)
class TargetState(EjectionRecord):
    """One target: its pool, the requests outstanding on it, and (inherited) its standing as an outlier."""

    target: Target
    pool: TargetPool
    outstanding: int = 0
    h2: H2Pool = None  # type: ignore[assignment]  # protocol: grpc: its multiplexed HTTP/2 connections (runtime)
    authority: bytes = field(init=False)  # the Host header value for this target, encoded once

    def __post_init__(self) -> None:
        self.authority = self.target.authority.encode()


class Balancer:
    def __init__(
        self,
        targets: tuple[Target, ...],
        balance: str,
        outlier: OutlierPolicy | None,
        idle_timeout: float,
        rng: random.Random | None = None,
        max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
        tls: ClientContext | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.states = [
            TargetState(t, TargetPool(t, idle_timeout, max_head_bytes, tls if t.is_tls else None, clock))
            for t in targets
        ]
        self.balance = balance
        self.outlier = outlier if len(targets) > 1 else None
        self.detector = OutlierDetector(self.outlier, self.states) if self.outlier is not None else None
        self._rng = rng if rng is not None else random.Random()
        self._next = 0
        self._single = self.states[0] if len(self.states) == 1 else None

    def pick(self, now: float, exclude: TargetState | None = None) -> TargetState:
        if self._single is not None:
            return self._single
        candidates = [s for s in self.states if s is not exclude and not s.ejected(now)]
        if not candidates:
            candidates = [s for s in self.states if not s.ejected(now)] or self.states
        if self.balance == "least_request" and len(candidates) > 1:
            first, second = self._rng.sample(candidates, 2)  # power of two choices
            return first if first.outstanding <= second.outstanding else second
        index = self._next % len(candidates)
        self._next += 1
        return candidates[index]

    def report(self, state: TargetState, ok: bool, now: float, kind: str = "") -> str | None:
        """Record an attempt's outcome on its target; returns a reason when this ejects it."""
        if self.detector is None:
            return None
        return self.detector.report(state, ok, now, kind)

    def max_ejected(self, outlier: OutlierPolicy) -> int:
        """How many targets may be out at once: the floor of ``max_ejected_percent`` of them."""
        return max_ejected(len(self.states), outlier.max_ejected_percent)

    def ejected_count(self, now: float) -> int:
        return sum(1 for s in self.states if s.ejected(now))

    def set_tls(self, tls: ClientContext | None) -> None:
        """The context the https targets' new connections use from now on (after a reload)."""
        for state in self.states:
            if state.target.is_tls:
                state.pool.set_tls(tls)

    def pools(self) -> list[TargetPool]:
        return [s.pool for s in self.states]

    def connection_counts(self) -> tuple[int, int]:
        idle = active = 0
        for state in self.states:
            i, a = state.pool.counts
            idle += i
            active += a
        return idle, active
