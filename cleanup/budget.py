"""When a pass gives up: after too many failed runs in a row, or once its time is up.

A tracking server that goes away mid-pass makes every remaining run fail, each only after MLflow's client
has retried (see :mod:`cleanup.client_retries`). Without a bound that is hours of failures and no report;
with it the pass stops, writes its report (the remaining runs "pending") and exits non-zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_MAX_CONSECUTIVE_FAILURES = 3


@dataclass(slots=True)
class FailureBudget:
    max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES  # 0: never stop for failures
    max_seconds: float | None = None  # of the whole pass, planning included
    clock: Callable[[], float] = time.monotonic
    _started: float = field(default=0.0, init=False)
    _consecutive: int = field(default=0, init=False)

    def start(self) -> None:
        self._started = self.clock()
        self._consecutive = 0

    def record(self, failed: bool) -> None:
        self._consecutive = self._consecutive + 1 if failed else 0

    def exhausted(self) -> str | None:
        """Why the pass must stop now, or ``None``."""
        if self.max_consecutive_failures and self._consecutive >= self.max_consecutive_failures:
            return f"{self._consecutive} runs in a row failed (is the tracking server reachable?)"
        if self.max_seconds is not None and (elapsed := self.clock() - self._started) >= self.max_seconds:
            return f"time budget of {self.max_seconds:g} s used up after {elapsed:.0f} s"
        return None
