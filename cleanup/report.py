"""Human and machine output of a cleanup: the per-experiment summary table and the JSON report."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cleanup.job import Outcome, Report
from cleanup.redact import redact_text, redact_uri

# Keep-reason prefixes → the summary column they count in.
_REASON_COLUMNS = (
    ("top-n", "top-n"),
    ("recent", "recent"),
    ("tag ", "protected"),
    ("registered ", "registered"),
    ("running", "running"),
    ("status ", "running"),
    ("parent of kept", "parent"),
    ("no run in experiment has", "no metric"),
)
_COLUMNS = ("top-n", "recent", "protected", "registered", "running", "parent", "no metric")


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def reason_columns(reasons: Iterable[str]) -> set[str]:
    return {column for reason in reasons for prefix, column in _REASON_COLUMNS if reason.startswith(prefix)}


def summary_table(report: Report) -> str:
    """One line per experiment: kept by reason (a run kept for two reasons counts in both), deleted, freed."""
    deleted_label = "would delete" if report.dry_run else "deleted"
    freed_label = "would free" if report.dry_run else "freed"
    header = ["experiment", "runs", "kept", *_COLUMNS, deleted_label, "failed", "skipped", freed_label]
    rows: list[list[str]] = []
    by_run = {result.decision.run.run_id: result for result in report.results}
    totals: Counter[str] = Counter()
    for experiment_plan in report.plan.experiments:  # an experiment may have a second, "(deleted runs)", plan
        experiment = experiment_plan.experiment
        results = [by_run[d.run.run_id] for d in experiment_plan.decisions if d.run.run_id in by_run]
        counts: Counter[str] = Counter()
        for result in results:
            counts["runs"] += 1
            counts[result.outcome.value] += 1
            if result.outcome is Outcome.KEPT:
                counts.update(reason_columns(result.decision.reasons))
            if result.outcome in (Outcome.DELETED, Outcome.WOULD_DELETE):
                counts["bytes"] += result.bytes
        totals.update(counts)
        rows.append(_row(f"{experiment.name} ({experiment.experiment_id})", counts))
    rows.append(_row("TOTAL", totals))
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _row(name: str, counts: Counter[str]) -> list[str]:
    deleted = counts[Outcome.DELETED.value] + counts[Outcome.WOULD_DELETE.value]
    return [
        name,
        str(counts["runs"]),
        str(counts[Outcome.KEPT.value]),
        *(str(counts[column]) for column in _COLUMNS),
        str(deleted),
        str(counts[Outcome.FAILED.value]),
        str(counts[Outcome.SKIPPED.value] + counts[Outcome.PENDING.value] + counts[Outcome.ABORTED.value]),
        human_bytes(counts["bytes"]),
    ]


def deletion_list(report: Report) -> str:
    """The runs deleted (or, in a dry run, to be deleted), one per line with the reason."""
    lines = []
    for result in report.results:
        if result.outcome is Outcome.KEPT:
            continue
        run = result.decision.run
        line = f"{result.outcome.value:<12} {run.run_id}  {run.name or '-'}  {result.decision.reason}"
        if result.bytes:
            line += f"  ({human_bytes(result.bytes)})"
        if result.detail:
            line += f"  [{result.detail}]"
        lines.append(line)
    return "\n".join(lines)


def report_document(report: Report, tracking_uri: str) -> dict[str, Any]:
    names = {exp.experiment.experiment_id: exp.experiment.name for exp in report.plan.experiments}
    runs = []
    for result in report.results:
        decision, run = result.decision, result.decision.run
        runs.append(
            {
                "run_id": run.run_id,
                "run_name": run.name,
                "experiment_id": run.experiment_id,
                "experiment_name": names.get(run.experiment_id, ""),
                "status": run.status,
                "start_time": _iso(run.start_time_ms),
                "age_days": None if decision.age_days is None else round(decision.age_days, 3),
                "metric": report.plan.policy.metric,
                "metric_value": _json_number(run.metric),
                "rank": decision.rank,
                "decision": decision.action.value,
                "reason": decision.reason,
                "reasons": list(decision.reasons),
                "outcome": result.outcome.value,
                "detail": result.detail,
                "bytes": result.bytes,
                "archive": result.archive,
                "logged_models": list(result.logged_models),
            }
        )
    return {
        "generated_at": datetime.now(UTC).isoformat(),
        "planned_at": report.plan.now.isoformat(),
        "tracking_uri": redact_uri(tracking_uri),
        "dry_run": report.dry_run,
        "ok": report.ok,
        "interrupted": report.interrupted,
        "gave_up": report.gave_up,
        "policy": asdict(report.plan.policy),
        "totals": {
            "runs": len(report.results),
            **{outcome.value: report.count(outcome) for outcome in Outcome},
            "bytes_freed": report.bytes_freed,
            "planning_seconds": round(report.planning_seconds, 3),
            "apply_seconds": round(report.apply_seconds, 3),
        },
        "warnings": [*report.plan.warnings, *report.warnings],
        "runs": runs,
    }


def failure_document(error: BaseException, tracking_uri: str, started: datetime) -> dict[str, Any]:
    """The report of a pass that could not plan (e.g. the server was unreachable): no runs, the error."""
    return {
        "generated_at": datetime.now(UTC).isoformat(),
        "planned_at": started.isoformat(),
        "tracking_uri": redact_uri(tracking_uri),
        "ok": False,
        "error": redact_text(f"{type(error).__name__}: {error}"),
        "runs": [],
    }


def write_report(path: Path, report: Report, tracking_uri: str) -> None:
    write_document(path, report_document(report, tracking_uri))


def write_document(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(temporary, path)  # atomic: a reader never sees half a report


def _iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def _json_number(value: float | None) -> float | str | None:
    # JSON has no NaN/inf; spell them out rather than emit invalid JSON.
    if value is None or math.isfinite(value):
        return value
    return str(value)
