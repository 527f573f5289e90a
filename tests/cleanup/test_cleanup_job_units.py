"""The job's small parts on fakes: the keyset cursor, the failure budget, the deletion journal."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cleanup.archive import Archiver
from cleanup.budget import FailureBudget
from cleanup.job import CleanupJob, Outcome
from cleanup.journal import JOURNAL_NAME, DeletionStep, StepKind
from cleanup.policy import RetentionPolicy
from cleanup.store import keyset_pages
from tests.cleanup.fake_server import NOW, Crash, FakeServer


@dataclass(frozen=True)
class Row:
    start: int | None
    run_id: str


class Page(list[Row]):
    token: str | None = None


class FakeSearch:
    """MLflow's semantics for what keyset_pages asks: start_time filters, ascending order with the run id
    as tie-breaker, offset page tokens. ``on_call`` mutates the rows between calls (runs created)."""

    def __init__(self, rows: list[Row], page_size: int, on_call: Any = None) -> None:
        self.rows, self.page_size, self.on_call, self.calls = rows, page_size, on_call, 0

    def __call__(self, filter_string: str, page_token: str | None) -> Page:
        self.calls += 1
        assert self.calls < 1000, "unbounded paging"
        if filter_string:
            op, value = filter_string.removeprefix("attributes.start_time ").split(" ")
            keep = (lambda s: s is not None and s > int(value)) if op == ">" else (lambda s: s == int(value))
            rows = [r for r in self.rows if keep(r.start)]
        else:
            rows = list(self.rows)
        rows.sort(key=lambda r: (r.start is None, r.start or 0, r.run_id))
        offset = int(page_token or 0)
        page = Page(rows[offset : offset + self.page_size])
        page.token = str(offset + self.page_size) if offset + self.page_size < len(rows) else None
        if self.on_call:
            self.on_call(self)
        return page


def read_all(search: FakeSearch) -> list[str]:
    return [row.run_id for row in keyset_pages(search, lambda r: (r.start, r.run_id), search.page_size)]


@given(
    starts=st.lists(st.integers(min_value=0, max_value=6), max_size=40),
    page_size=st.integers(min_value=1, max_value=8),
)
def test_keyset_reads_every_run_once_whatever_the_ties(starts: list[int], page_size: int) -> None:
    rows = [Row(start, f"r{index:03d}") for index, start in enumerate(starts)]
    assert sorted(read_all(FakeSearch(rows, page_size))) == sorted(r.run_id for r in rows)


@given(
    starts=st.lists(st.integers(min_value=0, max_value=30), min_size=1, max_size=40),
    created=st.lists(st.integers(min_value=0, max_value=40), max_size=20),
    page_size=st.integers(min_value=1, max_value=8),
)
def test_keyset_never_skips_an_existing_run_or_repeats_one_while_runs_are_created(
    starts: list[int], created: list[int], page_size: int
) -> None:
    rows = [Row(start, f"r{index:03d}") for index, start in enumerate(starts)]
    existing = {r.run_id for r in rows}
    pending = list(created)

    def create(search: FakeSearch) -> None:
        if pending:
            search.rows.append(Row(pending.pop(), f"new{len(pending):03d}"))

    seen = read_all(FakeSearch(rows, page_size, on_call=create))
    assert len(seen) == len(set(seen))
    assert existing <= set(seen)


@pytest.mark.parametrize("page_size", [2, 3, 4])
def test_runs_without_a_start_time_are_read_when_a_page_reaches_them(page_size: int) -> None:
    # MLflow sorts them last; a page ending on one finishes by offset (see keyset_pages for the limit).
    rows = [Row(None, "a"), Row(None, "b"), Row(1, "c")]
    assert sorted(read_all(FakeSearch(rows, page_size))) == ["a", "b", "c"]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_budget_stops_after_consecutive_failures_and_a_success_resets_it() -> None:
    budget = FailureBudget(max_consecutive_failures=2, clock=Clock())
    budget.start()
    budget.record(True)
    assert budget.exhausted() is None
    budget.record(False)
    budget.record(True)
    assert budget.exhausted() is None
    budget.record(True)
    assert budget.exhausted() == "2 runs in a row failed (is the tracking server reachable?)"


def test_budget_stops_when_the_time_is_up_and_zero_means_no_failure_limit() -> None:
    clock = Clock()
    budget = FailureBudget(max_consecutive_failures=0, max_seconds=30, clock=clock)
    budget.start()
    for _ in range(50):
        budget.record(True)
    assert budget.exhausted() is None
    clock.now += 30
    assert budget.exhausted() == "time budget of 30 s used up after 30 s"


def test_time_budget_leaves_the_rest_pending(tmp_path: Path) -> None:
    clock = Clock()
    server = FakeServer()
    original = server.delete_run

    def slow_delete(run_id: str) -> None:
        original(run_id)
        clock.now += 10

    server.delete_run = slow_delete  # type: ignore[method-assign]
    budget = FailureBudget(max_seconds=15, clock=clock)
    report = CleanupJob(server, RetentionPolicy(top_n=1), budget=budget).run(NOW)
    assert [r.outcome for r in report.results if r.outcome is not Outcome.KEPT] == [
        Outcome.DELETED, Outcome.DELETED, Outcome.PENDING,
    ]  # fmt: skip
    assert report.gave_up and report.failed


def crash_at(kind: StepKind, run_id: str) -> Any:
    def hook(current: str, step: DeletionStep) -> None:
        if current == run_id and step.kind is kind:
            raise Crash(step.key)

    return hook


def test_an_interrupted_deletion_of_a_run_now_kept_is_reported(tmp_path: Path) -> None:
    server = FakeServer()
    job = CleanupJob(
        server, RetentionPolicy(top_n=1), archiver=Archiver(tmp_path, server), before_step=crash_at(StepKind.RUN, "v1")
    )
    with pytest.raises(Crash):
        job.run(NOW)
    run = server.active["v1"]
    server.active["v1"] = type(run)(**{**{f: getattr(run, f) for f in run.__slots__}, "tags": {"protected": "true"}})

    report = CleanupJob(server, RetentionPolicy(top_n=1), archiver=Archiver(tmp_path, server)).run(NOW)

    assert any("v1: an interrupted deletion did" in w and "restore v1" in w for w in report.warnings)
    assert "fake:/models/m-v1" not in server.files, "what the first pass deleted stays deleted"
    assert (tmp_path / "1" / "v1" / "models" / "m-v1" / "model.pkl").is_file(), "and is in the archive"


def test_a_pending_journal_of_a_run_deleted_meanwhile_is_closed(tmp_path: Path) -> None:
    server = FakeServer()
    job = CleanupJob(
        server, RetentionPolicy(top_n=1), archiver=Archiver(tmp_path, server), before_step=crash_at(StepKind.RUN, "v1")
    )
    with pytest.raises(Crash):
        job.run(NOW)
    server.delete_run("v1")  # a user deleted it in the UI

    report = CleanupJob(server, RetentionPolicy(top_n=1), archiver=Archiver(tmp_path, server)).run(NOW)

    assert report.warnings == []
    assert json.loads((tmp_path / "1" / "v1" / JOURNAL_NAME).read_text())["completed_at"]
