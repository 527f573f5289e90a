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


def test_every_answer_gets_exactly_one_request_line_with_its_reason(tmp_path: Path) -> None:
    """The request log (``logging.requests``) as an operator reads it after a caller complained: one line per
    answer, proxied or the sidecar's own, with the upstream, route, status, attempts, duration and — for the
    sidecar's own answers — the reason (502 connect_error after retries, 503 breaker_open, 429 rate_limited,
    400 bad_request)."""
    import socket

    dead = f"http://127.0.0.1:{free_port()}"
    listen, limited = free_port(), free_port()
    policy = write_policy(
        tmp_path / "p.yaml",
        {
            "pay": {
                "listen": f"127.0.0.1:{listen}",
                "targets": [dead],
                "breaker": {"failure_threshold": 2},
                "retry": {"max_retries": 1, "base_delay": "1ms", "max_delay": "1ms"},
                "routes": [{"match": {"path_prefix": "/v1"}, "name": "v1"}],
            },
            "quotes": {
                "listen": f"127.0.0.1:{limited}",
                "targets": [dead],
                "rate_limit": {"limits": [{"requests": 1, "per": "1m"}]},
            },
        },
        logging={"level": "info", "requests": True},
    )

    def status_of(url: str) -> int:
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    with sidecar_process(policy) as sidecar:
        assert status_of(f"http://127.0.0.1:{listen}/v1/pay") == 502  # two attempts fail: the breaker opens
        assert status_of(f"http://127.0.0.1:{listen}/other") == 503  # breaker_open, answered on the spot
        assert status_of(f"http://127.0.0.1:{limited}/q") == 502  # the one token: spent on a dead target
        assert status_of(f"http://127.0.0.1:{limited}/q") == 429  # rate_limited
        with socket.create_connection(("127.0.0.1", listen), 3) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
            assert raw.recv(64).startswith(b"HTTP/1.1 400 ")

        def request_lines() -> list[dict[str, Any]]:
            found = [e for e in events(sidecar.log()) if e.get("event") == "request"]
            return found if len(found) >= 5 else []

        lines = eventually_sync(request_lines, timeout=5, interval=0.05, what="five request lines")
        assert len(lines) == 5, lines
        summary = [(e["upstream"], e.get("route"), e["status"], e.get("reason"), e["attempts"]) for e in lines]
        assert summary == [
            ("pay", "v1", 502, "connect_error", 2),
            ("pay", None, 503, "breaker_open", 0),
            ("quotes", None, 502, "connect_error", 1),
            ("quotes", None, 429, "rate_limited", 0),
            ("pay", None, 400, "bad_request", 0),
        ]
        assert all(isinstance(e["duration_ms"], float | int) for e in lines)
