"""Benchmark: plan retention for 10,000 runs over 50 experiments on a real ``mlflow server`` (target < 60 s).

    python -m tests.benchmarks.cleanup_planning [--runs 10000] [--experiments 50]   # from the repo root

Seeding 10,000 runs through the REST API would take minutes and measure the server's write path, which
is not what this benchmark is about; so the SQLite database is filled in bulk through MLflow's own ORM
models (the same schema the server uses), then a real ``mlflow server`` is started on it and the timed
part — paging every experiment, run, registered model version and logged model over HTTP and building
the plan — runs exactly as ``checkpoint-cleanup`` does. Bounded: the server is given 120 s to start and
is always stopped; only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cleanup.store import RUN_PAGE_SIZE
from tests.support.mlflow_server import start_mlflow_server, stop_mlflow_server
from tests.support.sidecar import free_port

DAY_MS = 86_400_000
TARGET_SECONDS = 60.0
PARAMS_PER_RUN = 8
EXTRA_METRICS = ("loss", "accuracy", "max_drawdown", "annual_return")


def seed(db_uri: str, runs: int, experiments: int, now_ms: int) -> None:
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(db_uri, "mlflow-artifacts:/")  # creates the schema via MLflow's migrations
    experiment_ids = [store.create_experiment(f"bench-{index:02d}") for index in range(experiments)]
    rng = random.Random(42)
    rows: list[object] = []
    for index in range(runs):
        experiment_id = experiment_ids[index % experiments]
        run_id = uuid.uuid4().hex
        start = now_ms - rng.randint(0, 365) * DAY_MS
        rows.append(
            SqlRun(
                run_uuid=run_id,
                name=f"run-{index}",
                experiment_id=int(experiment_id),
                user_id="bench",
                status="FINISHED",
                start_time=start,
                end_time=start + 3_600_000,
                lifecycle_stage="active",
                artifact_uri=f"mlflow-artifacts:/{experiment_id}/{run_id}/artifacts",
                source_type="LOCAL",
                source_name="bench",
            )
        )
        rows.append(SqlTag(key="mlflow.runName", value=f"run-{index}", run_uuid=run_id))
        if index % 97 == 0:
            rows.append(SqlTag(key="stage", value="production", run_uuid=run_id))
        metrics = {"sharpe_ratio": rng.gauss(1.0, 0.8), **{name: rng.random() for name in EXTRA_METRICS}}
        for key, value in metrics.items():
            rows.append(SqlMetric(key=key, value=value, timestamp=start, step=0, is_nan=False, run_uuid=run_id))
            rows.append(SqlLatestMetric(key=key, value=value, timestamp=start, step=0, is_nan=False, run_uuid=run_id))
        rows.extend(SqlParam(key=f"param_{p}", value=str(rng.random()), run_uuid=run_id) for p in range(8))
    with store.ManagedSessionMaker() as session:
        session.add_all(rows)
    store.engine.dispose()


def time_phases(store: Any, now: datetime) -> dict[str, float]:
    """Where planning time goes: one more pass, timing each read and the pure planner separately."""
    from cleanup.lineage import registry_protections
    from cleanup.policy import RetentionPolicy, plan_retention

    phases: dict[str, float] = {}
    mark = time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark
        phases[name] = time.monotonic() - mark
        mark = time.monotonic()

    experiments = store.experiments()
    lap("experiments")
    ids = [e.experiment_id for e in experiments]
    runs = list(store.runs(ids, "sharpe_ratio"))
    lap("runs")
    versions = store.model_versions()
    lap("registry")
    logged = store.logged_models(ids)
    lap("logged models")
    plan_retention(experiments, runs, RetentionPolicy(), now, registry_protections(versions, logged, runs))
    lap("plan (pure)")
    return phases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--experiments", type=int, default=50)
    parser.add_argument("--page-size", type=int, default=RUN_PAGE_SIZE, help="runs per search_runs page")
    parser.add_argument("--registered", type=int, default=20, help="model versions registered over REST")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cleanup-bench-") as workdir:
        root = Path(workdir)
        db_uri = f"sqlite:///{root / 'mlflow.db'}"
        now = datetime.now(UTC)
        started = time.monotonic()
        seed(db_uri, args.runs, args.experiments, int(now.timestamp() * 1000))
        print(f"seeded {args.runs} runs in {args.experiments} experiments in {time.monotonic() - started:.1f}s")

        port = free_port()
        server = start_mlflow_server(db_uri, root / "artifacts", port, root / "server.log")
        try:
            import mlflow
            from mlflow import MlflowClient

            from cleanup.job import CleanupJob
            from cleanup.policy import RetentionPolicy
            from cleanup.store import MlflowStore

            uri = f"http://127.0.0.1:{port}"
            mlflow.set_tracking_uri(uri)
            client = MlflowClient(uri)
            sample = client.search_runs(
                [e.experiment_id for e in client.search_experiments()[:5]], max_results=args.registered
            )
            for index, run in enumerate(sample):
                name = f"bench-model-{index % 4}"
                if index < 4:
                    client.create_registered_model(name)
                version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id)
                client.set_registered_model_alias(name, "champion", version.version)

            store = MlflowStore(client, page_size=args.page_size)
            job = CleanupJob(store, RetentionPolicy())
            started = time.monotonic()  # the first pass on a fresh server: the honest, cold number
            snapshot = job.snapshot(now)
            elapsed = time.monotonic() - started
            phases = time_phases(store, now)
        finally:
            stop_mlflow_server(server)

    print("warm pass by phase: " + ", ".join(f"{name} {seconds:.2f}s" for name, seconds in phases.items()))
    plan = snapshot.plan
    planned = len(plan.decisions)
    print(
        f"cold pass: planned {planned} runs over {len(plan.experiments)} experiments in {elapsed:.2f}s "
        f"(keep {planned - len(plan.to_delete)}, delete {len(plan.to_delete)}); target < {TARGET_SECONDS:.0f}s"
    )
    if planned < args.runs:
        print(f"FAIL: expected at least {args.runs} runs in the plan")
        return 1
    return 0 if elapsed < TARGET_SECONDS else 1


if __name__ == "__main__":
    raise SystemExit(main())
