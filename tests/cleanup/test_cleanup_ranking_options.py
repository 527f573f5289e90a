"""--metric-mode inferred from a loss-like name (with a warning), and --rank-by last|best, on the real server."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cleanup.job import CleanupJob, Outcome
from cleanup.metric_mode import resolve_metric_mode, suggests_lower_is_better
from cleanup.policy import RetentionPolicy, best_value
from cleanup.store import MlflowStore
from tests.cleanup.cleanup_scenario import RunSpec, build_scenario
from tests.support.mlflow_server import MlflowServer


@pytest.mark.parametrize(
    ("metric", "lower"),
    [("val_loss", True), ("valLoss", True), ("rmse", True), ("max_drawdown", True), ("eval/error_rate", True),
     ("sharpe_ratio", False), ("accuracy", False), ("f1", False), ("precision", False), ("cumulative_return", False)],
)  # fmt: skip
def test_loss_like_names(metric: str, lower: bool) -> None:
    assert suggests_lower_is_better(metric) is lower


def test_metric_mode_is_inferred_with_a_warning_and_an_explicit_max_on_a_loss_is_questioned() -> None:
    mode, warning = resolve_metric_mode("val_loss", None)
    assert mode == "min" and warning and "--metric-mode min" in warning
    assert resolve_metric_mode("sharpe_ratio", None) == ("max", None)
    assert resolve_metric_mode("val_loss", "min") == ("min", None)
    mode, warning = resolve_metric_mode("val_loss", "max")
    assert mode == "max" and warning and "highest val_loss" in warning


def test_best_value_ignores_nan_inf_and_follows_the_mode() -> None:
    history = [0.5, float("nan"), 9.0, float("inf"), sys.float_info.max, 0.3]
    assert best_value(history, "max") == 9.0
    assert best_value(history, "min") == 0.3
    assert best_value([float("nan")], "max") is None


LOSSES = [RunSpec("lowest", 90, (0.1,)), RunSpec("middle", 90, (0.5,)), RunSpec("highest", 90, (0.9,))]


def test_val_loss_without_mode_keeps_the_lowest_and_warns(
    mlflow_server: MlflowServer, unique_name: str, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server.uri)
    specs = [RunSpec(s.label, s.age_days, s.metric) for s in LOSSES]
    scenario = build_scenario(client, unique_name, specs, metric="val_loss")
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "cleanup", "--tracking-uri", mlflow_server.uri, "--experiment",
         scenario.experiment_name, "--metric", "val_loss", "--top-n", "1", "--dry-run", "--report", str(report)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "looks like lower is better" in result.stderr
    document = json.loads(report.read_text())
    assert document["policy"]["metric_mode"] == "min"
    assert any("looks like lower is better" in w for w in document["warnings"])
    outcomes = {r["run_id"]: r["outcome"] for r in document["runs"]}
    assert outcomes[scenario.run_ids["lowest"]] == "kept"
    assert {outcomes[scenario.run_ids[label]] for label in ("middle", "highest")} == {"would-delete"}


@pytest.mark.parametrize(("rank_by", "kept"), [("last", "steady"), ("best", "peaked")])
def test_rank_by_last_or_best(mlflow_server: MlflowServer, unique_name: str, rank_by: str, kept: str) -> None:
    client = MlflowClient(mlflow_server.uri)
    scenario = build_scenario(client, unique_name, [RunSpec("peaked", 90, (9.0, 0.3)), RunSpec("steady", 90, (1.0,))])
    policy = RetentionPolicy(top_n=1, rank_by=rank_by)  # type: ignore[arg-type]
    store = MlflowStore(client, best_of="max" if rank_by == "best" else None)
    report = CleanupJob(store, policy, dry_run=True, experiments=[scenario.experiment_name]).run(datetime.now(UTC))
    kept_ids = {r.decision.run.run_id for r in report.results if r.outcome is Outcome.KEPT}
    assert kept_ids == {scenario.run_ids[kept]}
    assert report.count(Outcome.WOULD_DELETE) == 1
