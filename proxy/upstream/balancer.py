"""Choosing a target: round robin or least outstanding requests, minus targets ejected as outliers.

Outlier ejection follows Envoy's: ``consecutive_failures`` in a row eject a target for
``base_ejection × times ejected`` (capped at ``max_ejection``); every ``interval`` it then stays healthy, the
multiplier decays by one. Unlike Envoy's default, ejection never goes past ``max_ejected_percent`` of the
targets (Envoy ejects at least one host regardless, which with one or two hosts can take them all away): when
every target is failing, the breaker decides, not ejection.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from proxy.policy.model import OutlierPolicy
from proxy.policy.values import Target
from proxy.upstream.pool import TargetPool


@dataclass(slots=True)
class TargetState:
    target: Target
    pool: TargetPool
    outstanding: int = 0
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    ejections: int = 0
    last_decay: float = 0.0
    ejection_reason: str = ""
    total_ejections: int = 0

    def ejected(self, now: float) -> bool:
        return self.ejected_until > now


class Balancer:
    def __init__(
        self, targets: tuple[Target, ...], balance: str, outlier: OutlierPolicy | None, idle_timeout: float
    ) -> None:
        self.states = [TargetState(t, TargetPool(t, idle_timeout)) for t in targets]
        self.balance = balance
        self.outlier = outlier if len(targets) > 1 else None
        self._next = 0
        self._single = self.states[0] if len(self.states) == 1 else None

    def pick(self, now: float, exclude: TargetState | None = None) -> TargetState:
        if self._single is not None:
            return self._single
        candidates = [s for s in self.states if s is not exclude and not s.ejected(now)]
        if not candidates:
            candidates = [s for s in self.states if not s.ejected(now)] or self.states
        if self.balance == "least_request" and len(candidates) > 1:
            first, second = random.sample(candidates, 2)  # power of two choices
            return first if first.outstanding <= second.outstanding else second
        index = self._next % len(candidates)
        self._next += 1
        return candidates[index]

    def report(self, state: TargetState, ok: bool, now: float, kind: str = "") -> str | None:
        """Record an attempt's outcome on its target; returns a reason when this ejects it."""
        outlier = self.outlier
        if outlier is None:
            return None
        if ok:
            state.consecutive_failures = 0
            self._decay(state, now, outlier)
            return None
        if state.ejected(now):
            # A late answer from before the ejection: the target is already out, and its count must start
            # from zero when it comes back.
            return None
        state.consecutive_failures += 1
        if state.consecutive_failures < outlier.consecutive_failures:
            return None
        if self.ejected_count(now) >= self.max_ejected(outlier):
            return None  # at the cap: the target stays in (failures keep counting) and the breaker decides
        self._decay(state, now, outlier)
        state.ejections += 1
        state.total_ejections += 1
        duration = min(outlier.base_ejection * state.ejections, outlier.max_ejection)
        state.ejected_until = now + duration
        state.last_decay = state.ejected_until
        state.consecutive_failures = 0
        state.ejection_reason = f"{outlier.consecutive_failures}_consecutive_{kind or 'failures'}"
        return state.ejection_reason

    def max_ejected(self, outlier: OutlierPolicy) -> int:
        """How many targets may be out at once: the floor of ``max_ejected_percent`` of them."""
        return len(self.states) * outlier.max_ejected_percent // 100

    def ejected_count(self, now: float) -> int:
        return sum(1 for s in self.states if s.ejected(now))

    @staticmethod
    def _decay(state: TargetState, now: float, outlier: OutlierPolicy) -> None:
        if state.ejections and not state.ejected(now):
            steps = int((now - state.last_decay) // outlier.interval)
            if steps > 0:
                state.ejections = max(0, state.ejections - steps)
                state.last_decay += steps * outlier.interval

    def pools(self) -> list[TargetPool]:
        return [s.pool for s in self.states]

    def connection_counts(self) -> tuple[int, int]:
        idle = active = 0
        for state in self.states:
            i, a = state.pool.counts
            idle += i
            active += a
        return idle, active
