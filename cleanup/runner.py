"""One cleanup pass as the command runs it: job → printed summary → JSON report → metrics."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import mlflow
from mlflow.tracking import MlflowClient
from prometheus_client import disable_created_metrics

from cleanup.archive import Archiver
from cleanup.budget import FailureBudget
from cleanup.job import CleanupJob, Outcome, Report
from cleanup.metrics import CleanupMetrics
from cleanup.policy import Action, RetentionPolicy
from cleanup.purge import Purger
from cleanup.redact import redact_uri
from cleanup.report import deletion_list, failure_document, report_document, summary_table, write_document
from cleanup.store import MlflowStore

log = logging.getLogger("cleanup")


@dataclass
class Runner:
    job: CleanupJob
    tracking_uri: str
    metrics: CleanupMetrics
    report_path: Path | None = None
    textfile: Path | None = None
    verbose: bool = False
    out: TextIO = sys.stdout

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, policy: RetentionPolicy, stop: threading.Event, notes: Sequence[str] = ()
    ) -> Runner:
        """``notes``: warnings about the options themselves, repeated in every report."""
        if args.tracking_uri:
            # Global on purpose: mlflow-artifacts:/ URIs are resolved against the global tracking URI.
            mlflow.set_tracking_uri(args.tracking_uri)
        tracking_uri = mlflow.get_tracking_uri()
        log.info("tracking server %s", redact_uri(tracking_uri))
        best_of = policy.metric_mode if policy.rank_by == "best" else None
        store = MlflowStore(MlflowClient(tracking_uri=tracking_uri), best_of=best_of)
        archiver = Archiver(args.archive_path, store) if args.archive_path else None
        purger = Purger(args.backend_store_uri) if args.purge and not args.dry_run else None
        # `*_created` samples would change on every one-shot run and make carried-over counters look reset.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        metrics = CleanupMetrics()
        if args.textfile:
            metrics.seed_from_textfile(args.textfile)
        if args.metrics_port:
            metrics.serve(*args.metrics_port)
        job = CleanupJob(
            store,
            policy,
            dry_run=args.dry_run,
            archiver=archiver,
            purger=purger,
            experiments=args.experiment,
            should_stop=stop.is_set,
            budget=FailureBudget(args.max_consecutive_failures, args.max_duration),
            notes=notes,
            include_deleted=args.include_deleted,
        )
        return cls(job, tracking_uri, metrics, args.report, args.textfile, args.verbose)

    def run_once(self, fire_time: datetime | None) -> bool:
        """One full pass; False if anything failed. Never raises, so a scheduled container survives a
        server outage. A pass stopped by a signal has not failed: it returns True, but does not count as
        a success in the metrics either."""
        started = time.time()
        now = fire_time or datetime.now(UTC)
        try:
            report = self.job.run(now)
        except Exception as error:
            log.error("cleanup could not run: %s: %s", type(error).__name__, error)
            self.metrics.errors.inc()
            self._write(failure_document(error, self.tracking_uri, now))
            self._finish_metrics(started)
            return False
        self._print(report)
        written = self._write(report_document(report, self.tracking_uri))
        self._record_metrics(report, started, report.ok and written)
        return not report.failed and written

    def _write(self, document: dict[str, Any]) -> bool:
        if not self.report_path:
            return True
        try:
            write_document(self.report_path, document)
        except OSError as error:
            log.error("cannot write report %s: %s", self.report_path, error)
            return False
        log.info("report written to %s", self.report_path)
        return True

    def _print(self, report: Report) -> None:
        verb = "would delete" if report.dry_run else "deleted"
        if listing := deletion_list(report):
            print(listing, file=self.out)
        if self.verbose:
            for result in report.results:
                if result.outcome is Outcome.KEPT:
                    run = result.decision.run
                    print(
                        f"{'keep':<12} {run.run_id}  {run.name or '-'}  {result.decision.reason}",
                        file=self.out,
                    )
        print(summary_table(report), file=self.out)
        log.info(
            "%s %d runs, %d failed, %d skipped (planning %.1fs, applying %.1fs)%s",
            verb,
            report.count(Outcome.DELETED) + report.count(Outcome.WOULD_DELETE),
            report.count(Outcome.FAILED),
            report.count(Outcome.SKIPPED),
            report.planning_seconds,
            report.apply_seconds,
            " — dry run, nothing changed" if report.dry_run else "",
        )

    def _record_metrics(self, report: Report, started: float, ok: bool) -> None:
        policy = report.plan.policy
        decisions = report.plan.decisions
        for action in Action:
            self.metrics.runs_planned.labels(action.value).set(sum(1 for d in decisions if d.action is action))
        self.metrics.probably_crashed.set(
            sum(
                1
                for d in decisions
                if d.run.status == "RUNNING" and d.age_days is not None and d.age_days > policy.retention_days
            )
        )
        if not report.dry_run:
            self.metrics.runs_deleted.inc(report.count(Outcome.DELETED))
            self.metrics.bytes_freed.inc(report.bytes_freed)
            self.metrics.errors.inc(report.count(Outcome.FAILED))
            if ok:
                self.metrics.last_success.set(time.time())
        self._finish_metrics(started)

    def _finish_metrics(self, started: float) -> None:
        self.metrics.last_run.set(time.time())
        self.metrics.last_duration.set(time.time() - started)
        if self.textfile:
            try:
                self.metrics.write_textfile(self.textfile)
            except OSError as error:
                log.error("cannot write metrics textfile %s: %s", self.textfile, error)
