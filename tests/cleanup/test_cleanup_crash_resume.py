"""A pass that dies between two deletion steps, then a second real pass: the archive never shrinks, every
file in it verifies, and the second pass finishes the deletion (real ``mlflow server``, see conftest)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cleanup.archive import MANIFEST_NAME, SCRATCH_NAME, Archiver, verify_archive
from cleanup.job import CleanupJob, Outcome
from cleanup.journal import JOURNAL_NAME, DeletionStep, StepKind
from cleanup.store import MlflowStore
from tests.cleanup.cleanup_scenario import ONE_VICTIM_POLICY as POLICY
from tests.cleanup.cleanup_scenario import ONE_VICTIM_SPECS as SPECS
from tests.cleanup.cleanup_scenario import Scenario, build_scenario
from tests.cleanup.cleanup_scenario import victim_files_on_server as server_files
from tests.support.mlflow_server import MlflowServer, tree_hashes

# The victim's deletion, in order: its logged model's files, the logged model, its files, the run.
STEPS = (StepKind.MODEL_ARTIFACTS, StepKind.LOGGED_MODEL, StepKind.RUN_ARTIFACTS, StepKind.RUN)


class SimulatedCrash(BaseException):
    """Escapes every ``except Exception`` like a kill would: nothing after the crash point runs."""


def crash_before(kind: StepKind) -> object:
    def hook(run_id: str, step: DeletionStep) -> None:
        if step.kind is kind:
            raise SimulatedCrash(step.key)

    return hook


def manifest(run_archive: Path) -> dict[str, tuple[int, str]]:
    document = json.loads((run_archive / MANIFEST_NAME).read_text())
    return {entry["path"]: (entry["size"], entry["sha256"]) for entry in document["files"]}


def make_job(client: MlflowClient, scenario: Scenario, archive: Path, **options: object) -> CleanupJob:
    store = MlflowStore(client)
    return CleanupJob(
        store, POLICY, archiver=Archiver(archive, store), experiments=[scenario.experiment_name], **options
    )  # type: ignore[arg-type]


def assert_archive_holds(run_archive: Path, originals: dict[str, dict[str, str]]) -> None:
    """Every original file is in the archive, byte for byte, and the whole archive verifies."""
    verify_archive(run_archive)
    for subdir, files in originals.items():
        assert files, f"{subdir}: the scenario gives every tree files"
        assert tree_hashes(run_archive / subdir) == files, subdir


@pytest.mark.parametrize("crash_step", STEPS, ids=[f"before-{kind.value}" for kind in STEPS])
def test_crash_between_deletion_steps_then_second_pass(
    mlflow_server: MlflowServer, unique_name: str, tmp_path: Path, crash_step: StepKind
) -> None:
    client = MlflowClient(mlflow_server.uri)
    scenario = build_scenario(client, unique_name, SPECS)
    victim, model_id = scenario.run_ids["victim"], scenario.logged_model_ids["victim"]
    originals = server_files(mlflow_server.artifact_root, scenario)
    archive = tmp_path / "archive"
    run_archive = archive / scenario.experiment_id / victim

    with pytest.raises(SimulatedCrash):
        make_job(client, scenario, archive, before_step=crash_before(crash_step)).run(datetime.now(UTC))
    first = manifest(run_archive)
    assert_archive_holds(run_archive, originals)
    journal = json.loads((run_archive / JOURNAL_NAME).read_text())
    assert journal["completed_at"] is None
    assert len(journal["done"]) == STEPS.index(crash_step)
    assert client.get_run(victim).info.lifecycle_stage == "active"

    second = make_job(client, scenario, archive).run(datetime.now(UTC))

    result = next(r for r in second.results if r.decision.run.run_id == victim)
    assert result.outcome is Outcome.DELETED, result.detail
    assert result.detail == "resumed an interrupted deletion"
    assert second.ok
    after = manifest(run_archive)
    assert after.items() >= first.items(), "the second pass shrank or changed the archive"
    assert sum(size for size, _ in after.values()) >= sum(size for size, _ in first.values())
    assert_archive_holds(run_archive, originals)
    assert json.loads((run_archive / JOURNAL_NAME).read_text())["completed_at"]
    assert server_files(mlflow_server.artifact_root, scenario) == {"artifacts": {}, f"models/{model_id}": {}}
    experiment_dir = mlflow_server.artifact_root / scenario.experiment_id
    assert not (experiment_dir / victim).exists(), "no empty run folder is left behind"
    assert not (experiment_dir / "models" / model_id).exists()
    assert client.get_run(victim).info.lifecycle_stage == "deleted"
    with pytest.raises(MlflowException, match="not found"):
        client.get_logged_model(model_id)
    assert client.get_run(scenario.run_ids["keep_best"]).info.lifecycle_stage == "active"


KILL_AT_STEP = textwrap.dedent(
    """
    import os, signal, sys
    from datetime import UTC, datetime
    from pathlib import Path
    from mlflow import MlflowClient
    from cleanup.archive import Archiver
    from cleanup.job import CleanupJob
    from cleanup.policy import RetentionPolicy
    from cleanup.store import MlflowStore

    uri, experiment, archive, kill_before = sys.argv[1:5]

    def hook(run_id, step):
        if step.kind.value == kill_before:
            print("killing at", step.key, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # no finally, no atexit: like kill -9 from outside

    store = MlflowStore(MlflowClient(uri))
    policy = RetentionPolicy(top_n=1, metric="sharpe_ratio", retention_days=30)
    CleanupJob(store, policy, archiver=Archiver(Path(archive), store), experiments=[experiment],
               before_step=hook).run(datetime.now(UTC))
    """
)


def test_kill_9_after_the_logged_model_is_deleted_keeps_the_archive(
    mlflow_server: MlflowServer, unique_name: str, tmp_path: Path
) -> None:
    """The issue's reproduction: killed between the logged model's deletion and the run's files."""
    client = MlflowClient(mlflow_server.uri)
    scenario = build_scenario(client, unique_name, SPECS)
    victim = scenario.run_ids["victim"]
    originals = server_files(mlflow_server.artifact_root, scenario)
    archive = tmp_path / "archive"
    run_archive = archive / scenario.experiment_id / victim

    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            KILL_AT_STEP,
            mlflow_server.uri,
            scenario.experiment_name,
            str(archive),
            "run-artifacts",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri},
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert f"killing at run-artifacts:{victim}" in killed.stdout
    first = manifest(run_archive)
    # The server no longer has the logged model's files; only the archive does.
    assert server_files(mlflow_server.artifact_root, scenario)[f"models/{scenario.logged_model_ids['victim']}"] == {}
    assert_archive_holds(run_archive, originals)

    second = make_job(client, scenario, archive).run(datetime.now(UTC))

    assert second.ok
    after = manifest(run_archive)
    assert after.items() >= first.items()
    assert_archive_holds(run_archive, originals)
    assert client.get_run(victim).info.lifecycle_stage == "deleted"


def test_partial_downloads_are_removed_at_the_start_of_a_pass(
    mlflow_server: MlflowServer, unique_name: str, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server.uri)
    scenario = build_scenario(client, unique_name, SPECS[:1])
    archive = tmp_path / "archive"
    leftover = archive / SCRATCH_NAME / "0123abcd-xyz" / "artifacts" / "checkpoint.bin"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"\0" * 100_000)
    staging = archive / scenario.experiment_id / ".0123abcd.partial" / "artifacts" / "x.bin"
    staging.parent.mkdir(parents=True)
    staging.write_bytes(b"\0" * 10)

    dry = make_job(client, scenario, archive, dry_run=True).run(datetime.now(UTC))
    assert dry.ok and leftover.exists(), "a dry run changes nothing, not even scratch space"
    make_job(client, scenario, archive).run(datetime.now(UTC))

    assert list((archive / SCRATCH_NAME).iterdir()) == []
    assert not staging.parent.parent.exists()
