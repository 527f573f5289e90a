"""Hypothesis: for random run sets the planner never plans a protected, recent, running or top-n run —
and (liveness) it does delete every run that none of the rules keeps."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from cleanup.model import ExperimentRef, RunRecord
from cleanup.policy import RetentionPolicy, plan_retention

NOW = datetime(2025, 6, 1, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
DAY_MS = 86_400_000
EXPERIMENTS = [ExperimentRef("1", "a"), ExperimentRef("2", "b")]
STATUSES = ["FINISHED", "FAILED", "KILLED", "RUNNING", "SCHEDULED"]

metric_values = st.one_of(
    st.none(),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, 1.0, 1.0, 2.0]),  # ties are likely
    st.floats(min_value=-5, max_value=5, allow_nan=False),
)
tag_sets = st.dictionaries(
    st.sampled_from(["stage", "protected", "team"]),
    st.sampled_from(["production", "PRODUCTION", "true", "True", "staging", "false", "quant"]),
    max_size=2,
)


@st.composite
def run_sets(draw: st.DrawFn) -> list[RunRecord]:
    count = draw(st.integers(min_value=0, max_value=25))
    runs: list[RunRecord] = []
    for index in range(count):
        tags = dict(draw(tag_sets))
        if runs and draw(st.booleans()):
            tags["mlflow.parentRunId"] = draw(st.sampled_from(runs)).run_id
        runs.append(
            RunRecord(
                run_id=f"r{index}",
                experiment_id=draw(st.sampled_from(["1", "2"])),
                status=draw(st.sampled_from(STATUSES)),
                start_time_ms=NOW_MS - int(draw(st.floats(min_value=-5, max_value=400)) * DAY_MS),
                metric=draw(metric_values),
                tags=tags,
            )
        )
    return runs


policies = st.builds(
    RetentionPolicy,
    top_n=st.integers(min_value=0, max_value=6),
    metric_mode=st.sampled_from(["max", "min"]),
    retention_days=st.floats(min_value=0, max_value=120),
    allow_missing_metric=st.booleans(),
)


def in_top_n(run: RunRecord, runs: list[RunRecord], policy: RetentionPolicy) -> bool:
    """Reference definition, independent of the planner: fewer than top_n real values are strictly better."""

    def real(value: float | None) -> bool:
        return value is not None and math.isfinite(value)

    if not real(run.metric):
        return False
    assert run.metric is not None
    peers = [r.metric for r in runs if r.experiment_id == run.experiment_id and real(r.metric)]
    better = [v for v in peers if v is not None and (v > run.metric if policy.metric_mode == "max" else v < run.metric)]
    return len(better) < policy.top_n


def directly_kept(run: RunRecord, runs: list[RunRecord], policy: RetentionPolicy, registered: set[str]) -> bool:
    cutoff = NOW_MS - int(policy.retention_days * DAY_MS)
    protected = run.tags.get("stage", "").lower() == "production" or run.tags.get("protected", "").lower() == "true"
    return (
        protected
        or run.run_id in registered
        or run.start_time_ms is None
        or run.start_time_ms >= cutoff
        or run.status not in ("FINISHED", "FAILED", "KILLED")
        or in_top_n(run, runs, policy)
    )


@settings(max_examples=300, deadline=None)
@given(runs=run_sets(), policy=policies, registered=st.sets(st.sampled_from([f"r{i}" for i in range(25)])))
def test_planner_never_deletes_a_protected_recent_running_or_top_n_run(
    runs: list[RunRecord], policy: RetentionPolicy, registered: set[str]
) -> None:
    registry = {run_id: [f"registered m v{run_id}"] for run_id in registered}
    plan = plan_retention(EXPERIMENTS, runs, policy, NOW, registry)
    by_id = {run.run_id: run for run in runs}
    deleted = {d.run.run_id for d in plan.to_delete}

    assert len(plan.decisions) == len(runs)
    for run_id in deleted:
        run = by_id[run_id]
        assert not directly_kept(run, runs, policy, registered), run
        assert not any(by_id[other].tags.get("mlflow.parentRunId") == run_id for other in by_id.keys() - deleted), (
            "a deleted run is the parent of a kept run"
        )

    # Liveness: a run no rule keeps is deleted, unless its experiment has no real metric value at all.
    kept = set(by_id) - deleted
    for run in runs:
        has_metric = any(
            r.metric is not None and math.isfinite(r.metric) for r in runs if r.experiment_id == run.experiment_id
        )
        is_ancestor_of_kept = _is_ancestor_of_any(run.run_id, kept - {run.run_id}, by_id)
        if not directly_kept(run, runs, policy, registered) and not is_ancestor_of_kept:
            assert (run.run_id in deleted) == (has_metric or policy.allow_missing_metric), run


def _is_ancestor_of_any(candidate: str, run_ids: set[str], by_id: dict[str, RunRecord]) -> bool:
    for run_id in run_ids:
        seen = set()
        current = by_id[run_id].tags.get("mlflow.parentRunId")
        while current and current in by_id and current not in seen:
            if current == candidate:
                return True
            seen.add(current)
            current = by_id[current].tags.get("mlflow.parentRunId")
    return False
