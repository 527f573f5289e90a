"""Every `curl`, `sidecar` and `checkpoint-cleanup` command in RUNBOOK.md, run against a live sidecar.

The commands are extracted from the runbook's ```bash blocks (so the runbook cannot rot: an endpoint renamed,
a flag dropped, a metric gone — and this fails), then run in document order with the runbook's variables
pointing at a sidecar started here from a temporary policy:

  SIDECAR_ADMIN        the live sidecar's admin address
  SIDECAR_ADMIN_TOKEN  its bearer token (mutating calls must present it)
  SIDECAR_POLICY       its policy file;  UPSTREAM  the upstream the breaker commands act on
  MLFLOW_TRACKING_URI  a throw-away local MLflow store per checkpoint-cleanup command
  ARCHIVE_PATH, REPORT where a real (non-dry) cleanup run writes (per command too)

Each command must exit 0; curl runs with --fail-with-body, so that means an HTTP answer below 400.
"""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import threading
import urllib.request
from collections.abc import Iterator

import pytest

from tests.support.deploy import REPO, RUNBOOK
from tests.support.eventually import eventually_sync
from tests.support.sidecar import free_port
from tests.support.tools import require_tool

RUNBOOK_COMMANDS = ("curl", "sidecar", "checkpoint-cleanup")
TOKEN = "runbook-test-token"


def extract_commands(markdown: str, programs: tuple[str, ...] = RUNBOOK_COMMANDS) -> list[str]:
    """The lines of ```bash fences whose first word is one of `programs`, in document order."""
    commands: list[str] = []
    fence: str | None = None  # the open fence's language, or None outside fences
    for line in markdown.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip() if fence is None else None
            continue
        if fence == "bash" and stripped.split(" ", 1)[0] in programs:
            commands.append(stripped)
    return commands


def _commands() -> list[str]:
    return extract_commands(RUNBOOK.read_text(encoding="utf-8")) if RUNBOOK.exists() else []


def _get(url: str, timeout: float = 1.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def live_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A sidecar on free loopback ports with two upstreams — `timescaledb` (tcp, its target refuses) and
    `echo` (http, a local file server, rate-limited) — that has served traffic and reloaded once; yields the runbook's env."""
    sidecar = require_tool("sidecar", "the package's command: `make test` installs it into .venv")
    tmp = tmp_path_factory.mktemp("runbook")
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    admin, db_port, echo_port = free_port(), free_port(), free_port()
    policy = tmp / "policy.yaml"
    policy.write_text(
        "# yaml-language-server: $schema=../sidecar.schema.json\n"
        f"admin: {{listen: 127.0.0.1:{admin}, token_env: SIDECAR_ADMIN_TOKEN}}\n"
        "upstreams:\n"
        "  timescaledb:\n"
        "    protocol: tcp\n"
        f"    listen: 127.0.0.1:{db_port}\n"
        f"    targets: ['127.0.0.1:{free_port()}']\n"
        "  echo:\n"
        f"    listen: 127.0.0.1:{echo_port}\n"
        f"    targets: ['http://127.0.0.1:{upstream.server_address[1]}']\n"
        "    rate_limit: {limits: [{requests: 100, per: 1s}]}\n",  # scenario 11 reads its metrics
        encoding="utf-8",
    )
    env = {**os.environ, "SIDECAR_ADMIN_TOKEN": TOKEN}
    log = (tmp / "sidecar.log").open("w")
    process = subprocess.Popen(
        [sidecar, "run", "--config", str(policy)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp
    )
    try:

        def ready() -> bool:
            assert process.poll() is None, (tmp / "sidecar.log").read_text()
            return _get_or_none(f"http://127.0.0.1:{admin}/ready") == 200

        eventually_sync(ready, timeout=15, interval=0.1, what="the sidecar's /ready")
        # Traffic, so request/latency series exist, and one SIGHUP reload, so the reload counter does.
        assert _get(f"http://127.0.0.1:{echo_port}/")[0] == 200
        process.send_signal(signal.SIGHUP)
        eventually_sync(
            lambda: "sidecar_config_reloads_total{" in _get(f"http://127.0.0.1:{admin}/metrics")[1],
            timeout=20,
            interval=0.1,
            what="the SIGHUP reload counted in /metrics",
        )
        yield {
            **os.environ,
            "SIDECAR_ADMIN": f"127.0.0.1:{admin}",
            "SIDECAR_ADMIN_TOKEN": TOKEN,
            "SIDECAR_POLICY": str(policy),
            "UPSTREAM": "timescaledb",
        }
    finally:
        process.terminate()
        try:
            process.wait(timeout=25)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        upstream.shutdown()


def _get_or_none(url: str) -> int | None:
    try:
        return _get(url, timeout=0.5)[0]
    except OSError:
        return None


def test_the_runbook_has_commands_for_every_program() -> None:
    commands = _commands()
    for program in RUNBOOK_COMMANDS:
        assert any(c.split(" ", 1)[0] == program for c in commands), program


@pytest.fixture(scope="module")
def cleanup_results(
    live_sidecar: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[int, str, str]]:
    """All checkpoint-cleanup commands, run at once: each spends seconds importing MLflow and creating its
    store, so in parallel — each with its own store, archive and report — they keep the suite quick."""
    running = {}
    for i, command in enumerate(c for c in _commands() if c.startswith("checkpoint-cleanup")):
        tmp = tmp_path_factory.mktemp(f"cleanup{i}")
        env = {
            **live_sidecar,
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
            "ARCHIVE_PATH": str(tmp / "archive"),
            "REPORT": str(tmp / "report.json"),
        }
        running[command] = subprocess.Popen(
            ["bash", "-o", "pipefail", "-c", command],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    results = {}
    for command, process in running.items():
        stdout, stderr = process.communicate(timeout=120)
        results[command] = (process.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("command", _commands())
def test_runbook_command(
    command: str, live_sidecar: dict[str, str], cleanup_results: dict[str, tuple[int, str, str]]
) -> None:
    if command in cleanup_results:
        returncode, stdout, stderr = cleanup_results[command]
        assert returncode == 0, f"$ {command}\n{stdout}\n{stderr}"
        return
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        env=live_sidecar,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"$ {command}\n{result.stdout}\n{result.stderr}"
    if command.startswith("curl"):
        assert result.stdout.strip(), "curl printed nothing"
