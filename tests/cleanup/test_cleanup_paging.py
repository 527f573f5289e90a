"""Planning while other people create runs: no run is read twice or skipped, and the top-n stays right.

The client is a real ``MlflowClient`` on the real server that, after answering each page of
``search_runs``, creates more runs — new ones (start time now) and back-dated ones (start time in the
middle of what is being paged) — the way a training fleet keeps logging while the cleanup plans.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient

from cleanup.job import CleanupJob
from cleanup.policy import Action, RetentionPolicy
from cleanup.store import MlflowStore
from tests.support.mlflow_server import MlflowServer

DAY_MS = 86_400_000
PAGE_SIZE = 7
EXISTING = 45
CREATED_PER_PAGE = 3
MAX_CREATED = 30  # bounds the load loop


class ClientCreatingRunsDuringSearch(MlflowClient):  # type: ignore[misc]
    def __init__(self, uri: str, experiment_id: str, now_ms: int) -> None:
        super().__init__(uri)
        self.experiment_id = experiment_id
        self.now_ms = now_ms
        self.created: list[str] = []
        self.searches = 0

    def search_runs(self, *args: Any, **kwargs: Any) -> Any:
        page = super().search_runs(*args, **kwargs)
        self.searches += 1
        for i in range(CREATED_PER_PAGE):
            if len(self.created) >= MAX_CREATED:
                break
            back_dated = i % 2 == 1  # lands among the runs still to be paged, or already paged
            start = self.now_ms - (60 + len(self.created)) * DAY_MS if back_dated else self.now_ms
            run = super().create_run(self.experiment_id, start_time=start, run_name=f"late-{len(self.created)}")
            super().log_metric(run.info.run_id, "sharpe_ratio", -100.0)  # worse than every existing run
            super().set_terminated(run.info.run_id)
            self.created.append(run.info.run_id)
        return page


def test_runs_created_during_planning_are_never_skipped_or_duplicated(
    mlflow_server: MlflowServer, unique_name: str
) -> None:
    plain = MlflowClient(mlflow_server.uri)
    experiment_id = plain.create_experiment(unique_name)
    now_ms = int(time.time() * 1000)
    existing: dict[str, float] = {}
    for i in range(EXISTING):
        # Groups of five share one start time, so pages end inside a group of equal keys.
        start = now_ms - (100 + i // 5) * DAY_MS
        run = plain.create_run(experiment_id, start_time=start, run_name=f"r{i}")
        plain.log_metric(run.info.run_id, "sharpe_ratio", float(i))
        plain.set_terminated(run.info.run_id)
        existing[run.info.run_id] = float(i)

    client = ClientCreatingRunsDuringSearch(mlflow_server.uri, experiment_id, now_ms)
    policy = RetentionPolicy(top_n=10, retention_days=30)
    job = CleanupJob(MlflowStore(client, page_size=PAGE_SIZE), policy, experiments=[unique_name])
    plan = job.snapshot(datetime.now(UTC)).plan

    assert client.searches > EXISTING // PAGE_SIZE, "planning must have paged"
    assert client.created, "runs must have been created while paging"
    planned = Counter(d.run.run_id for d in plan.decisions)
    assert [run_id for run_id, n in planned.items() if n > 1] == [], "a run was read twice"
    assert set(existing) <= set(planned), "a run that existed before planning was skipped"
    assert set(planned) <= set(existing) | set(client.created)
    best_ten = sorted(existing, key=existing.__getitem__, reverse=True)[:10]
    ranks = {d.run.run_id: d.rank for d in plan.decisions}
    assert [ranks[run_id] for run_id in best_ten] == list(range(1, 11))
    kept = {d.run.run_id for d in plan.decisions if d.action is Action.KEEP}
    assert set(best_ten) <= kept
    assert set(existing) - set(best_ten) <= {d.run.run_id for d in plan.to_delete}
