"""The ``checkpoint-cleanup`` command as an operator runs it (``python -m cleanup``), against the real server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.cleanup.cleanup_scenario import RunSpec, build_scenario
from tests.support.mlflow_server import MlflowServer, tree_hashes
from tests.support.sidecar import free_port

OLD_LOW = [RunSpec("keep_best", 90, (1.0,)), RunSpec("old_a", 90, (0.1,)), RunSpec("old_b", 90, (0.2,))]
FLAGS = (
    "--tracking-uri", "--dry-run", "--archive-path", "--retention-days", "--top-n", "--metric", "--metric-mode",
    "--verbose", "--report", "--schedule", "--protect-tag", "--allow-missing-metric", "--purge",
    "--backend-store-uri", "--metrics-port", "--textfile", "--rank-by", "--max-consecutive-failures",
    "--max-duration", "--include-deleted",
)  # fmt: skip


def cleanup(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cleanup", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def prom_value(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_help_lists_every_flag() -> None:
    result = cleanup("--help", timeout=30)
    assert result.returncode == 0
    for flag in FLAGS:
        assert flag in result.stdout


@pytest.mark.parametrize(
    "args",
    [["--purge"], ["--schedule", "0 2 * *"], ["--protect-tag", "novalue"], ["--top-n", "-1"], ["--metrics-port", "x"]],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    env_free = cleanup(*args, timeout=30)
    assert env_free.returncode == 2, env_free.stderr


def test_one_shot_runs_report_json_and_textfile_metrics(
    mlflow_server: MlflowServer, unique_name: str, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server.uri)
    scenario = build_scenario(client, unique_name, OLD_LOW)
    common = ["--tracking-uri", mlflow_server.uri, "--experiment", scenario.experiment_name, "--top-n", "1"]
    report, textfile = tmp_path / "report.json", tmp_path / "textfile" / "cleanup.prom"
    to_delete = scenario.ids(["old_a", "old_b"])

    dry = cleanup(*common, "--dry-run", "--report", str(report), "--textfile", str(textfile))
    assert dry.returncode == 0, dry.stderr
    document = json.loads(report.read_text())
    assert document["dry_run"] is True
    assert {r["run_id"] for r in document["runs"] if r["outcome"] == "would-delete"} == to_delete
    assert {r["run_id"]: r["reason"] for r in document["runs"]}[scenario.run_ids["keep_best"]] == "top-n rank 1"
    assert "would delete" in dry.stdout
    assert prom_value(textfile.read_text(), "checkpoint_cleanup_last_success_timestamp_seconds") == 0
    for run_id in to_delete:
        assert run_id in dry.stdout

    real = cleanup(*common, "--report", str(report), "--textfile", str(textfile))
    assert real.returncode == 0, real.stderr
    document = json.loads(report.read_text())
    assert {r["run_id"] for r in document["runs"] if r["outcome"] == "deleted"} == to_delete
    assert document["totals"]["bytes_freed"] > 0
    metrics = textfile.read_text()
    assert prom_value(metrics, "checkpoint_cleanup_runs_deleted_total") == 2
    assert prom_value(metrics, "checkpoint_cleanup_bytes_freed_total") == document["totals"]["bytes_freed"]
    assert (prom_value(metrics, "checkpoint_cleanup_last_success_timestamp_seconds") or 0) > time.time() - 60

    again = cleanup(*common, "--textfile", str(textfile))
    assert again.returncode == 0, again.stderr
    assert prom_value(textfile.read_text(), "checkpoint_cleanup_runs_deleted_total") == 2  # carried over


def test_failure_exits_non_zero_and_deletes_nothing(
    mlflow_server: MlflowServer, unique_name: str, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server.uri)
    scenario = build_scenario(client, unique_name, OLD_LOW)
    not_a_directory = tmp_path / "archive"
    not_a_directory.write_text("a file where the archive directory should be")
    result = cleanup(
        "--tracking-uri", mlflow_server.uri,
        "--experiment", scenario.experiment_name,
        "--top-n", "1",
        "--archive-path", str(not_a_directory),
    )  # fmt: skip
    assert result.returncode == 1
    for label in ("old_a", "old_b"):
        run_id = scenario.run_ids[label]
        assert client.get_run(run_id).info.lifecycle_stage == "active"
        assert tree_hashes(mlflow_server.artifact_root / scenario.experiment_id / run_id / "artifacts")


def test_unreachable_server_exits_non_zero_quickly(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "cleanup", "--tracking-uri", f"http://user:hunter2@127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 1
    assert "hunter2" not in result.stderr + result.stdout  # credentials are never logged


def test_schedule_serves_metrics_logs_next_run_and_exits_on_sigterm(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    port = free_port()
    log_path = tmp_path / "scheduled.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "cleanup",
                "--tracking-uri", mlflow_server.uri,
                "--schedule", "0 2 * * *",
                "--metrics-port", f"127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "next cleanup at" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        assert "02:00:00+00:00" in log_path.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
        assert "checkpoint_cleanup_last_success_timestamp_seconds" in body
        assert "checkpoint_cleanup_runs_deleted_total" in body

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_one_shot_sigterm_finishes_the_run_in_flight_writes_the_report_and_exits_0(
    mlflow_server: MlflowServer, unique_name: str, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server.uri)
    specs = [RunSpec("keep_best", 90, (100.0,)), *(RunSpec(f"old_{i}", 90, (float(i),)) for i in range(20))]
    scenario = build_scenario(client, unique_name, specs)
    report = tmp_path / "report.json"
    log_path = tmp_path / "one-shot.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cleanup", "--tracking-uri", mlflow_server.uri, "--experiment",
             scenario.experiment_name, "--top-n", "1", "--archive-path", str(tmp_path / "archive"),
             "--report", str(report)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "deleted run" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    document = json.loads(report.read_text())
    assert document["interrupted"] is True and document["ok"] is False
    outcomes = [r["outcome"] for r in document["runs"] if r["decision"] == "delete"]
    assert outcomes.count("deleted") >= 1 and outcomes.count("pending") >= 1
    assert outcomes.count("failed") == 0
    pending = [r["run_id"] for r in document["runs"] if r["outcome"] == "pending"]
    assert all(client.get_run(run_id).info.lifecycle_stage == "active" for run_id in pending)
