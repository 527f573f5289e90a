"""Acceptance tests against a real ``mlflow server`` (see conftest): files on disk, registry, archive."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cleanup.archive import MANIFEST_NAME, Archiver
from cleanup.job import CleanupJob, Outcome, Report
from cleanup.policy import DEFAULT_PROTECT_TAGS, RetentionPolicy
from cleanup.purge import Purger
from cleanup.store import MlflowStore
from tests.cleanup.cleanup_scenario import METRIC, RunSpec, Scenario, build_scenario
from tests.support.mlflow_server import MlflowServer, tree_hashes

POLICY = RetentionPolicy(
    top_n=3, metric=METRIC, retention_days=30, protect_tags=(*DEFAULT_PROTECT_TAGS, ("keep", "forever"))
)


def run_dir(server: MlflowServer, experiment_id: str, run_id: str) -> Path:
    return server.artifact_root / experiment_id / run_id / "artifacts"


def model_dir(server: MlflowServer, experiment_id: str, model_id: str) -> Path:
    return server.artifact_root / experiment_id / "models" / model_id / "artifacts"


def disk_state(server: MlflowServer, scenario: Scenario) -> dict[str, dict[str, str]]:
    """Run id (or logged model id) → {file: sha256} for every artifact of the scenario on disk."""
    state = {}
    for label, run_id in scenario.run_ids.items():
        experiment_id = scenario.client.get_run(run_id).info.experiment_id
        state[run_id] = tree_hashes(run_dir(server, experiment_id, run_id))
        if model_id := scenario.logged_model_ids.get(label):
            state[model_id] = tree_hashes(model_dir(server, experiment_id, model_id))
    return state


def make_job(client: MlflowClient, scenario: Scenario, **options: object) -> CleanupJob:
    return CleanupJob(MlflowStore(client), POLICY, experiments=scenario.experiment_names, **options)  # type: ignore[arg-type]


def ids_with(report: Report, *outcomes: Outcome) -> set[str]:
    return {r.decision.run.run_id for r in report.results if r.outcome in outcomes}


def active(client: MlflowClient, run_id: str) -> bool:
    return client.get_run(run_id).info.lifecycle_stage == "active"


@pytest.fixture
def client(mlflow_server: MlflowServer) -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow_server.uri)


@pytest.fixture
def scenario(client: MlflowClient, unique_name: str) -> Scenario:
    return build_scenario(client, unique_name)


def test_dry_run_then_real_run_then_second_run(
    mlflow_server: MlflowServer, client: MlflowClient, scenario: Scenario, tmp_path: Path
) -> None:
    before = disk_state(mlflow_server, scenario)
    assert all(before[run_id] for run_id in scenario.run_ids.values()), "every run starts with artifacts"

    # Dry run: lists exactly the expected runs, changes nothing.
    dry = make_job(client, scenario, dry_run=True).run(datetime.now(UTC))
    labels = {run_id: label for label, run_id in scenario.run_ids.items()}
    reasons = {labels[r.decision.run.run_id]: r.decision.reason for r in dry.results}
    would_delete = {labels[run_id] for run_id in ids_with(dry, Outcome.WOULD_DELETE)}
    assert would_delete == {labels[run_id] for run_id in scenario.expected_deleted}, reasons
    assert ids_with(dry, Outcome.FAILED, Outcome.SKIPPED) == set()
    assert disk_state(mlflow_server, scenario) == before
    assert all(active(client, run_id) for run_id in scenario.run_ids.values())
    assert any("none logged 'sharpe_ratio'" in w for w in dry.plan.warnings)
    assert any("probably crashed" in w and scenario.run_ids["crashed"] in w for w in dry.plan.warnings)

    # Real run with an archive: deletes exactly what the dry run listed.
    archive = tmp_path / "archive"
    store = MlflowStore(client)
    real = make_job(client, scenario, archiver=Archiver(archive, store)).run(datetime.now(UTC))
    assert ids_with(real, Outcome.FAILED, Outcome.SKIPPED) == set()
    assert ids_with(real, Outcome.DELETED) == ids_with(dry, Outcome.WOULD_DELETE) == scenario.expected_deleted
    assert real.bytes_freed == sum(r.bytes for r in dry.results)
    assert real.ok

    after = disk_state(mlflow_server, scenario)
    for run_id in scenario.expected_deleted:
        assert after[run_id] == {}, f"artifacts of deleted run {run_id} still on disk"
        assert not active(client, run_id)
    for run_id in scenario.expected_kept:
        assert after[run_id] == before[run_id], f"kept run {run_id} changed on disk"
        assert active(client, run_id)

    # The deleted run's MLflow 3 logged model (checkpoint) is gone; the registered one is intact.
    deleted_model = scenario.logged_model_ids["checkpointed"]
    assert after[deleted_model] == {}
    with pytest.raises(MlflowException, match="not found"):
        client.get_logged_model(deleted_model)
    kept_model = scenario.logged_model_ids["registered"]
    assert after[kept_model] == before[kept_model] != {}
    champion = f"models:/{scenario.model_name}@champion"
    downloaded = tree_hashes(Path(mlflow.artifacts.download_artifacts(champion, dst_path=str(tmp_path / "dl"))))
    downloaded.pop("registered_model_meta", None)  # MLflow writes this beside a downloaded registered model
    assert downloaded == before[kept_model]
    assert mlflow.pyfunc.load_model(champion).predict([1, 2]) == [1, 2]

    # Archived copies match the originals byte for byte, and each manifest lists them.
    for run_id in scenario.expected_deleted:
        run_archive = archive / scenario.experiment_id / run_id
        assert tree_hashes(run_archive / "artifacts") == before[run_id]
        manifest = json.loads((run_archive / MANIFEST_NAME).read_text())
        assert {f["path"] for f in manifest["files"]} >= {f"artifacts/{p}" for p in before[run_id]}
        assert json.loads((run_archive / "run.json").read_text())["info"]["run_id"] == run_id
    checkpoint_archive = archive / scenario.experiment_id / scenario.run_ids["checkpointed"]
    assert tree_hashes(checkpoint_archive / "models" / deleted_model) == before[deleted_model]

    # Reasons are spelled out.
    reasons = {r.decision.run.run_id: r.decision.reason for r in real.results}
    ids = scenario.run_ids
    assert reasons[ids["best"]] == "top-n rank 1"
    assert "top-n rank 3" in reasons[ids["tie_a"]] and "top-n rank 3" in reasons[ids["tie_b"]]
    assert reasons[ids["registered"]] == f"registered {scenario.model_name} v1 @champion"
    assert reasons[ids["registered_runs_uri"]] == f"registered {scenario.model_name}-legacy v1"
    assert reasons[ids["production"]] == "tag stage=Production"
    assert reasons[ids["crashed"]] == "running"
    assert reasons[ids["parent"]] == "parent of kept"
    assert reasons[ids["fifth"]] == "delete: rank 5, 90 days old"
    assert reasons[ids["no_metric"]] == "delete: no sharpe_ratio, 90 days old"

    # Idempotent: a second pass right after deletes nothing.
    second = make_job(client, scenario).run(datetime.now(UTC))
    assert ids_with(second, Outcome.DELETED, Outcome.FAILED, Outcome.SKIPPED) == set()
    assert disk_state(mlflow_server, scenario) == after


OLD_LOW = [RunSpec("keep_best", 90, (1.0,)), RunSpec("old_a", 90, (0.1,)), RunSpec("old_b", 90, (0.2,))]
SMALL_POLICY = RetentionPolicy(top_n=1, metric=METRIC, retention_days=30)


def test_failed_archive_verification_prevents_deletion(
    mlflow_server: MlflowServer, client: MlflowClient, unique_name: str, tmp_path: Path
) -> None:
    scenario = build_scenario(client, unique_name, OLD_LOW)
    before = disk_state(mlflow_server, scenario)
    victim = scenario.run_ids["old_a"]

    def corrupting_copy(source: Path, destination: Path) -> None:
        shutil.copyfile(source, destination)
        if victim in str(destination) and destination.name == "checkpoint.bin":
            with destination.open("r+b") as handle:  # one flipped byte, same size
                first = handle.read(1)
                handle.seek(0)
                handle.write(bytes([first[0] ^ 0xFF]))

    store = MlflowStore(client)
    archiver = Archiver(tmp_path / "archive", store, copy_file=corrupting_copy)
    job = CleanupJob(store, SMALL_POLICY, archiver=archiver, experiments=[scenario.experiment_name])
    report = job.run(datetime.now(UTC))

    failed = [r for r in report.results if r.outcome is Outcome.FAILED]
    assert [r.decision.run.run_id for r in failed] == [victim]
    assert "SHA-256" in failed[0].detail
    assert not report.ok
    assert active(client, victim)
    assert disk_state(mlflow_server, scenario)[victim] == before[victim]
    # The other run was archived, verified and deleted: one failure does not stop the rest.
    assert ids_with(report, Outcome.DELETED) == {scenario.run_ids["old_b"]}


def test_run_changed_after_planning_is_not_deleted(
    mlflow_server: MlflowServer, client: MlflowClient, unique_name: str
) -> None:
    scenario = build_scenario(client, unique_name, OLD_LOW)
    before = disk_state(mlflow_server, scenario)
    store = MlflowStore(client)
    job = CleanupJob(store, SMALL_POLICY, experiments=[scenario.experiment_name])
    snapshot = job.snapshot(datetime.now(UTC))
    changed, registered = scenario.run_ids["old_a"], scenario.run_ids["old_b"]
    client.set_tag(changed, "protected", "true")  # someone protects it while we plan
    client.create_registered_model(f"{unique_name}-late")
    client.create_model_version(f"{unique_name}-late", f"runs:/{registered}/meta", run_id=registered)

    report = job.apply(snapshot)

    skipped = {r.decision.run.run_id: r.detail for r in report.results if r.outcome is Outcome.SKIPPED}
    assert skipped == {
        changed: "changed since planning",
        registered: f"registered since planning: {unique_name}-late v1",
    }
    assert disk_state(mlflow_server, scenario) == before


def test_stop_request_finishes_the_run_in_flight_and_leaves_the_rest(
    mlflow_server: MlflowServer, client: MlflowClient, unique_name: str
) -> None:
    scenario = build_scenario(client, unique_name, OLD_LOW)
    calls = iter([False, True, True])
    job = CleanupJob(
        MlflowStore(client), SMALL_POLICY, experiments=[scenario.experiment_name], should_stop=lambda: next(calls)
    )
    report = job.run(datetime.now(UTC))
    assert report.count(Outcome.DELETED) == 1
    assert report.count(Outcome.PENDING) == 1
    assert report.interrupted and not report.ok
    pending = ids_with(report, Outcome.PENDING).pop()
    assert active(client, pending)
    assert disk_state(mlflow_server, scenario)[pending] != {}


def test_purge_hard_deletes_metadata(mlflow_server: MlflowServer, client: MlflowClient, unique_name: str) -> None:
    scenario = build_scenario(client, unique_name, OLD_LOW)
    store = MlflowStore(client)
    job = CleanupJob(
        store,
        SMALL_POLICY,
        purger=Purger(mlflow_server.backend_store_uri),
        experiments=[scenario.experiment_name],
    )
    report = job.run(datetime.now(UTC))
    assert ids_with(report, Outcome.DELETED) == scenario.ids(["old_a", "old_b"])
    for label in ("old_a", "old_b"):
        with pytest.raises(MlflowException, match=r"not found|RESOURCE_DOES_NOT_EXIST"):
            client.get_run(scenario.run_ids[label])
    assert active(client, scenario.run_ids["keep_best"])
