"""The deletion journal: what the job is about to delete for one run, written before the first delete.

Deleting a run takes several steps (each logged model's artifacts, the logged model, the run's artifacts,
the run, optionally the purges), and a pass can die between any two of them. The journal
(``<archive>/<experiment_id>/<run_id>/deletion.json``, written atomically) records the steps, the archive
files that existed when deletion began, and each step once it is done. The next pass therefore knows that
a still-active run is half-deleted, resumes the remaining steps (including those of logged models that the
server no longer lists), and refuses to go on if the archive holds less than the journal recorded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from cleanup.archive import write_json_atomically

JOURNAL_NAME = "deletion.json"


class StepKind(StrEnum):
    MODEL_ARTIFACTS = "model-artifacts"
    LOGGED_MODEL = "logged-model"
    RUN_ARTIFACTS = "run-artifacts"
    RUN = "run"
    PURGE_LOGGED_MODEL = "purge-logged-model"
    PURGE_RUN = "purge-run"


# Steps after which the run is gone from the server's point of view: no protection left to re-check.
AFTER_SOFT_DELETE = frozenset({StepKind.PURGE_LOGGED_MODEL, StepKind.PURGE_RUN})


@dataclass(frozen=True, slots=True)
class DeletionStep:
    kind: StepKind
    target: str  # the run id or the logged model id
    uri: str = ""  # the artifact root, for the artifact steps

    @property
    def key(self) -> str:
        return f"{self.kind.value}:{self.target}"

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind.value, "target": self.target, "uri": self.uri}

    @classmethod
    def from_json(cls, document: dict[str, str]) -> DeletionStep:
        return cls(StepKind(document["kind"]), document["target"], document.get("uri", ""))


@dataclass(slots=True)
class JournalState:
    run_id: str
    experiment_id: str
    steps: list[DeletionStep]
    done: set[str] = field(default_factory=set)
    archived_paths: set[str] = field(default_factory=set)
    started_at: str = ""
    completed_at: str | None = None
    aborted: str | None = None  # why a protection re-check stopped the deletion

    @property
    def pending(self) -> bool:
        return self.completed_at is None and self.aborted is None

    @property
    def remaining(self) -> list[DeletionStep]:
        return [step for step in self.steps if step.key not in self.done]

    def model_ids(self) -> set[str]:
        return {step.target for step in self.steps if step.kind is StepKind.LOGGED_MODEL}

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "steps": [step.to_json() for step in self.steps],
            "done": sorted(self.done),
            "archived_paths": sorted(self.archived_paths),
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "aborted": self.aborted,
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> JournalState:
        return cls(
            run_id=document["run_id"],
            experiment_id=document["experiment_id"],
            steps=[DeletionStep.from_json(step) for step in document["steps"]],
            done=set(document.get("done", ())),
            archived_paths=set(document.get("archived_paths", ())),
            started_at=document.get("started_at", ""),
            completed_at=document.get("completed_at"),
            aborted=document.get("aborted"),
        )


def merge_steps(earlier: Sequence[DeletionStep], planned: Sequence[DeletionStep]) -> list[DeletionStep]:
    """The earlier attempt's steps plus the new ones, in execution order (models, run artifacts, run, purges)."""
    order = list(StepKind)
    merged: dict[str, DeletionStep] = {step.key: step for step in earlier}
    for step in planned:
        merged.setdefault(step.key, step)
    return sorted(merged.values(), key=lambda step: (order.index(step.kind), step.target))


class DeletionJournal:
    """One run's journal file; every change is written atomically before the caller goes on."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / JOURNAL_NAME

    def load(self) -> JournalState | None:
        if not self.path.exists():
            return None
        return JournalState.from_json(json.loads(self.path.read_text()))

    def begin(
        self, run_id: str, experiment_id: str, steps: Sequence[DeletionStep], archived_paths: Iterable[str]
    ) -> JournalState:
        earlier = self.load()
        if earlier is not None and earlier.pending:
            earlier.steps = merge_steps(earlier.steps, steps)
            earlier.archived_paths |= set(archived_paths)
            state = earlier
        else:
            state = JournalState(
                run_id,
                experiment_id,
                merge_steps([], steps),
                archived_paths=set(archived_paths),
                started_at=_now(),
            )
        self._write(state)
        return state

    def mark_done(self, state: JournalState, step: DeletionStep) -> None:
        state.done.add(step.key)
        self._write(state)

    def complete(self, state: JournalState) -> None:
        state.completed_at = _now()
        self._write(state)

    def abort(self, state: JournalState, reason: str) -> None:
        state.aborted = reason
        self._write(state)

    def _write(self, state: JournalState) -> None:
        write_json_atomically(self.path, state.to_json())


def pending_journals(archive_root: Path) -> list[JournalState]:
    """Every journal under the archive whose deletion was neither completed nor aborted."""
    found = []
    for path in sorted(archive_root.glob(f"*/*/{JOURNAL_NAME}")):
        state = DeletionJournal(path.parent).load()
        if state is not None and state.pending:
            found.append(state)
    return found


def _now() -> str:
    return datetime.now(UTC).isoformat()
