"""An in-memory tracking server for the job's pure-ish tests: runs, logged models, versions and files,
behind the same methods ``CleanupJob`` calls on ``MlflowStore`` (nothing here talks to MLflow)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cleanup.model import ExperimentRef, LoggedModelRef, ModelVersionRef, RunRecord
from cleanup.store import ArtifactFile, MlflowStore

NOW = datetime(2025, 6, 1, tzinfo=UTC)
OLD_MS = int(NOW.timestamp() * 1000) - 90 * 86_400_000
EXPERIMENT = ExperimentRef("1", "exp")
VICTIMS = ("v1", "v2", "v3")


class Crash(BaseException):
    pass


class FakeServer(MlflowStore):
    """What the job sees of a tracking server, in memory."""

    def __init__(self) -> None:  # no MlflowClient: nothing here talks to MLflow
        self.page_size = 1000
        self.best_of = None
        self.active: dict[str, RunRecord] = {}
        self.files: dict[str, dict[str, bytes]] = {}  # artifact uri → path → content
        self.models: dict[str, LoggedModelRef] = {}
        self.versions: list[ModelVersionRef] = []
        for index, run_id in enumerate(("best", *VICTIMS)):
            uri = f"fake:/runs/{run_id}"
            self.active[run_id] = RunRecord(run_id, "1", "FINISHED", OLD_MS, 10.0 - index, artifact_uri=uri)
            self.files[uri] = {"checkpoint.bin": f"{run_id}-weights".encode(), "meta/config.json": b"{}"}
            if index % 2 == 1:
                model_id = f"m-{run_id}"
                self.models[model_id] = LoggedModelRef(model_id, "1", "ckpt", run_id, f"fake:/models/{model_id}")
                self.files[f"fake:/models/{model_id}"] = {"model.pkl": f"{model_id}-pickle".encode()}

    def experiments(self, only: Sequence[str] = ()) -> list[ExperimentRef]:
        return [EXPERIMENT]

    def runs(self, experiment_ids: Sequence[str], metric: str) -> Iterator[RunRecord]:  # type: ignore[override]
        yield from list(self.active.values())

    def model_versions(self) -> list[ModelVersionRef]:
        return list(self.versions)

    def logged_models(self, experiment_ids: Sequence[str]) -> list[LoggedModelRef]:
        return list(self.models.values())

    def get_run(self, run_id: str, metric: str, *, deleted_too: bool = False) -> RunRecord | None:
        return self.active.get(run_id)

    def versions_of_run(self, run_id: str, model_ids: Sequence[str] = ()) -> list[str]:
        return [f"{v.model_name} v{v.version}" for v in self.versions if v.run_id == run_id]

    def run_snapshot(self, run_id: str) -> dict[str, Any]:
        return {"info": {"run_id": run_id}}

    def list_files(self, artifact_uri: str) -> list[ArtifactFile]:
        return [ArtifactFile(path, len(data)) for path, data in sorted(self.files.get(artifact_uri, {}).items())]

    def download_tree(self, artifact_uri: str, destination_dir: Path) -> None:
        for path, data in self.files.get(artifact_uri, {}).items():
            (destination_dir / path).parent.mkdir(parents=True, exist_ok=True)
            (destination_dir / path).write_bytes(data)

    def delete_artifacts(self, artifact_uri: str) -> None:
        self.files.pop(artifact_uri, None)

    def delete_logged_model(self, model_id: str) -> None:
        self.models.pop(model_id, None)

    def delete_run(self, run_id: str) -> None:
        self.active.pop(run_id, None)
