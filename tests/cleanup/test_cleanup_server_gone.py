"""The tracking server stops in the middle of a pass: the pass gives up within a minute, writes its report
and exits non-zero (its own real ``mlflow server``, since this test stops it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from cleanup.client_retries import CLIENT_RETRY_DEFAULTS
from tests.support.mlflow_server import STARTUP_TIMEOUT_S, start_mlflow_server, stop_mlflow_server
from tests.support.sidecar import free_port

OLD_RUNS = 40
DAY_MS = 86_400_000
EXIT_DEADLINE_S = 60


def wait_for_line(path: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert process.poll() is None, path.read_text()
        assert time.monotonic() < deadline, path.read_text()
        time.sleep(0.05)


def test_server_stopped_mid_pass_report_written_and_exit_non_zero_within_a_minute(tmp_path: Path) -> None:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(
        f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", port, tmp_path / "server.log", STARTUP_TIMEOUT_S
    )
    cleanup: subprocess.Popen[bytes] | None = None
    try:
        client = MlflowClient(uri)
        experiment_id = client.create_experiment("server-gone")
        now_ms = int(time.time() * 1000)
        for i in range(OLD_RUNS + 1):
            run = client.create_run(experiment_id, start_time=now_ms - 90 * DAY_MS)
            client.log_metric(run.info.run_id, "sharpe_ratio", float(i))
            client.log_text(run.info.run_id, "weights " * 100, "checkpoint.txt")
            client.set_terminated(run.info.run_id)

        report = tmp_path / "report.json"
        log_path = tmp_path / "cleanup.log"
        # Exactly the job's own client settings: none inherited from the test environment.
        env = {k: v for k, v in os.environ.items() if k not in CLIENT_RETRY_DEFAULTS}
        with log_path.open("wb") as log:
            cleanup = subprocess.Popen(
                [sys.executable, "-m", "cleanup", "--tracking-uri", uri, "--top-n", "1",
                 "--archive-path", str(tmp_path / "archive"), "--report", str(report)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        wait_for_line(log_path, "deleted run", cleanup, timeout=120)
        cleanup.send_signal(signal.SIGSTOP)  # hold the pass exactly while the server goes away
        stop_mlflow_server(server)
        stopped_at = time.monotonic()
        cleanup.send_signal(signal.SIGCONT)
        returncode = cleanup.wait(timeout=EXIT_DEADLINE_S + 30)
        elapsed = time.monotonic() - stopped_at
        print(f"server stopped -> cleanup exited {returncode} after {elapsed:.1f} s")
    finally:
        stop_mlflow_server(server)
        if cleanup is not None and cleanup.poll() is None:
            cleanup.kill()
            cleanup.wait()

    output = log_path.read_text()
    assert returncode == 1, output
    assert elapsed < EXIT_DEADLINE_S, output
    document = json.loads(report.read_text())
    assert document["ok"] is False
    assert "3 runs in a row failed" in document["gave_up"]
    outcomes = [run["outcome"] for run in document["runs"] if run["decision"] == "delete"]
    assert len(outcomes) == OLD_RUNS
    assert outcomes.count("deleted") >= 1
    assert outcomes.count("failed") == 3
    assert outcomes.count("pending") == OLD_RUNS - outcomes.count("deleted") - 3
    assert "pass stopped: 3 runs in a row failed" in output
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES=2" in output
