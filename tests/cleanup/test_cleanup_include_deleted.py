"""--include-deleted frees what users already deleted — runs, and the runs of deleted experiments — except
what a registered model version still needs (real ``mlflow server``)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cleanup.archive import Archiver, verify_archive
from cleanup.job import CleanupJob, Outcome
from cleanup.policy import RetentionPolicy
from cleanup.purge import Purger
from cleanup.store import MlflowStore
from tests.cleanup.cleanup_scenario import METRIC, RunSpec, build_scenario, create_run
from tests.support.mlflow_server import MlflowServer, tree_hashes

POLICY = RetentionPolicy(top_n=5, metric=METRIC, retention_days=30)
SPECS = [
    RunSpec("kept", 90, (1.0,)),
    RunSpec("user_deleted", 2, (0.5,)),  # recent and in the top 5: only the user's deletion frees it
    RunSpec("deleted_but_registered", 90, (0.4,), register="runs-uri"),
]


@pytest.mark.parametrize("purge", [False, True], ids=["soft", "purge"])
def test_include_deleted_frees_user_deleted_runs_and_experiments(
    mlflow_server: MlflowServer, unique_name: str, tmp_path: Path, purge: bool
) -> None:
    client = MlflowClient(mlflow_server.uri)
    scenario = build_scenario(client, unique_name, SPECS)
    gone_experiment = client.create_experiment(f"{unique_name}-gone")
    in_gone = create_run(client, gone_experiment, RunSpec("in_gone", 1, (9.0,)), int(time.time() * 1000), None)
    client.set_terminated(in_gone)
    client.delete_experiment(gone_experiment)
    for label in ("user_deleted", "deleted_but_registered"):
        client.delete_run(scenario.run_ids[label])
    root = mlflow_server.artifact_root
    disk = {
        "user_deleted": root / scenario.experiment_id / scenario.run_ids["user_deleted"] / "artifacts",
        "deleted_but_registered": root / scenario.experiment_id / scenario.run_ids["deleted_but_registered"] / "artifacts",
        "in_gone": root / gone_experiment / in_gone / "artifacts",
    }  # fmt: skip
    before = {label: tree_hashes(path) for label, path in disk.items()}
    assert all(before.values())
    store = MlflowStore(client)
    experiments = [scenario.experiment_name, f"{unique_name}-gone"]

    without = CleanupJob(store, POLICY, dry_run=True, experiments=[scenario.experiment_name]).run(datetime.now(UTC))
    assert {r.decision.run.run_id for r in without.results} == scenario.ids(["kept"])

    archive = tmp_path / "archive"
    job = CleanupJob(
        store, POLICY, archiver=Archiver(archive, store), experiments=experiments, include_deleted=True,
        purger=Purger(mlflow_server.backend_store_uri) if purge else None,
    )  # fmt: skip
    report = job.run(datetime.now(UTC))

    outcomes = {r.decision.run.run_id: (r.outcome, r.decision.reason) for r in report.results}
    freed = {
        scenario.run_ids["user_deleted"]: "delete: deleted by a user",
        in_gone: "delete: its experiment was deleted",
    }
    for run_id, reason in freed.items():
        assert outcomes[run_id] == (Outcome.DELETED, reason)
    registered = scenario.run_ids["deleted_but_registered"]
    assert outcomes[registered] == (Outcome.KEPT, f"registered {scenario.model_name}-legacy v1")
    assert outcomes[scenario.run_ids["kept"]][0] is Outcome.KEPT
    assert report.ok
    assert tree_hashes(disk["user_deleted"]) == tree_hashes(disk["in_gone"]) == {}
    assert tree_hashes(disk["deleted_but_registered"]) == before["deleted_but_registered"]
    assert (
        tree_hashes(archive / scenario.experiment_id / scenario.run_ids["user_deleted"] / "artifacts")
        == before["user_deleted"]
    )
    verify_archive(archive / gone_experiment / in_gone)
    for run_id in freed:
        if purge:
            with pytest.raises(MlflowException, match=r"not found|RESOURCE_DOES_NOT_EXIST"):
                client.get_run(run_id)
        else:
            assert client.get_run(run_id).info.lifecycle_stage == "deleted"
    summary_names = [plan.experiment.name for plan in report.plan.experiments]
    assert f"{scenario.experiment_name} (deleted runs)" in summary_names
