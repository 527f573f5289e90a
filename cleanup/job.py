"""Plan, then apply the plan one run at a time — idempotently, and never trusting a stale plan.

For each run the plan deletes:

1. re-read it; skip it if it is gone, changed since planning (status, tags, metric, ...) or was
   registered as a model version in the meantime;
2. list its files (run artifacts and its MLflow 3 logged models) to know the bytes it frees;
3. with ``archive_path``: merge into its append-only archive and verify (see :mod:`cleanup.archive`); a
   failed verification is an error for this run and it is not deleted;
4. write the deletion journal (:mod:`cleanup.journal`), then delete the logged models' artifacts and the
   logged models, then the run's artifacts, then soft-delete the run, marking each step done. Right before
   each of these steps the run's protection is checked again (status, tags, registered versions of the run
   or its logged models): a change aborts the rest of that run's deletion and is reported;
5. with ``--purge``: hard-delete the metadata.

An interrupted deletion leaves an active run and a pending journal; the next pass resumes it, including
the steps of logged models the server no longer lists, and never with an archive smaller than before.

A failure on one run is recorded and the others go on, within a :class:`~cleanup.budget.FailureBudget`.
``should_stop`` is polled between runs, so SIGTERM lets the run in flight finish and leaves the rest for
the next pass.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from cleanup.archive import (
    Archiver,
    ArchiveVerificationError,
    ArtifactTree,
    manifest_entries,
    read_manifest,
    trees_for,
)
from cleanup.budget import FailureBudget
from cleanup.journal import AFTER_SOFT_DELETE, DeletionJournal, DeletionStep, JournalState, StepKind, pending_journals
from cleanup.lineage import registered_logged_model_ids, registry_protections
from cleanup.model import ExperimentRef, LoggedModelRef, RunRecord
from cleanup.policy import Action, Decision, Plan, RetentionPolicy, plan_already_deleted, plan_retention
from cleanup.progress import Progress
from cleanup.purge import Purger
from cleanup.store import ArtifactFile, MlflowStore

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    KEPT = "kept"
    DELETED = "deleted"
    WOULD_DELETE = "would-delete"  # dry run
    SKIPPED = "skipped"  # changed or gone since planning: not an error
    ABORTED = "aborted"  # a protection re-check stopped the deletion part-way: not an error
    FAILED = "failed"
    PENDING = "pending"  # not reached: the job was asked to stop, or its failure budget ran out


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
    interrupted: bool = False  # stopped by a signal
    gave_up: str | None = None  # why the failure budget stopped the pass
    warnings: list[str] = field(default_factory=list)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome is outcome)

    @property
    def bytes_freed(self) -> int:
        return sum(r.bytes for r in self.results if r.outcome is Outcome.DELETED)

    @property
    def failed(self) -> bool:
        """Something went wrong: a run failed or the pass gave up (a signal is not a failure)."""
        return self.count(Outcome.FAILED) > 0 or self.gave_up is not None

    @property
    def ok(self) -> bool:
        """A complete, clean pass (what the last-success metric records)."""
        return not self.failed and not self.interrupted


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything read from MLflow for one plan (read completely before anything is deleted)."""

    experiments: list[ExperimentRef]
    plan: Plan
    logged_models_by_run: dict[str, list[LoggedModelRef]]
    registered_model_ids: set[str]


StepHook = Callable[[str, DeletionStep], None]


def _no_hook(run_id: str, step: DeletionStep) -> None:
    return None


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
        budget: FailureBudget | None = None,
        before_step: StepHook = _no_hook,
        notes: Sequence[str] = (),
        include_deleted: bool = False,
    ) -> None:
        """``before_step(run_id, step)`` runs right before each destructive step (tests inject crashes);
        ``notes`` are warnings about the job's options, copied into every report."""
        self.store = store
        self.policy = policy
        self.dry_run = dry_run
        self.archiver = archiver
        self.purger = purger
        self.experiment_filter = tuple(experiments)
        self.should_stop = should_stop
        self.progress = progress or (lambda total: Progress(total, "cleanup"))
        self.budget = budget or FailureBudget()
        self.before_step = before_step
        self.notes = tuple(notes)
        self.include_deleted = include_deleted

    # ---- planning ------------------------------------------------------------------------------------

    def snapshot(self, now: datetime) -> Snapshot:
        deleted_experiments = self._deleted_experiments() if self.include_deleted else []
        named_deleted = {e.experiment_id for e in deleted_experiments} | {e.name for e in deleted_experiments}
        active_filter = tuple(name for name in self.experiment_filter if name not in named_deleted)
        only_deleted = bool(self.experiment_filter) and not active_filter  # an empty filter means "all"
        experiments = [] if only_deleted else self.store.experiments(active_filter)
        ids = [exp.experiment_id for exp in experiments]
        runs = list(self.store.runs(ids, self.policy.metric))
        deleted_runs: list[RunRecord] = []
        if self.include_deleted:
            deleted_ids = [e.experiment_id for e in deleted_experiments]
            deleted_runs = list(self.store.deleted_runs(ids, deleted_ids, self.policy.metric))
        versions = self.store.model_versions()
        # Logged models of every experiment: a version may point at a model in an experiment not in scope.
        all_ids = ids if not self.experiment_filter else [e.experiment_id for e in self.store.experiments()]
        logged_models = self.store.logged_models([*all_ids, *(e.experiment_id for e in deleted_experiments)])
        protections = registry_protections(versions, logged_models, [*runs, *deleted_runs])
        plan = plan_retention(experiments, runs, self.policy, now, protections)
        if self.include_deleted:
            extra = plan_already_deleted(
                [*experiments, *deleted_experiments],
                deleted_runs,
                self.policy,
                now,
                protections,
                frozenset(e.experiment_id for e in deleted_experiments),
            )
            plan = replace(plan, experiments=plan.experiments + extra)
        by_run: dict[str, list[LoggedModelRef]] = defaultdict(list)
        for model in logged_models:
            if model.source_run_id:
                by_run[model.source_run_id].append(model)
        return Snapshot(experiments, plan, dict(by_run), registered_logged_model_ids(versions))

    def _deleted_experiments(self) -> list[ExperimentRef]:
        wanted = set(self.experiment_filter)
        return [
            e for e in self.store.deleted_experiments() if not wanted or e.experiment_id in wanted or e.name in wanted
        ]

    # ---- applying -----------------------------------------------------------------------------------

    def run(self, now: datetime) -> Report:
        started = time.monotonic()
        self.budget.start()
        if self.archiver is not None and not self.dry_run and (freed := self.archiver.clean_scratch()):
            log.info("removed %d bytes of partial downloads left by an interrupted pass", freed)
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
        report = Report(plan=plan, dry_run=self.dry_run, warnings=list(self.notes))
        experiments: dict[str, ExperimentRef] = {}
        for experiment_plan in plan.experiments:  # the first entry of an id is its real name
            experiments.setdefault(experiment_plan.experiment.experiment_id, experiment_plan.experiment)
        to_delete = plan.to_delete
        if not self.dry_run:
            for warning in self._settle_other_journals({d.run.run_id for d in to_delete}):
                log.warning("%s", warning)
                report.warnings.append(warning)
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
                report.gave_up = report.gave_up or self.budget.exhausted()
                if report.gave_up:
                    report.results.append(RunResult(decision, Outcome.PENDING, f"not attempted: {report.gave_up}"))
                    continue
                result = self._apply_one(snapshot, experiments[decision.run.experiment_id], decision)
                self.budget.record(result.outcome is Outcome.FAILED)
                report.results.append(result)
                progress.advance(decision.run.run_id)
        finally:
            progress.close()
        if report.gave_up:
            log.error("pass stopped: %s", report.gave_up)
        return report

    def _settle_other_journals(self, planned: set[str]) -> list[str]:
        """Interrupted deletions of runs this plan does not delete: finished if the run is gone, else reported."""
        if self.archiver is None:
            return []
        warnings = []
        for state in pending_journals(self.archiver.root):
            if state.run_id in planned:
                continue  # resumed by _apply_one
            journal = DeletionJournal(self.archiver.root / state.experiment_id / state.run_id)
            try:
                current = self.store.get_run(state.run_id, self.policy.metric)
            except Exception as error:  # the runs to delete are more important than this bookkeeping
                warnings.append(f"run {state.run_id}: cannot check its interrupted deletion: {error}")
                continue
            if current is None:
                journal.complete(state)  # deleted since (by a user, or our soft delete was its last step)
                continue
            warnings.append(
                f"run {state.run_id}: an interrupted deletion did {len(state.done)} of {len(state.steps)} steps and "
                f"the run is now kept; what was deleted is in {journal.path.parent} "
                f"(checkpoint-cleanup restore {state.run_id} --archive-path {self.archiver.root})"
            )
        return warnings

    def _apply_one(self, snapshot: Snapshot, experiment: ExperimentRef, decision: Decision) -> RunResult:
        run = decision.run
        try:
            current = self.store.get_run(run.run_id, self.policy.metric, deleted_too=run.is_deleted)
            if current is None:
                return RunResult(decision, Outcome.SKIPPED, "already purged" if run.is_deleted else "already deleted")
            if not current.same_state_as(run):
                return RunResult(decision, Outcome.SKIPPED, "changed since planning")
            journal = None if self.archiver is None else DeletionJournal(self.archiver.run_dir(run))
            earlier = journal.load() if journal is not None else None
            if earlier is not None and not earlier.pending:
                earlier = None  # a finished or aborted attempt: this one starts afresh
            models = [
                model
                for model in snapshot.logged_models_by_run.get(run.run_id, [])
                if model.model_id not in snapshot.registered_model_ids
            ]
            # Logged models an interrupted attempt already deleted are no longer listed, but still theirs.
            model_ids = sorted({model.model_id for model in models} | (earlier.model_ids() if earlier else set()))
            if registered := self.store.versions_of_run(run.run_id, model_ids):
                return RunResult(decision, Outcome.SKIPPED, "registered since planning: " + ", ".join(registered))
            files: dict[str, list[ArtifactFile]] = {run.artifact_uri: self.store.list_files(run.artifact_uri)}
            for model in models:
                files[model.artifact_location] = self.store.list_files(model.artifact_location)
            size = sum(f.size for listed in files.values() for f in listed)
            if self.dry_run:
                return RunResult(decision, Outcome.WOULD_DELETE, bytes=size, logged_models=tuple(model_ids))

            archive_dir, archived = self._archive(experiment, run, trees_for(run, models, files), earlier)
            steps = self._steps(run, models, files, model_ids)
            state = journal.begin(run.run_id, run.experiment_id, steps, archived) if journal is not None else None
            if aborted := self._delete(decision, steps, model_ids, journal, state, archive_dir):
                return aborted
            resumed = " (resumed an interrupted deletion)" if earlier is not None else ""
            log.info("deleted run %s (%s): %s, %d bytes%s", run.run_id, run.name, decision.reason, size, resumed)
            return RunResult(
                decision,
                Outcome.DELETED,
                detail=resumed.strip(" ()"),
                bytes=size,
                archive=None if archive_dir is None else str(archive_dir),
                logged_models=tuple(model_ids),
            )
        except ArchiveVerificationError as error:
            log.error("run %s not deleted: %s", run.run_id, error)
            return RunResult(decision, Outcome.FAILED, f"archive verification failed: {error}")
        except Exception as error:  # one run's failure must not stop the others
            log.error("run %s: %s: %s", run.run_id, type(error).__name__, error)
            return RunResult(decision, Outcome.FAILED, f"{type(error).__name__}: {error}")

    def _archive(
        self, experiment: ExperimentRef, run: RunRecord, trees: Sequence[ArtifactTree], earlier: JournalState | None
    ) -> tuple[Path | None, list[str]]:
        """Merge into the run's archive; the archive dir and every path it holds (none without archiving)."""
        if self.archiver is None:
            return None, []
        archive_dir = self.archiver.archive(experiment, run, trees)
        archived = [entry.path for entry in manifest_entries(read_manifest(archive_dir))]
        if earlier is not None and (lost := earlier.archived_paths - set(archived)):
            raise ArchiveVerificationError(f"{len(lost)} files the interrupted deletion archived are missing")
        return archive_dir, archived

    def _delete(
        self,
        decision: Decision,
        steps: Sequence[DeletionStep],
        model_ids: Sequence[str],
        journal: DeletionJournal | None,
        state: JournalState | None,
        archive_dir: Path | None,
    ) -> RunResult | None:
        """Run the steps not done yet, each after a fresh protection check; the abort result, if one fails."""
        for step in state.remaining if state is not None else steps:
            if step.kind not in AFTER_SOFT_DELETE and (change := self._protection_change(decision.run, model_ids)):
                return self._abort(decision, journal, state, step, change, archive_dir)
            self.before_step(decision.run.run_id, step)
            self._execute(step)
            if journal is not None and state is not None:
                journal.mark_done(state, step)
        if journal is not None and state is not None:
            journal.complete(state)
        return None

    def _steps(
        self,
        run: RunRecord,
        models: Sequence[LoggedModelRef],
        files: dict[str, list[ArtifactFile]],
        model_ids: Sequence[str],
    ) -> list[DeletionStep]:
        steps = []
        for model in models:
            if files[model.artifact_location]:
                steps.append(DeletionStep(StepKind.MODEL_ARTIFACTS, model.model_id, model.artifact_location))
            steps.append(DeletionStep(StepKind.LOGGED_MODEL, model.model_id))
        if files[run.artifact_uri]:
            steps.append(DeletionStep(StepKind.RUN_ARTIFACTS, run.run_id, run.artifact_uri))
        if not run.is_deleted:
            steps.append(DeletionStep(StepKind.RUN, run.run_id))
        if self.purger is not None:
            steps.extend(DeletionStep(StepKind.PURGE_LOGGED_MODEL, model_id) for model_id in model_ids)
            steps.append(DeletionStep(StepKind.PURGE_RUN, run.run_id))
        return steps

    def _protection_change(self, run: RunRecord, model_ids: Sequence[str]) -> str | None:
        """Why the run may no longer be deleted, read from the server right now; ``None`` if nothing changed."""
        current = self.store.get_run(run.run_id, self.policy.metric, deleted_too=run.is_deleted)
        if current is None:
            return "the run was deleted by someone else"
        if not current.same_state_as(run):
            return "the run changed (status, tags or metric)"
        if registered := self.store.versions_of_run(run.run_id, model_ids):
            return "registered since planning: " + ", ".join(registered)
        return None

    def _abort(
        self,
        decision: Decision,
        journal: DeletionJournal | None,
        state: JournalState | None,
        step: DeletionStep,
        change: str,
        archive_dir: Path | None,
    ) -> RunResult:
        done = len(state.done) if state is not None else 0
        if journal is not None and state is not None:
            journal.abort(state, change)
        detail = f"deletion aborted before {step.key}: {change}"
        if done:
            detail += f"; {done} steps were already done, their files are in {archive_dir}"
        log.warning("run %s: %s", decision.run.run_id, detail)
        return RunResult(decision, Outcome.ABORTED, detail, archive=None if archive_dir is None else str(archive_dir))

    def _execute(self, step: DeletionStep) -> None:
        match step.kind:
            case StepKind.MODEL_ARTIFACTS | StepKind.RUN_ARTIFACTS:
                self.store.delete_artifacts(step.uri)
            case StepKind.LOGGED_MODEL:
                self.store.delete_logged_model(step.target)
            case StepKind.RUN:
                self.store.delete_run(step.target)
            case StepKind.PURGE_LOGGED_MODEL:
                assert self.purger is not None
                self.purger.purge_logged_model(step.target)
            case StepKind.PURGE_RUN:
                assert self.purger is not None
                self.purger.purge_run(step.target)
