"""Structured JSON log lines from a real ``sidecar run``: breaker transitions, overrides, reloads."""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.admin import TOKEN
from tests.support.eventually import eventually_sync
from tests.support.sidecar import free_port, sidecar_process, write_policy


def events(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))  # every structured line must be valid JSON on its own
    return lines


def wait_for_event(proc: Any, name: str, timeout: float = 5.0) -> dict[str, Any]:
    """The newest structured log line whose event is ``name``, once there is one."""

    def newest() -> dict[str, Any] | None:
        found = [e for e in events(proc.log()) if e.get("event") == name]
        return found[-1] if found else None

    try:
        event = eventually_sync(newest, timeout=timeout, interval=0.05, what=f"a {name!r} log line")
    except AssertionError as exc:
        raise AssertionError(f"no {name!r} log line in:\n{proc.log()}") from exc
    assert event is not None
    return event


def test_transition_override_and_reload_are_logged_as_json(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    listen = free_port()
    policy = write_policy(
        tmp_path / "p.yaml",
        {
            "pay": {"listen": f"127.0.0.1:{listen}", "targets": [dead], "breaker": {"failure_threshold": 2}},
        },
    )
    with sidecar_process(policy, env={"SEAWALL_TEST_TOKEN": TOKEN}) as sidecar:
        for _ in range(2):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{listen}/", timeout=3)
            except urllib.error.HTTPError as exc:
                assert exc.code == 502
        transition = wait_for_event(sidecar, "breaker_transition")
        assert transition["upstream"] == "pay" and transition["from_state"] == "closed"
        assert transition["to_state"] == "open" and transition["reason"] == "2_failures_in_60s"
        assert transition["level"] == "warning" and transition["ts"].endswith("Z")

        request = urllib.request.Request(
            f"{sidecar.admin}/breakers/pay/force-close?ttl=5s",
            method="POST",
            headers={"Authorization": f"Bearer {TOKEN}", "X-Operator": "oncall-bob"},
        )
        with urllib.request.urlopen(request, timeout=3) as response:
            assert response.status == 200
        override = wait_for_event(sidecar, "breaker_override")
        assert override["upstream"] == "pay" and override["action"] == "force-close"
        assert override["ttl_seconds"] == 5.0 and override["operator"] == "oncall-bob"
        assert override["by"] == "127.0.0.1"

        policy.write_text(policy.read_text().replace("failure_threshold: 2", "failure_threshold: 3"))
        sidecar.signal(signal.SIGHUP)
        reload = wait_for_event(sidecar, "reload")
        assert reload["trigger"] in ("SIGHUP", "file_changed") and len(reload["sha256"]) == 64
        with urllib.request.urlopen(f"{sidecar.admin}/metrics", timeout=3) as response:
            text = response.read().decode()
        # SIGHUP and the file watcher may both pick the edit up; each is a successful reload.
        line = next(x for x in text.splitlines() if x.startswith('sidecar_config_reloads_total{result="success"}'))
        assert float(line.split()[-1]) >= 1
