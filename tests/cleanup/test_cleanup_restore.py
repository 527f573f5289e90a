"""``checkpoint-cleanup restore``: delete with an archive, restore, and get the same bytes back (real server)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from cleanup.archive import Archiver
from cleanup.job import CleanupJob, Outcome
from cleanup.purge import Purger
from cleanup.restore import RESTORED_FROM_TAG
from cleanup.store import MlflowStore
from tests.cleanup.cleanup_scenario import ONE_VICTIM_POLICY, ONE_VICTIM_SPECS, build_scenario, victim_files_on_server
from tests.support.mlflow_server import MlflowServer, tree_hashes


def restore(uri: str, run_id: str, archive: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cleanup", "restore", run_id, "--archive-path", str(archive), "--tracking-uri", uri,
         *extra],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("purged", [False, True], ids=["soft-deleted", "purged"])
def test_restore_round_trip(mlflow_server: MlflowServer, unique_name: str, tmp_path: Path, purged: bool) -> None:
    client = MlflowClient(mlflow_server.uri)
    scenario = build_scenario(client, unique_name, ONE_VICTIM_SPECS)
    victim, model_id = scenario.run_ids["victim"], scenario.logged_model_ids["victim"]
    client.log_param(victim, "lr", "0.01")
    originals = victim_files_on_server(mlflow_server.artifact_root, scenario)
    archive = tmp_path / "archive"
    store = MlflowStore(client)
    purger = Purger(mlflow_server.backend_store_uri) if purged else None
    job = CleanupJob(
        store, ONE_VICTIM_POLICY, archiver=Archiver(archive, store), purger=purger,
        experiments=[scenario.experiment_name],
    )  # fmt: skip
    assert {r.decision.run.run_id for r in job.run(datetime.now(UTC)).results if r.outcome is Outcome.DELETED} == {
        victim
    }
    assert victim_files_on_server(mlflow_server.artifact_root, scenario) == {
        "artifacts": {},
        f"models/{model_id}": {},
    }

    listing = subprocess.run(
        [sys.executable, "-m", "cleanup", "restore", "--list", "--archive-path", str(archive)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    (line,) = listing.stdout.splitlines()
    assert line.startswith(f"{victim}  ") and "  done  " in line and "  victim" in line

    result = restore(mlflow_server.uri, victim, archive, "--report", str(tmp_path / "restore.json"))

    assert result.returncode == 0, result.stderr
    mapping = json.loads(result.stdout)
    assert mapping == json.loads((tmp_path / "restore.json").read_text())
    restored = mapping["restored_run_id"]
    assert mapping["how"] == ("recreated" if purged else "restored in place")
    assert (restored != victim) is purged
    run = client.get_run(restored)
    assert run.info.lifecycle_stage == "active"
    assert run.data.params["lr"] == "0.01"
    assert run.data.metrics["sharpe_ratio"] == 0.1
    if purged:
        assert run.data.tags[RESTORED_FROM_TAG] == victim
    downloaded = tree_hashes(Path(client.download_artifacts(restored, "", dst_path=str(tmp_path / "run"))))
    assert downloaded == originals["artifacts"]
    new_model = mapping["logged_models"][model_id]
    assert new_model != model_id
    assert client.get_logged_model(new_model).source_run_id == restored
    model_files = tree_hashes(
        Path(mlflow.artifacts.download_artifacts(f"models:/{new_model}", dst_path=str(tmp_path / "m")))
    )
    model_files.pop("registered_model_meta", None)  # MLflow writes this beside a downloaded model
    assert model_files == originals[f"models/{model_id}"]
    assert mapping["files"] == len(originals["artifacts"]) + len(originals[f"models/{model_id}"])


def test_restore_refuses_a_damaged_archive(mlflow_server: MlflowServer, unique_name: str, tmp_path: Path) -> None:
    client = MlflowClient(mlflow_server.uri)
    scenario = build_scenario(client, unique_name, ONE_VICTIM_SPECS)
    victim = scenario.run_ids["victim"]
    archive = tmp_path / "archive"
    store = MlflowStore(client)
    CleanupJob(store, ONE_VICTIM_POLICY, archiver=Archiver(archive, store), experiments=[scenario.experiment_name]).run(
        datetime.now(UTC)
    )
    checkpoint = archive / scenario.experiment_id / victim / "artifacts" / "checkpoint.bin"
    checkpoint.write_bytes(b"bit rot" + checkpoint.read_bytes()[7:])

    result = restore(mlflow_server.uri, victim, archive)

    assert result.returncode == 1
    assert "SHA-256 differs" in result.stderr
    assert client.get_run(victim).info.lifecycle_stage == "deleted", "nothing was restored"
