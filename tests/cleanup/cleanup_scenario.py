"""Builds the acceptance scenario on a real MLflow server: one experiment mixing every kind of run the
policy distinguishes, and one experiment whose runs never logged the metric."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

from cleanup.policy import RetentionPolicy
from tests.support.mlflow_server import tree_hashes

DAY_MS = 86_400_000
METRIC = "sharpe_ratio"


@dataclass(frozen=True)
class RunSpec:
    label: str
    age_days: float
    metric: tuple[float, ...] = ()  # values in step order; the last one is "latest"
    status: str = "FINISHED"
    tags: dict[str, str] = field(default_factory=dict)
    parent: str | None = None
    deleted: bool = False  # what the policy (top_n=3, 30 days, --protect-tag keep=forever) must do
    checkpoint_step: int | None = None  # log an MLflow 3 logged model with log_model(..., step=)
    register: str | None = None  # "logged-model" or "runs-uri"


MIXED = [
    RunSpec("best", 90, (3.0,)),
    RunSpec("second", 90, (2.5,)),
    RunSpec("tie_a", 90, (2.0,)),
    RunSpec("tie_b", 91, (2.0,)),
    RunSpec("fifth", 90, (1.5,), deleted=True),
    RunSpec("degraded", 90, (9.0, 0.3), deleted=True),  # ranked on its latest value, not its best
    RunSpec("nan", 90, (float("nan"),), deleted=True),
    RunSpec("inf", 90, (float("inf"),), deleted=True),
    RunSpec("no_metric", 90, deleted=True),
    RunSpec("failed", 90, (0.1,), status="FAILED", deleted=True),
    RunSpec("killed", 90, (0.1,), status="KILLED", deleted=True),
    RunSpec("checkpointed", 90, (0.2,), checkpoint_step=100, deleted=True),
    RunSpec("recent", 5, (0.0,)),
    RunSpec("future", -2, (0.0,)),
    RunSpec("production", 90, (0.0,), tags={"stage": "Production"}),
    RunSpec("protected", 90, (0.0,), tags={"protected": "TRUE"}),
    RunSpec("custom_tag", 90, (0.0,), tags={"keep": "forever"}),
    RunSpec("registered", 90, (0.0,), checkpoint_step=200, register="logged-model"),
    RunSpec("registered_runs_uri", 90, (0.0,), register="runs-uri"),
    RunSpec("crashed", 90, (0.0,), status="RUNNING"),
    RunSpec("parent", 90),
    RunSpec("child_recent", 3, (0.0,), parent="parent"),
    RunSpec("child_old", 90, (0.05,), parent="parent", deleted=True),
]
METRICLESS = [RunSpec("m_old_1", 90), RunSpec("m_old_2", 120)]


class EchoModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    def predict(self, context: Any, model_input: Any) -> Any:
        return model_input


@dataclass
class Scenario:
    client: MlflowClient
    experiment_id: str
    experiment_name: str
    metricless_experiment_id: str
    metricless_experiment_name: str
    model_name: str
    run_ids: dict[str, str]
    logged_model_ids: dict[str, str]
    specs: dict[str, RunSpec]

    @property
    def experiment_names(self) -> list[str]:
        return [self.experiment_name, self.metricless_experiment_name]

    def ids(self, labels: set[str] | list[str]) -> set[str]:
        return {self.run_ids[label] for label in labels}

    @property
    def expected_deleted(self) -> set[str]:
        return self.ids([s.label for s in self.specs.values() if s.deleted])

    @property
    def expected_kept(self) -> set[str]:
        return set(self.run_ids.values()) - self.expected_deleted


def write_artifacts(directory: Path, label: str) -> None:
    (directory / "meta").mkdir(parents=True, exist_ok=True)
    (directory / "checkpoint.bin").write_bytes(os.urandom(4096 + len(label)))
    (directory / "meta" / "config.json").write_text(f'{{"label": "{label}"}}\n')


def create_run(
    client: MlflowClient, experiment_id: str, spec: RunSpec, now_ms: int, parent_id: str | None, metric: str = METRIC
) -> str:
    tags = dict(spec.tags)
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    run = client.create_run(
        experiment_id, start_time=now_ms - int(spec.age_days * DAY_MS), tags=tags, run_name=spec.label
    )
    run_id: str = run.info.run_id
    for step, value in enumerate(spec.metric):
        client.log_metric(run_id, metric, value, step=step)
    with tempfile.TemporaryDirectory() as scratch:
        write_artifacts(Path(scratch), spec.label)
        client.log_artifacts(run_id, scratch)
    return run_id


def build_scenario(client: MlflowClient, name: str, specs: list[RunSpec] = MIXED, *, metric: str = METRIC) -> Scenario:
    now_ms = int(time.time() * 1000)
    experiment_id = client.create_experiment(name)
    metricless_name = f"{name}-metricless"
    metricless_id = client.create_experiment(metricless_name)
    model_name = f"{name}-trader"
    run_ids: dict[str, str] = {}
    logged: dict[str, str] = {}
    for spec in specs:  # parents are listed before their children
        run_id = create_run(client, experiment_id, spec, now_ms, run_ids.get(spec.parent or ""), metric)
        run_ids[spec.label] = run_id
        if spec.checkpoint_step is not None:
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name="checkpoint", python_model=EchoModel(), step=spec.checkpoint_step, pip_requirements=[]
                )
            logged[spec.label] = info.model_id
        if spec.register == "logged-model":
            version = mlflow.register_model(f"models:/{logged[spec.label]}", model_name)
            client.set_registered_model_alias(model_name, "champion", version.version)
        elif spec.register == "runs-uri":
            client.create_registered_model(f"{model_name}-legacy")
            client.create_model_version(f"{model_name}-legacy", f"runs:/{run_id}/meta", run_id=run_id)
        if spec.status != "RUNNING":
            client.set_terminated(run_id, spec.status)
    for spec in METRICLESS:
        run_ids[spec.label] = create_run(client, metricless_id, spec, now_ms, None)
        client.set_terminated(run_ids[spec.label], "FINISHED")
    all_specs = {spec.label: spec for spec in [*specs, *METRICLESS]}
    return Scenario(client, experiment_id, name, metricless_id, metricless_name, model_name, run_ids, logged, all_specs)


# One run to delete, with an MLflow 3 logged model (checkpoint), beside the one run that top-n keeps.
ONE_VICTIM_SPECS = [RunSpec("keep_best", 90, (1.0,)), RunSpec("victim", 90, (0.1,), checkpoint_step=7)]
ONE_VICTIM_POLICY = RetentionPolicy(top_n=1, metric=METRIC, retention_days=30)


def victim_files_on_server(artifact_root: Path, scenario: Scenario) -> dict[str, dict[str, str]]:
    """The victim's files on the server's disk, keyed like its archive: artifacts/, models/<id>/."""
    victim, model = scenario.run_ids["victim"], scenario.logged_model_ids["victim"]
    root = artifact_root / scenario.experiment_id
    return {
        "artifacts": tree_hashes(root / victim / "artifacts"),
        f"models/{model}": tree_hashes(root / "models" / model / "artifacts"),
    }
