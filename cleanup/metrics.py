"""Prometheus metrics of the cleanup job, declared once here.

Exported two ways: a node-exporter textfile (written atomically after every run, for a one-shot
Kubernetes CronJob) and/or an HTTP endpoint (``--metrics-port``, for the long-running scheduled container).

A one-shot process starts from zero every time, so on start the counters and the last-success timestamp
are seeded from the previous textfile: the counters stay monotonic across runs and a failed run does not
reset ``checkpoint_cleanup_last_success_timestamp_seconds`` — the value an alert such as
``time() - checkpoint_cleanup_last_success_timestamp_seconds > 26 * 3600`` relies on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server, write_to_textfile
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

PREFIX = "checkpoint_cleanup"


class CleanupMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.runs_deleted = Counter(f"{PREFIX}_runs_deleted", "Runs whose artifacts were deleted", registry=r)
        self.bytes_freed = Counter(f"{PREFIX}_bytes_freed", "Artifact bytes deleted", registry=r)
        self.errors = Counter(f"{PREFIX}_errors", "Runs that could not be cleaned up", registry=r)
        self.last_success = Gauge(
            f"{PREFIX}_last_success_timestamp_seconds",
            "Unix time the last cleanup finished without errors",
            registry=r,
        )
        self.last_run = Gauge(f"{PREFIX}_last_run_timestamp_seconds", "Unix time the last cleanup finished", registry=r)
        self.last_duration = Gauge(f"{PREFIX}_last_run_duration_seconds", "Wall time of the last cleanup", registry=r)
        self.runs_planned = Gauge(
            f"{PREFIX}_runs_planned", "Runs in the last plan, by decision", ["decision"], registry=r
        )
        self.probably_crashed = Gauge(
            f"{PREFIX}_running_runs_past_retention",
            "RUNNING runs older than the retention window (probably crashed)",
            registry=r,
        )

    def seed_from_textfile(self, path: Path) -> None:
        """Carry counters and the last success time over from a previous process's textfile."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            return
        except OSError as error:
            log.warning("cannot read previous metrics textfile %s: %s", path, error)
            return
        counters = {
            f"{PREFIX}_runs_deleted_total": self.runs_deleted,
            f"{PREFIX}_bytes_freed_total": self.bytes_freed,
            f"{PREFIX}_errors_total": self.errors,
        }
        try:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name in counters and sample.value > 0:
                        counters[sample.name].inc(sample.value)
                    elif sample.name == f"{PREFIX}_last_success_timestamp_seconds":
                        self.last_success.set(sample.value)
        except ValueError as error:
            log.warning("ignoring unparsable metrics textfile %s: %s", path, error)

    def write_textfile(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), self.registry)  # writes a temp file and renames: readers never see half

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
        log.info("serving metrics on http://%s:%d/metrics", host, port)
