"""Outlier detection, pure: which targets to take out of rotation for a while, and for how long.

It follows Envoy's consecutive-failures detector: ``consecutive_failures`` failed attempts in a row on one
target eject it for ``base_ejection × times ejected`` (capped at ``max_ejection``); every ``interval`` it then
stays in, the multiplier decays by one. Unlike Envoy's default, ejection never goes past
``max_ejected_percent`` of the targets (Envoy ejects at least one host regardless, which with one or two hosts
can take them all away): when every target is failing, the breaker decides, not ejection.

Time is injected (every call takes ``now``); nothing here is random, reads a clock or does I/O. The detector
keeps its per-target counts on an ``EjectionRecord`` each target carries (the balancer's ``TargetState`` is
one), so the admin plane reads them where they always were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class OutlierSettings(Protocol):
    """The detector's knobs (the policy's ``OutlierPolicy`` is one)."""

    @property
    def consecutive_failures(self) -> int: ...
    @property
    def interval(self) -> float: ...
    @property
    def base_ejection(self) -> float: ...
    @property
    def max_ejection(self) -> float: ...
    @property
    def max_ejected_percent(self) -> int: ...


@dataclass(slots=True, kw_only=True)
class EjectionRecord:
    """One target's standing with the detector."""

    consecutive_failures: int = 0
    ejected_until: float = 0.0
    ejections: int = 0  # the multiplier: ejections not yet decayed away
    last_decay: float = 0.0
    ejection_reason: str = ""
    total_ejections: int = 0

    def ejected(self, now: float) -> bool:
        return self.ejected_until > now


def max_ejected(targets: int, max_ejected_percent: int) -> int:
    """How many of ``targets`` may be out at once: the floor of ``max_ejected_percent`` of them."""
    return targets * max_ejected_percent // 100


class OutlierDetector:
    def __init__(self, settings: OutlierSettings, records: Sequence[EjectionRecord]) -> None:
        self.settings = settings
        self.records = records

    def max_ejected(self) -> int:
        return max_ejected(len(self.records), self.settings.max_ejected_percent)

    def ejected_count(self, now: float) -> int:
        return sum(1 for record in self.records if record.ejected(now))

    def report(self, record: EjectionRecord, ok: bool, now: float, kind: str = "") -> str | None:
        """Record an attempt's outcome on its target; returns a reason when this ejects it."""
        settings = self.settings
        if ok:
            record.consecutive_failures = 0
            self._decay(record, now)
            return None
        if record.ejected(now):
            # A late answer from before the ejection: the target is already out, and its count must start
            # from zero when it comes back.
            return None
        record.consecutive_failures += 1
        if record.consecutive_failures < settings.consecutive_failures:
            return None
        if self.ejected_count(now) >= self.max_ejected():
            return None  # at the cap: the target stays in (failures keep counting) and the breaker decides
        self._decay(record, now)
        record.ejections += 1
        record.total_ejections += 1
        duration = min(settings.base_ejection * record.ejections, settings.max_ejection)
        record.ejected_until = now + duration
        record.last_decay = record.ejected_until
        record.consecutive_failures = 0
        record.ejection_reason = f"{settings.consecutive_failures}_consecutive_{kind or 'failures'}"
        return record.ejection_reason

    def _decay(self, record: EjectionRecord, now: float) -> None:
        if record.ejections and not record.ejected(now):
            interval = self.settings.interval
            steps = int((now - record.last_decay) // interval)
            if steps > 0:
                record.ejections = max(0, record.ejections - steps)
                record.last_decay += steps * interval
