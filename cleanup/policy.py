"""The retention policy: runs + policy + now → a plan with a reason for every run (pure, no I/O).

Per experiment, a run is kept if any of these hold (every reason that holds is recorded):

1. it is in the best ``top_n`` by the metric's latest value (competition ranking: a run is in when fewer
   than ``top_n`` runs are strictly better, so runs tied at the cut are all kept; NaN, ±inf and missing
   values are never ranked);
2. it started within ``retention_days`` of ``now`` (a start time in the future or unknown counts as recent);
3. it is protected: by a tag (values compared case-insensitively), by a registered model version, or
   because it is the parent of a kept run;
4. it has not ended (anything but FINISHED/FAILED/KILLED).

Everything else is deleted — unless the experiment has runs but none with a real metric value: then a
typo'd ``--metric`` would turn the policy into "delete everything old", so nothing there is deleted and a
warning is raised (``allow_missing_metric`` overrides).
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Literal

from cleanup.model import ExperimentRef, RunRecord

MetricMode = Literal["max", "min"]
RankBy = Literal["last", "best"]
DEFAULT_PROTECT_TAGS: tuple[tuple[str, str], ...] = (("stage", "production"), ("protected", "true"))
_MS_PER_DAY = 86_400_000


class Action(StrEnum):
    KEEP = "keep"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    top_n: int = 10
    metric: str = "sharpe_ratio"
    metric_mode: MetricMode = "max"
    rank_by: RankBy = "last"  # a run's latest value of the metric, or the best of its history
    retention_days: float = 30.0
    protect_tags: tuple[tuple[str, str], ...] = DEFAULT_PROTECT_TAGS
    allow_missing_metric: bool = False

    def __post_init__(self) -> None:
        if self.top_n < 0:
            raise ValueError("top_n must be >= 0")
        if self.retention_days < 0:
            raise ValueError("retention_days must be >= 0")
        if self.metric_mode not in ("max", "min"):
            raise ValueError("metric_mode must be 'max' or 'min'")
        if self.rank_by not in ("last", "best"):
            raise ValueError("rank_by must be 'last' or 'best'")


@dataclass(frozen=True, slots=True)
class Decision:
    run: RunRecord
    action: Action
    reasons: tuple[str, ...]
    rank: int | None
    age_days: float | None

    @property
    def reason(self) -> str:
        text = ", ".join(self.reasons)
        return f"delete: {text}" if self.action is Action.DELETE else text


@dataclass(frozen=True, slots=True)
class ExperimentPlan:
    experiment: ExperimentRef
    decisions: tuple[Decision, ...]
    warnings: tuple[str, ...] = ()

    @property
    def to_delete(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.action is Action.DELETE)


@dataclass(frozen=True, slots=True)
class Plan:
    now: datetime
    policy: RetentionPolicy
    experiments: tuple[ExperimentPlan, ...]
    warnings: tuple[str, ...] = field(default=())

    @property
    def to_delete(self) -> tuple[Decision, ...]:
        return tuple(d for exp in self.experiments for d in exp.to_delete)

    @property
    def decisions(self) -> tuple[Decision, ...]:
        return tuple(d for exp in self.experiments for d in exp.decisions)


def real_value(value: float | None) -> float | None:
    """The value if it can be ranked; NaN, ±inf and missing rank below every real value.

    MLflow's SQL stores save ±inf as ±sys.float_info.max and hand that back, so those count as inf too.
    """
    if value is None or not math.isfinite(value) or abs(value) >= sys.float_info.max:
        return None
    return value


def best_value(values: Iterable[float], mode: MetricMode) -> float | None:
    """The best real value of a metric's history (``--rank-by best``); ``None`` if it has none."""
    real = [value for raw in values if (value := real_value(raw)) is not None]
    if not real:
        return None
    return max(real) if mode == "max" else min(real)


def competition_ranks(runs: Sequence[RunRecord], mode: MetricMode) -> dict[str, int]:
    """run_id → 1 + number of runs strictly better; runs without a real value are left out."""
    sign = -1.0 if mode == "max" else 1.0
    ranked = sorted(
        ((sign * value, run.run_id) for run in runs if (value := real_value(run.metric)) is not None),
    )
    ranks: dict[str, int] = {}
    previous_key: float | None = None
    previous_rank = 0
    for position, (key, run_id) in enumerate(ranked, start=1):
        rank = previous_rank if key == previous_key else position
        ranks[run_id] = rank
        previous_key, previous_rank = key, rank
    return ranks


def protect_tag_reasons(run: RunRecord, protect_tags: Iterable[tuple[str, str]]) -> list[str]:
    reasons = []
    for key, wanted in protect_tags:
        value = run.tags.get(key)
        if value is not None and value.strip().casefold() == wanted.casefold():
            reasons.append(f"tag {key}={value}")
    return reasons


def _age_days(run: RunRecord, now_ms: int) -> float | None:
    return None if run.start_time_ms is None else (now_ms - run.start_time_ms) / _MS_PER_DAY


def _keep_reasons(
    run: RunRecord,
    rank: int | None,
    *,
    policy: RetentionPolicy,
    cutoff_ms: int,
    registry: Mapping[str, Sequence[str]],
) -> list[str]:
    reasons: list[str] = []
    if rank is not None and rank <= policy.top_n:
        reasons.append(f"top-n rank {rank}")
    if run.start_time_ms is None:
        reasons.append("recent (no start time)")
    elif run.start_time_ms >= cutoff_ms:
        reasons.append("recent")
    reasons.extend(protect_tag_reasons(run, policy.protect_tags))
    reasons.extend(registry.get(run.run_id, ()))
    if not run.is_terminal:
        reasons.append("running" if run.status == "RUNNING" else f"status {run.status}")
    return reasons


def _unranked(run: RunRecord, metric: str) -> str:
    if run.metric is None:
        return f"no {metric}"
    value = run.metric if math.isnan(run.metric) else math.copysign(math.inf, run.metric)
    return f"{metric} is {value}"  # NaN or ±inf (MLflow stores inf as ±float max)


def _delete_reason(run: RunRecord, rank: int | None, age_days: float | None, metric: str) -> str:
    ranked = f"rank {rank}" if rank is not None else _unranked(run, metric)
    return f"{ranked}, {age_days:.0f} days old" if age_days is not None else ranked


def plan_retention(
    experiments: Iterable[ExperimentRef],
    runs: Iterable[RunRecord],
    policy: RetentionPolicy,
    now: datetime,
    registry: Mapping[str, Sequence[str]] | None = None,
) -> Plan:
    """Decide keep/delete for every run; ``registry`` maps run_id → registered-model keep reasons."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    registry = registry or {}
    now_ms = int(now.timestamp() * 1000)
    cutoff_ms = now_ms - int(policy.retention_days * _MS_PER_DAY)

    runs_by_experiment: dict[str, list[RunRecord]] = defaultdict(list)
    for run in runs:
        runs_by_experiment[run.experiment_id].append(run)
    experiment_list = list(experiments)

    reasons: dict[str, list[str]] = {}
    ranks: dict[str, int | None] = {}
    warnings: dict[str, list[str]] = defaultdict(list)
    for experiment in experiment_list:
        exp_runs = runs_by_experiment.get(experiment.experiment_id, [])
        exp_ranks = competition_ranks(exp_runs, policy.metric_mode)
        for run in exp_runs:
            ranks[run.run_id] = exp_ranks.get(run.run_id)
            reasons[run.run_id] = _keep_reasons(
                run, ranks[run.run_id], policy=policy, cutoff_ms=cutoff_ms, registry=registry
            )
            if run.status == "RUNNING" and run.start_time_ms is not None and run.start_time_ms < cutoff_ms:
                warnings[experiment.experiment_id].append(
                    f"run {run.run_id} ({run.name or 'unnamed'}) has been RUNNING for "
                    f"{_age_days(run, now_ms):.0f} days: probably crashed; kept until it is marked "
                    "FAILED or KILLED"
                )

    # The guard comes before parent propagation: a run it keeps must keep its parent too.
    guard_reason = f"no run in experiment has {policy.metric} (see --allow-missing-metric)"
    if not policy.allow_missing_metric:
        for experiment in experiment_list:
            _keep_all_without_metric(runs_by_experiment.get(experiment.experiment_id, []), reasons, guard_reason)

    _keep_parents_of_kept(runs_by_experiment, reasons)

    experiment_plans = []
    for experiment in experiment_list:
        exp_runs = runs_by_experiment.get(experiment.experiment_id, [])
        decisions = []
        for run in exp_runs:
            age = _age_days(run, now_ms)
            if keep := reasons[run.run_id]:
                decisions.append(Decision(run, Action.KEEP, tuple(keep), ranks[run.run_id], age))
            else:
                reason = _delete_reason(run, ranks[run.run_id], age, policy.metric)
                decisions.append(Decision(run, Action.DELETE, (reason,), ranks[run.run_id], age))
        withheld = sum(1 for d in decisions if d.reasons == (guard_reason,))
        if withheld:
            warnings[experiment.experiment_id].append(
                f"experiment {experiment.name!r} has {len(exp_runs)} runs but none logged "
                f"{policy.metric!r}; deleting nothing there ({withheld} runs would have been deleted). "
                "Check --metric, or pass --allow-missing-metric."
            )
        decisions.sort(key=_decision_order)
        experiment_plans.append(
            ExperimentPlan(experiment, tuple(decisions), tuple(warnings.get(experiment.experiment_id, ())))
        )
    all_warnings = tuple(w for plan in experiment_plans for w in plan.warnings)
    return Plan(now, policy, tuple(experiment_plans), all_warnings)


def _keep_all_without_metric(exp_runs: Sequence[RunRecord], reasons: dict[str, list[str]], guard_reason: str) -> None:
    """When no run of an experiment logged the metric (a typo in --metric?), keep every run it would delete."""
    if exp_runs and not any(real_value(r.metric) is not None for r in exp_runs):
        for run in exp_runs:
            if not reasons[run.run_id]:
                reasons[run.run_id].append(guard_reason)


def _keep_parents_of_kept(runs_by_experiment: Mapping[str, Sequence[RunRecord]], reasons: dict[str, list[str]]) -> None:
    """Keep every ancestor of a kept run, so nested runs never lose their parent."""
    parent_of = {
        run.run_id: parent
        for exp_runs in runs_by_experiment.values()
        for run in exp_runs
        if (parent := run.parent_run_id) is not None
    }
    for run_id in [run_id for run_id, keep in reasons.items() if keep]:
        child = run_id
        # `seen` guards against a corrupt (cyclic) parent chain.
        seen = {child}
        while (parent := parent_of.get(child)) is not None and parent in reasons and parent not in seen:
            if "parent of kept" in reasons[parent]:
                break
            reasons[parent].append("parent of kept")
            seen.add(parent)
            child = parent


def _decision_order(decision: Decision) -> tuple[int, int, str]:
    # Ranked runs first, best first; then the unranked, newest first.
    rank = decision.rank if decision.rank is not None else 1 << 30
    start = -(decision.run.start_time_ms or 0)
    return (rank, start, decision.run.run_id)


def plan_already_deleted(
    experiments: Iterable[ExperimentRef],
    runs: Iterable[RunRecord],
    policy: RetentionPolicy,
    now: datetime,
    registry: Mapping[str, Sequence[str]] | None = None,
    deleted_experiment_ids: frozenset[str] = frozenset(),
) -> tuple[ExperimentPlan, ...]:
    """``--include-deleted``: runs users already deleted are freed unless a registered version or a
    protect tag still needs them (``mlflow gc`` frees them regardless and so can break a registered model).
    Ranking and recency do not apply: the user has decided. One plan per experiment, named "(deleted runs)"."""
    registry = registry or {}
    now_ms = int(now.timestamp() * 1000)
    by_experiment: dict[str, list[RunRecord]] = defaultdict(list)
    for run in runs:
        by_experiment[run.experiment_id].append(run)
    plans = []
    for experiment in experiments:
        decisions = []
        why = (
            "its experiment was deleted" if experiment.experiment_id in deleted_experiment_ids else "deleted by a user"
        )
        for run in by_experiment.get(experiment.experiment_id, []):
            keep = [*protect_tag_reasons(run, policy.protect_tags), *registry.get(run.run_id, ())]
            action, reasons = (Action.KEEP, tuple(keep)) if keep else (Action.DELETE, (why,))
            decisions.append(Decision(run, action, reasons, None, _age_days(run, now_ms)))
        if decisions:
            label = ExperimentRef(experiment.experiment_id, f"{experiment.name} (deleted runs)")
            plans.append(ExperimentPlan(label, tuple(sorted(decisions, key=_decision_order))))
    return tuple(plans)
