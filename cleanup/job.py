"""Plan, then apply the plan one run at a time — idempotently, and never trusting a stale plan.

For each run the plan deletes:

1. re-read it; skip it if it is gone, changed since planning (status, tags, metric, ...) or was
   registered as a model version in the meantime;
2. list its files (run artifacts and its MLflow 3 logged models) to know the bytes it frees;
3. with ``archive_path``: copy and verify (see :mod:`cleanup.archive`); a failed verification is an
   error for this run and it is not deleted;
4. delete the logged models' artifacts and the logged models, then the run's artifacts, then soft-delete
   the run — in that order, so an interruption leaves an active run that the next pass finishes;
5. with ``--purge``: hard-delete the metadata.

A failure on one run is recorded and the others go on. ``should_stop`` is polled between runs, so SIGTERM
lets the run in flight finish and leaves the rest for the next pass.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from cleanup.archive import Archiver, ArchiveVerificationError, trees_for
from cleanup.lineage import registered_logged_model_ids, registry_protections
from cleanup.model import ExperimentRef, LoggedModelRef
from cleanup.policy import Action, Decision, Plan, RetentionPolicy, plan_retention
from cleanup.progress import Progress
from cleanup.purge import Purger
from cleanup.store import ArtifactFile, MlflowStore

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    KEPT = "kept"
    DELETED = "deleted"
    WOULD_DELETE = "would-delete"  # dry run
    SKIPPED = "skipped"  # changed or gone since planning: not an error
    FAILED = "failed"
    PENDING = "pending"  # not reached: the job was asked to stop


@dataclass(frozen=True, slots=True)
class RunResult:
    decision: Decision
    outcome: Outcome
    detail: str = ""
    bytes: int = 0
    archive: str | None = None
    logged_models: tuple[str, ...] = ()


@dataclass(slots=True)
class Report:
    plan: Plan
    dry_run: bool
    results: list[RunResult] = field(default_factory=list)
    planning_seconds: float = 0.0
    apply_seconds: float = 0.0
    interrupted: bool = False

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome is outcome)

    @property
    def bytes_freed(self) -> int:
        return sum(r.bytes for r in self.results if r.outcome is Outcome.DELETED)

    @property
    def ok(self) -> bool:
        return self.count(Outcome.FAILED) == 0 and not self.interrupted


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything read from MLflow for one plan (read completely before anything is deleted)."""

    experiments: list[ExperimentRef]
    plan: Plan
    logged_models_by_run: dict[str, list[LoggedModelRef]]
    registered_model_ids: set[str]


class CleanupJob:
    def __init__(
        self,
        store: MlflowStore,
        policy: RetentionPolicy,
        *,
        dry_run: bool = False,
        archiver: Archiver | None = None,
        purger: Purger | None = None,
        experiments: Sequence[str] = (),
        should_stop: Callable[[], bool] = lambda: False,
        progress: Callable[[int], Progress] | None = None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.dry_run = dry_run
        self.archiver = archiver
        self.purger = purger
        self.experiment_filter = tuple(experiments)
        self.should_stop = should_stop
        self.progress = progress or (lambda total: Progress(total, "cleanup"))

    # ---- planning ------------------------------------------------------------------------------------

    def snapshot(self, now: datetime) -> Snapshot:
        experiments = self.store.experiments(self.experiment_filter)
        ids = [exp.experiment_id for exp in experiments]
        runs = list(self.store.runs(ids, self.policy.metric))
        versions = self.store.model_versions()
        # Logged models of every experiment: a version may point at a model in an experiment not in scope.
        all_ids = ids if not self.experiment_filter else [e.experiment_id for e in self.store.experiments()]
        logged_models = self.store.logged_models(all_ids)
        protections = registry_protections(versions, logged_models, runs)
        plan = plan_retention(experiments, runs, self.policy, now, protections)
        by_run: dict[str, list[LoggedModelRef]] = defaultdict(list)
        for model in logged_models:
            if model.source_run_id:
                by_run[model.source_run_id].append(model)
        return Snapshot(experiments, plan, dict(by_run), registered_logged_model_ids(versions))

    # ---- applying -----------------------------------------------------------------------------------

    def run(self, now: datetime) -> Report:
        started = time.monotonic()
        snapshot = self.snapshot(now)
        planned = time.monotonic()
        for warning in snapshot.plan.warnings:
            log.warning("%s", warning)
        report = self.apply(snapshot)
        report.planning_seconds = planned - started
        report.apply_seconds = time.monotonic() - planned
        return report

    def apply(self, snapshot: Snapshot) -> Report:
        plan = snapshot.plan
        report = Report(plan=plan, dry_run=self.dry_run)
        experiments = {exp.experiment.experiment_id: exp.experiment for exp in plan.experiments}
        to_delete = plan.to_delete
        progress = self.progress(len(to_delete))
        try:
            for decision in plan.decisions:
                if decision.action is Action.KEEP:
                    report.results.append(RunResult(decision, Outcome.KEPT))
            for decision in to_delete:
                if self.should_stop():
                    report.interrupted = True
                    report.results.append(RunResult(decision, Outcome.PENDING, "stopped before this run"))
                    continue
                result = self._apply_one(snapshot, experiments[decision.run.experiment_id], decision)
                report.results.append(result)
                progress.advance(decision.run.run_id)
        finally:
            progress.close()
        return report

    def _apply_one(self, snapshot: Snapshot, experiment: ExperimentRef, decision: Decision) -> RunResult:
        run = decision.run
        try:
            current = self.store.get_run(run.run_id, self.policy.metric)
            if current is None:
                return RunResult(decision, Outcome.SKIPPED, "already deleted")
            if not current.same_state_as(run):
                return RunResult(decision, Outcome.SKIPPED, "changed since planning")
            if registered := self.store.versions_of_run(run.run_id):
                return RunResult(decision, Outcome.SKIPPED, "registered since planning: " + ", ".join(registered))
            models = [
                model
                for model in snapshot.logged_models_by_run.get(run.run_id, [])
                if model.model_id not in snapshot.registered_model_ids
            ]
            files: dict[str, list[ArtifactFile]] = {run.artifact_uri: self.store.list_files(run.artifact_uri)}
            for model in models:
                files[model.artifact_location] = self.store.list_files(model.artifact_location)
            size = sum(f.size for listed in files.values() for f in listed)
            model_ids = tuple(model.model_id for model in models)
            if self.dry_run:
                return RunResult(decision, Outcome.WOULD_DELETE, bytes=size, logged_models=model_ids)

            archive_dir = None
            if self.archiver is not None:
                archive_dir = str(self.archiver.archive(experiment, run, trees_for(run, models, files)))
            for model in models:
                if files[model.artifact_location]:
                    self.store.delete_artifacts(model.artifact_location)
                self.store.delete_logged_model(model.model_id)
            if files[run.artifact_uri]:
                self.store.delete_artifacts(run.artifact_uri)
            self.store.delete_run(run.run_id)
            if self.purger is not None:
                for model_id in model_ids:
                    self.purger.purge_logged_model(model_id)
                self.purger.purge_run(run.run_id)
            log.info("deleted run %s (%s): %s, %d bytes", run.run_id, run.name, decision.reason, size)
            return RunResult(decision, Outcome.DELETED, bytes=size, archive=archive_dir, logged_models=model_ids)
        except ArchiveVerificationError as error:
            log.error("run %s not deleted: %s", run.run_id, error)
            return RunResult(decision, Outcome.FAILED, f"archive verification failed: {error}")
        except Exception as error:  # one run's failure must not stop the others
            log.error("run %s: %s: %s", run.run_id, type(error).__name__, error)
            return RunResult(decision, Outcome.FAILED, f"{type(error).__name__}: {error}")
