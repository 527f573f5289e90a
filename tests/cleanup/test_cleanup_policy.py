"""The pure planner on plain data: ranking, ties, time, protection, nesting, the missing-metric guard."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

import pytest

from cleanup.model import ExperimentRef, RunRecord
from cleanup.policy import Action, Plan, RetentionPolicy, competition_ranks, plan_retention

NOW = datetime(2025, 6, 1, 2, 0, tzinfo=UTC)
EXP = ExperimentRef("1", "trader")
DAY_MS = 86_400_000
NOW_MS = int(NOW.timestamp() * 1000)


def run(
    run_id: str,
    *,
    days_old: float = 90,
    metric: float | None = None,
    status: str = "FINISHED",
    tags: dict[str, str] | None = None,
    experiment_id: str = "1",
) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        experiment_id=experiment_id,
        status=status,
        start_time_ms=NOW_MS - int(days_old * DAY_MS),
        metric=metric,
        tags=tags or {},
    )


def plan(runs: list[RunRecord], registry: dict[str, list[str]] | None = None, **policy: object) -> Plan:
    return plan_retention([EXP], runs, RetentionPolicy(**policy), NOW, registry)  # type: ignore[arg-type]


def deleted(result: Plan) -> set[str]:
    return {d.run.run_id for d in result.to_delete}


def reason(result: Plan, run_id: str) -> str:
    return next(d.reason for d in result.decisions if d.run.run_id == run_id)


def test_keeps_the_best_n_by_latest_value_and_deletes_the_rest() -> None:
    runs = [run(f"r{i}", metric=float(i)) for i in range(6)]
    result = plan(runs, top_n=2)
    assert deleted(result) == {"r0", "r1", "r2", "r3"}
    assert reason(result, "r5") == "top-n rank 1"
    assert reason(result, "r3") == "delete: rank 3, 90 days old"


def test_min_mode_keeps_the_lowest() -> None:
    runs = [run(f"r{i}", metric=float(i)) for i in range(4)]
    assert deleted(plan(runs, top_n=1, metric_mode="min")) == {"r1", "r2", "r3"}


def test_runs_tied_at_the_cut_are_all_kept() -> None:
    runs = [run("a", metric=3.0), run("b", metric=2.0), run("c", metric=2.0), run("d", metric=1.0)]
    result = plan(runs, top_n=2)
    assert deleted(result) == {"d"}
    assert reason(result, "c") == "top-n rank 2"
    assert reason(result, "d") == "delete: rank 4, 90 days old"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), sys.float_info.max, None])
def test_nan_inf_and_missing_rank_below_every_real_value(value: float | None) -> None:
    runs = [run("real", metric=-1e9), run("odd", metric=value)]
    result = plan(runs, top_n=1)
    assert deleted(result) == {"odd"}
    assert reason(result, "odd").startswith("delete: no sharpe_ratio" if value is None else "delete: sharpe_ratio is ")
    assert reason(result, "odd").endswith(", 90 days old")


def test_competition_ranks() -> None:
    runs = [run("a", metric=5), run("b", metric=5), run("c", metric=4), run("d", metric=float("nan"))]
    assert competition_ranks(runs, "max") == {"a": 1, "b": 1, "c": 3}
    assert competition_ranks(runs, "min") == {"c": 1, "a": 2, "b": 2}


def test_recent_is_inclusive_at_the_cutoff_and_future_counts_as_recent() -> None:
    runs = [
        run("edge", days_old=30, metric=0),
        run("just_old", days_old=30.001, metric=0),
        run("future", days_old=-3, metric=0),
        run("best", metric=1),
    ]
    result = plan(runs, top_n=1, retention_days=30)
    assert deleted(result) == {"just_old"}
    assert reason(result, "future") == "recent"


def test_unknown_start_time_is_kept() -> None:
    unknown = RunRecord("u", "1", "FINISHED", start_time_ms=None, metric=0.0)
    assert deleted(plan([unknown, run("best", metric=1)], top_n=1)) == set()


def test_protect_tags_match_values_case_insensitively() -> None:
    runs = [
        run("prod", metric=0, tags={"stage": "Production"}),
        run("prot", metric=0, tags={"protected": "TRUE"}),
        run("custom", metric=0, tags={"owner": "Risk-Team"}),
        run("other", metric=0, tags={"stage": "staging", "protected": "false"}),
        run("best", metric=1),
    ]
    result = plan(runs, top_n=1, protect_tags=(("stage", "production"), ("protected", "true"), ("owner", "risk-team")))
    assert deleted(result) == {"other"}
    assert reason(result, "prod") == "tag stage=Production"


def test_registered_runs_are_kept_with_the_registry_reason() -> None:
    runs = [run("reg", metric=0), run("best", metric=1)]
    result = plan(runs, registry={"reg": ["registered trader v4 @champion"]}, top_n=1)
    assert deleted(result) == set()
    assert reason(result, "reg") == "registered trader v4 @champion"


@pytest.mark.parametrize("status", ["RUNNING", "SCHEDULED"])
def test_unfinished_runs_are_never_deleted(status: str) -> None:
    result = plan([run("live", metric=0, status=status), run("best", metric=1)], top_n=1)
    assert deleted(result) == set()


def test_old_running_run_is_reported_as_probably_crashed() -> None:
    result = plan([run("stuck", days_old=45, status="RUNNING", metric=0), run("best", metric=1)], top_n=1)
    assert reason(result, "stuck") == "running"
    assert len(result.warnings) == 1
    assert "stuck" in result.warnings[0]
    assert "probably crashed" in result.warnings[0]


def test_ancestors_of_kept_runs_are_kept() -> None:
    grandparent = run("gp", metric=0)
    parent = run("p", metric=0, tags={"mlflow.parentRunId": "gp"})
    child = run("c", days_old=1, metric=0, tags={"mlflow.parentRunId": "p"})
    sibling = run("s", metric=0, tags={"mlflow.parentRunId": "p"})
    result = plan([grandparent, parent, child, sibling, run("best", metric=9)], top_n=1)
    assert deleted(result) == {"s"}
    assert reason(result, "gp") == "parent of kept"
    assert reason(result, "p") == "parent of kept"


def test_cyclic_parent_tags_do_not_hang() -> None:
    a = run("a", days_old=1, metric=0, tags={"mlflow.parentRunId": "b"})
    b = run("b", metric=0, tags={"mlflow.parentRunId": "a"})
    assert deleted(plan([a, b], top_n=0)) == set()


def test_experiment_without_the_metric_deletes_nothing_and_warns() -> None:
    runs = [run("a"), run("b"), run("c", days_old=1)]
    result = plan(runs, top_n=1)
    assert deleted(result) == set()
    assert "none logged 'sharpe_ratio'" in result.warnings[0]
    assert reason(result, "a").startswith("no run in experiment has sharpe_ratio")


def test_a_run_kept_by_the_guard_keeps_its_parent_in_another_experiment() -> None:
    metricless = ExperimentRef("2", "metricless")
    parent = run("p", metric=0.0)  # experiment 1, would be deleted (rank 2)
    child = run("c", experiment_id="2", tags={"mlflow.parentRunId": "p"})  # kept by the guard
    result = plan_retention([EXP, metricless], [run("best", metric=1), parent, child], RetentionPolicy(top_n=1), NOW)
    assert deleted(result) == set()
    assert reason(result, "p") == "parent of kept"


def test_allow_missing_metric_overrides_the_guard() -> None:
    result = plan([run("a"), run("b"), run("c", days_old=1)], top_n=1, allow_missing_metric=True)
    assert deleted(result) == {"a", "b"}
    assert result.warnings == ()


def test_experiments_are_ranked_separately() -> None:
    other = ExperimentRef("2", "other")
    runs = [run("a1", metric=10), run("a2", metric=9), run("b1", metric=1, experiment_id="2")]
    result = plan_retention([EXP, other], runs, RetentionPolicy(top_n=1), NOW)
    assert deleted(result) == {"a2"}


def test_every_reason_that_holds_is_recorded() -> None:
    result = plan([run("x", days_old=1, metric=5, tags={"protected": "true"})], top_n=1)
    assert result.decisions[0].action is Action.KEEP
    assert result.decisions[0].reasons == ("top-n rank 1", "recent", "tag protected=true")


def test_now_must_be_timezone_aware() -> None:
    with pytest.raises(ValueError, match="timezone"):
        plan_retention([EXP], [], RetentionPolicy(), datetime(2025, 1, 1))


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RetentionPolicy(top_n=-1)
    with pytest.raises(ValueError):
        RetentionPolicy(retention_days=-1)


def test_plan_is_deterministic_and_ordered_best_first() -> None:
    runs = [run(f"r{i}", metric=float(i % 5), days_old=40 + i) for i in range(20)]
    first, second = plan(runs, top_n=3), plan(list(reversed(runs)), top_n=3)
    assert [d.run.run_id for d in first.decisions] == [d.run.run_id for d in second.decisions]
    assert first.decisions[0].rank == 1
    assert NOW - timedelta(days=0) == first.now
