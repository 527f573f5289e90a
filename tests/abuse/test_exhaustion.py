"""The sidecar's own resource exhaustion is its own: out of file descriptors, it answers 503 overload and the
upstream's breaker never hears of it (it used to count every EMFILE as the upstream's connect_error)."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.eventually import eventually_sync
from tests.support.raw import read_until_closed, status_and_reason
from tests.support.sidecar import free_port, policy_listen, write_policy

FD_LIMIT = 96


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def _wait_ready(admin: str, proc: subprocess.Popen[bytes]) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError("the sidecar exited")
        try:
            with urllib.request.urlopen(f"{admin}/ready", timeout=1):
                return True
        except OSError:
            return False

    eventually_sync(ready, timeout=15, what="the sidecar ready")


def test_running_out_of_descriptors_is_an_overload_not_an_upstream_failure(tmp_path: Path) -> None:
    upstream = socket.create_server(("127.0.0.1", free_port()))  # accepts (backlog), never needed to answer
    policy = write_policy(
        tmp_path / "fd.yaml",
        {"svc": {"targets": [f"http://127.0.0.1:{upstream.getsockname()[1]}"]}},
        defaults={"breaker": {"failure_threshold": 2}, "retry": {"max_retries": 0}},
        http={"header_timeout": "30s"},
    )
    admin = "http://" + policy.read_text().split("listen: ", 1)[1].split("\n", 1)[0].strip("'\"")
    log = (tmp_path / "fd.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "--config", str(policy)],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_limit_descriptors,  # noqa: PLW1509  (only setrlimit, before exec)
    )
    port = policy_listen(policy, "svc")[1]
    hogs: list[socket.socket] = []
    try:
        _wait_ready(admin, proc)
        client = socket.create_connection(("127.0.0.1", port), 5)
        for _ in range(FD_LIMIT + 40):  # more idle connections than the sidecar has descriptors
            try:
                hogs.append(socket.create_connection(("127.0.0.1", port), 2))
            except OSError:
                break
        time.sleep(0.5)  # the sidecar accepts what it can hold
        admin_port = int(admin.rsplit(":", 1)[1])
        for _ in range(50):  # the admin plane is asked too while there are no descriptors left
            try:
                probe = socket.create_connection(("127.0.0.1", admin_port), 2)
                probe.sendall(b"GET /health HTTP/1.1\r\nHost: admin\r\n\r\n")
                hogs.append(probe)
            except OSError:
                break
        time.sleep(1.0)
        answers = []
        for _ in range(3):
            client.sendall(b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n")
            client.settimeout(10)
            answers.append(client.recv(65536))
        for hog in hogs:
            hog.close()
        hogs.clear()
        client.sendall(b"GET /x HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
        read_until_closed(client)
        client.close()
        time.sleep(0.3)
        with urllib.request.urlopen(f"{admin}/breakers", timeout=10) as response:
            breaker = json.loads(response.read())["svc"]
    finally:
        for hog in hogs:
            hog.close()
        proc.terminate()
        proc.wait(20)
        log.close()
        upstream.close()
    for answer in answers:
        assert status_and_reason(answer) == (503, "overload"), answer[:300]
        assert b"reason=out_of_resources" in answer
    assert breaker["state"] == "closed" and breaker["failures_by_kind"].get("connect_error", 0) == 0, breaker
    assert breaker["rejected"].get("overload", 0) >= 3
    text = (tmp_path / "fd.log").read_text()
    assert len(text.splitlines()) < 50, "running out of descriptors must not flood the log"
    assert text.count('"event": "out_of_resources"') <= 2, "the log is throttled: one line a second at most"
    if "Traceback" in text:
        pytest.fail(text[-2000:])
