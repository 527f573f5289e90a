"""Run the job forever on a cron schedule, in UTC, never overlapping itself.

The job runs in the loop's own thread, so a run cannot start while the previous one is still going; fire
times missed while a run was busy are skipped, not queued (the next run is computed from the time the
previous one ended). ``stop`` (set by SIGTERM) interrupts the wait at once; during a run the job itself
polls it between steps.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from croniter import croniter

log = logging.getLogger(__name__)

# Re-read the wall clock at least this often while waiting, so a suspended host or a clock step does not
# make us sleep past (or far before) the fire time.
MAX_WAIT_SECONDS = 60.0


def utc_now() -> datetime:
    return datetime.now(UTC)


def validate_cron(expression: str) -> str:
    if not croniter.is_valid(expression):
        raise ValueError(f"not a valid cron expression: {expression!r}")
    return expression


def next_fire_time(expression: str, after: datetime) -> datetime:
    """The first fire time strictly after ``after`` (UTC)."""
    fire: datetime = croniter(expression, after.astimezone(UTC)).get_next(datetime)
    return fire.astimezone(UTC)


def run_on_schedule(
    expression: str,
    job: Callable[[datetime], object],
    stop: threading.Event,
    *,
    now: Callable[[], datetime] = utc_now,
    max_wait: float = MAX_WAIT_SECONDS,
) -> int:
    """Call ``job(fire_time)`` at every fire time until ``stop`` is set; returns the number of runs."""
    validate_cron(expression)
    runs = 0
    while not stop.is_set():
        fire = next_fire_time(expression, now())
        log.info("next cleanup at %s", fire.isoformat())
        while not stop.is_set() and (remaining := (fire - now()).total_seconds()) > 0:
            stop.wait(min(remaining, max_wait))
        if stop.is_set():
            break
        log.info("starting scheduled cleanup (fire time %s)", fire.isoformat())
        job(fire)
        runs += 1
    log.info("scheduler stopped after %d runs", runs)
    return runs
