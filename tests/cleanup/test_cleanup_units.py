"""Small pure pieces: registry lineage, the cron loop (injected clock), metrics carry-over, redaction."""

from __future__ import annotations

import io
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cleanup.lineage import registered_logged_model_ids, registry_protections
from cleanup.metrics import CleanupMetrics
from cleanup.model import LoggedModelRef, ModelVersionRef, RunRecord
from cleanup.progress import Progress
from cleanup.redact import redact_text, redact_uri
from cleanup.report import human_bytes
from cleanup.schedule import next_fire_time, run_on_schedule, validate_cron


def _run(run_id: str, artifact_uri: str = "") -> RunRecord:
    return RunRecord(run_id, "1", "FINISHED", 0, artifact_uri=artifact_uri)


def test_lineage_resolves_run_id_runs_uri_logged_model_and_artifact_uri_sources() -> None:
    runs = [_run("a"), _run("b"), _run("c"), _run("d", "mlflow-artifacts:/1/d/artifacts"), _run("e")]
    logged = [LoggedModelRef("m-0123abcd", "1", "ckpt", "c", "mlflow-artifacts:/1/models/m-0123abcd/artifacts")]
    versions = [
        ModelVersionRef("trader", "1", source="s3://bucket/x", run_id="a"),
        ModelVersionRef("trader", "2", source="runs:/b/model", run_id=None, aliases=("champion",)),
        ModelVersionRef("trader", "3", source="models:/m-0123abcd", run_id=None, aliases=("canary", "prod")),
        ModelVersionRef("legacy", "7", source="mlflow-artifacts:/1/d/artifacts/model", run_id=None),
    ]
    assert registry_protections(versions, logged, runs) == {
        "a": ["registered trader v1"],
        "b": ["registered trader v2 @champion"],
        "c": ["registered trader v3 @canary @prod"],
        "d": ["registered legacy v7"],
    }
    assert registered_logged_model_ids(versions) == {"m-0123abcd"}


def test_lineage_ignores_a_prefix_that_is_not_a_path_boundary() -> None:
    runs = [_run("d", "file:///mlruns/1/d/artifacts")]
    version = ModelVersionRef("x", "1", source="file:///mlruns/1/d/artifacts-other/model", run_id=None)
    assert registry_protections([version], [], runs) == {}


class FakeClock:
    """Wall clock that only moves when the scheduler waits (no test sleeps)."""

    def __init__(self, start: datetime) -> None:
        self.now = start
        self.waits: list[float] = []

    def __call__(self) -> datetime:
        return self.now


class AdvancingEvent(threading.Event):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.clock.waits.append(timeout)
        self.clock.now += timedelta(seconds=timeout)
        return self.is_set()


def test_next_fire_time_is_utc_and_strictly_after() -> None:
    at_two = datetime(2025, 1, 1, 2, 0, tzinfo=UTC)
    assert next_fire_time("0 2 * * *", at_two) == at_two + timedelta(days=1)
    assert next_fire_time("0 2 * * *", at_two - timedelta(seconds=1)) == at_two


def test_schedule_fires_at_cron_times_and_skips_times_missed_during_a_long_run() -> None:
    clock = FakeClock(datetime(2025, 1, 1, 0, 30, tzinfo=UTC))
    stop = AdvancingEvent(clock)
    fired: list[datetime] = []

    def job(fire: datetime) -> None:
        fired.append(fire)
        assert clock.now >= fire
        if len(fired) == 1:
            clock.now += timedelta(hours=2, minutes=30)  # runs past the next two fire times
        if len(fired) == 2:
            stop.set()

    runs = run_on_schedule("0 * * * *", job, stop, now=clock, max_wait=600)
    assert runs == 2
    assert fired == [datetime(2025, 1, 1, 1, 0, tzinfo=UTC), datetime(2025, 1, 1, 4, 0, tzinfo=UTC)]
    assert max(clock.waits) <= 600  # long waits are chunked so clock jumps are noticed


def test_schedule_stops_while_waiting() -> None:
    clock = FakeClock(datetime(2025, 1, 1, tzinfo=UTC))
    stop = AdvancingEvent(clock)
    stop.set()
    assert run_on_schedule("0 2 * * *", lambda fire: pytest.fail("must not run"), stop, now=clock) == 0


def test_invalid_cron_is_rejected() -> None:
    with pytest.raises(ValueError, match="cron"):
        validate_cron("0 2 * *")


def test_metrics_carry_counters_and_last_success_over_from_the_previous_textfile(tmp_path: Path) -> None:
    textfile = tmp_path / "cleanup.prom"
    first = CleanupMetrics()
    first.runs_deleted.inc(3)
    first.bytes_freed.inc(4096)
    first.last_success.set(1_700_000_000)
    first.write_textfile(textfile)

    second = CleanupMetrics()
    second.seed_from_textfile(textfile)
    second.runs_deleted.inc(2)
    second.write_textfile(textfile)
    text = textfile.read_text()
    assert "checkpoint_cleanup_runs_deleted_total 5.0" in text
    assert "checkpoint_cleanup_bytes_freed_total 4096.0" in text
    assert "checkpoint_cleanup_last_success_timestamp_seconds 1.7e+09" in text


def test_metrics_ignore_a_missing_or_garbled_textfile(tmp_path: Path) -> None:
    metrics = CleanupMetrics()
    metrics.seed_from_textfile(tmp_path / "absent.prom")
    (tmp_path / "bad.prom").write_text("this is { not prometheus\n")
    metrics.seed_from_textfile(tmp_path / "bad.prom")
    assert metrics.runs_deleted._value.get() == 0


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("https://user:s3cret@mlflow.example:5000/path?token=abc", "https://mlflow.example:5000/path"),
        ("postgresql://mlflow:pw@db:5432/mlflow", "postgresql://db:5432/mlflow"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("http://mlflow:5000", "http://mlflow:5000"),
    ],
)
def test_credentials_never_appear_in_shown_uris(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown


def test_credentials_are_masked_in_free_text() -> None:
    message = "API request to https://bob:pw@mlflow:5000/api failed; db postgresql://u:p@db/x?password=hunter2"
    masked = redact_text(message)
    assert "pw@" not in masked
    assert "u:p@" not in masked
    assert "hunter2" not in masked
    assert "https://***@mlflow:5000/api" in masked


def test_human_bytes() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(3 * 1024 * 1024) == "3.0 MiB"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_on_a_terminal_only() -> None:
    terminal = _Terminal()
    bar = Progress(4, "cleanup", stream=terminal, width=8)
    for _ in range(4):
        bar.advance("run")
    bar.close()
    assert "[########] 4/4" in terminal.getvalue()
    assert "[##------] 1/4" in terminal.getvalue()

    pipe = io.StringIO()
    quiet = Progress(4, "cleanup", stream=pipe)
    quiet.advance()
    quiet.close()
    assert pipe.getvalue() == ""  # container logs stay clean
