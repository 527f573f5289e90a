"""Protection is re-checked right before each destructive step, after archiving (real ``mlflow server``)."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from cleanup.archive import Archiver
from cleanup.job import CleanupJob, Outcome
from cleanup.journal import JOURNAL_NAME, DeletionStep, StepKind
from cleanup.store import MlflowStore
from tests.cleanup.cleanup_scenario import ONE_VICTIM_POLICY as POLICY
from tests.cleanup.cleanup_scenario import ONE_VICTIM_SPECS as SPECS
from tests.cleanup.cleanup_scenario import build_scenario
from tests.cleanup.cleanup_scenario import victim_files_on_server as server_files
from tests.support.mlflow_server import MlflowServer, tree_hashes


def test_a_model_registered_while_its_run_is_archived_is_not_deleted(
    mlflow_server: MlflowServer, unique_name: str, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server.uri)
    scenario = build_scenario(client, unique_name, SPECS)
    victim, model_id = scenario.run_ids["victim"], scenario.logged_model_ids["victim"]
    before = server_files(mlflow_server.artifact_root, scenario)
    late_name = f"{unique_name}-late-registered"
    registered: list[str] = []

    def copy_then_register(source: Path, destination: Path) -> None:
        shutil.copyfile(source, destination)
        if not registered:  # a user registers the checkpoint while the job copies it
            registered.append(mlflow.register_model(f"models:/{model_id}", late_name).version)

    store = MlflowStore(client)
    archiver = Archiver(tmp_path / "archive", store, copy_file=copy_then_register)
    report = CleanupJob(store, POLICY, archiver=archiver, experiments=[scenario.experiment_name]).run(datetime.now(UTC))

    result = next(r for r in report.results if r.decision.run.run_id == victim)
    assert result.outcome is Outcome.ABORTED
    assert result.detail == (
        f"deletion aborted before model-artifacts:{model_id}: registered since planning: {late_name} v1"
    )
    assert report.ok, "an abort is the safety check working, not a failure"
    assert server_files(mlflow_server.artifact_root, scenario) == before
    assert client.get_run(victim).info.lifecycle_stage == "active"
    downloaded = tree_hashes(
        Path(mlflow.artifacts.download_artifacts(f"models:/{late_name}/1", dst_path=str(tmp_path / "dl")))
    )
    downloaded.pop("registered_model_meta", None)
    assert downloaded == before[f"models/{model_id}"] != {}
    journal = json.loads((tmp_path / "archive" / scenario.experiment_id / victim / JOURNAL_NAME).read_text())
    assert journal["aborted"].startswith("registered since planning") and journal["done"] == []


def test_protection_added_between_two_steps_stops_the_rest(
    mlflow_server: MlflowServer, unique_name: str, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server.uri)
    scenario = build_scenario(client, unique_name, SPECS)
    victim, model_id = scenario.run_ids["victim"], scenario.logged_model_ids["victim"]
    before = server_files(mlflow_server.artifact_root, scenario)

    def protect_after_first_step(run_id: str, step: DeletionStep) -> None:
        if step.kind is StepKind.MODEL_ARTIFACTS:
            client.set_tag(victim, "stage", "production")  # applies from the next step on

    store = MlflowStore(client)
    archive = tmp_path / "archive"
    job = CleanupJob(
        store,
        POLICY,
        archiver=Archiver(archive, store),
        experiments=[scenario.experiment_name],
        before_step=protect_after_first_step,
    )
    report = job.run(datetime.now(UTC))

    result = next(r for r in report.results if r.decision.run.run_id == victim)
    assert result.outcome is Outcome.ABORTED
    assert result.detail.startswith(f"deletion aborted before logged-model:{model_id}: the run changed")
    assert "1 steps were already done" in result.detail
    after = server_files(mlflow_server.artifact_root, scenario)
    assert after["artifacts"] == before["artifacts"], "the run's own files were not touched"
    assert after[f"models/{model_id}"] == {}, "the step before the change did run"
    assert tree_hashes(archive / scenario.experiment_id / victim / "models" / model_id) == before[f"models/{model_id}"]
    assert client.get_run(victim).info.lifecycle_stage == "active"
