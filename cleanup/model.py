"""Plain records the planner works on, decoupled from MLflow's entity classes.

The store turns MLflow entities into these; the planner and its tests only ever see these, so planning
needs no server, no mlflow import and no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

TERMINAL_STATUSES = frozenset({"FINISHED", "FAILED", "KILLED"})
PARENT_RUN_TAG = "mlflow.parentRunId"


@dataclass(frozen=True, slots=True)
class ExperimentRef:
    experiment_id: str
    name: str


@dataclass(frozen=True, slots=True)
class LoggedModelRef:
    """An MLflow 3 logged model (e.g. a checkpoint from ``log_model(..., step=...)``)."""

    model_id: str
    experiment_id: str
    name: str
    source_run_id: str | None
    artifact_location: str


@dataclass(frozen=True, slots=True)
class ModelVersionRef:
    """One registered model version; ``aliases`` come from the registered model, not the version."""

    model_name: str
    version: str
    source: str
    run_id: str | None
    model_id: str | None = None
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RunRecord:
    """What the policy needs to know about one run.

    ``metric`` is the run's latest value of the ranking metric (``None`` when it was never logged).
    ``same_state_as`` is how the job detects that a run changed between planning and deletion.
    """

    run_id: str
    experiment_id: str
    status: str
    start_time_ms: int | None
    metric: float | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    name: str = ""
    end_time_ms: int | None = None
    artifact_uri: str = ""
    lifecycle_stage: str = "active"  # "deleted": deleted by a user, only planned with --include-deleted

    def same_state_as(self, other: RunRecord) -> bool:
        """Equality that treats NaN metrics as equal (``nan != nan`` would make every NaN run "changed")."""
        return self.fingerprint() == other.fingerprint()

    def fingerprint(self) -> tuple[object, ...]:
        metric = "nan" if self.metric is not None and math.isnan(self.metric) else self.metric
        return (
            self.run_id,
            self.experiment_id,
            self.status,
            self.start_time_ms,
            self.end_time_ms,
            metric,
            tuple(sorted(self.tags.items())),
            self.artifact_uri,
            self.lifecycle_stage,
        )

    @property
    def parent_run_id(self) -> str | None:
        return self.tags.get(PARENT_RUN_TAG) or None

    @property
    def is_deleted(self) -> bool:
        return self.lifecycle_stage != "active"

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES
