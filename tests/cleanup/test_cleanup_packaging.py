"""The container ships ``mlflow-skinny`` only, and the laptop default is a local ``sqlite:///`` store."""

from __future__ import annotations

import ast
import importlib.metadata
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cleanup.job import CleanupJob, Outcome
from cleanup.policy import RetentionPolicy
from cleanup.store import MlflowStore
from tests.cleanup.cleanup_scenario import write_artifacts
from tests.support.mlflow_server import tree_hashes

PACKAGE = Path(__file__).resolve().parents[2] / "cleanup"


def mlflow_imports() -> set[str]:
    modules = set()
    for source in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mlflow":
                modules.add(node.module)
            elif isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names if alias.name.split(".")[0] == "mlflow")
    return modules


def test_cleanup_imports_only_modules_that_mlflow_skinny_ships() -> None:
    try:
        shipped = {str(path) for path in importlib.metadata.files("mlflow-skinny") or []}
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("mlflow-skinny is not installed as its own distribution")
    modules = mlflow_imports()
    assert "mlflow.tracking" in modules
    for module in modules:
        as_path = module.replace(".", "/")
        assert f"{as_path}.py" in shipped or f"{as_path}/__init__.py" in shipped, f"{module} is not in mlflow-skinny"


def test_local_sqlite_store_with_local_artifacts(tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("laptop", artifact_location=(tmp_path / "mlruns").as_uri())
    now_ms = int(time.time() * 1000)
    run_ids = {}
    for label, metric in (("best", 2.0), ("old", 1.0)):
        run = client.create_run(experiment_id, start_time=now_ms - 90 * 86_400_000, run_name=label)
        client.log_metric(run.info.run_id, "sharpe_ratio", metric)
        scratch = tmp_path / "scratch" / label
        write_artifacts(scratch, label)
        client.log_artifacts(run.info.run_id, str(scratch))
        client.set_terminated(run.info.run_id)
        run_ids[label] = run.info.run_id
    artifact_dir = {label: tmp_path / "mlruns" / run_id / "artifacts" for label, run_id in run_ids.items()}
    best_before = tree_hashes(artifact_dir["best"])
    assert tree_hashes(artifact_dir["old"])

    report = CleanupJob(MlflowStore(client), RetentionPolicy(top_n=1), experiments=["laptop"]).run(datetime.now(UTC))

    assert {r.decision.run.run_id for r in report.results if r.outcome is Outcome.DELETED} == {run_ids["old"]}
    assert tree_hashes(artifact_dir["old"]) == {}
    assert tree_hashes(artifact_dir["best"]) == best_before
