"""Clients that are slow or break off never count against the upstream: the breaker stays closed, the client
gets a 408 (or nothing, when it is gone), and a pipelined body that arrives late is still forwarded."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.raw import RecordingUpstream, read_until_closed, recording_upstream_thread, status_and_reason
from tests.support.sidecar import SidecarProcess, policy_listen, sidecar_process, write_policy


@dataclass
class Stage:
    process: SidecarProcess
    port: int
    upstream: RecordingUpstream

    def breaker(self) -> dict[str, object]:
        with urllib.request.urlopen(f"{self.process.admin}/breakers", timeout=10) as response:
            return json.loads(response.read())["svc"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    with recording_upstream_thread() as upstream:
        policy = write_policy(
            tmp_path_factory.mktemp("client-faults") / "p.yaml",
            {"svc": {"targets": [upstream.url]}},
            defaults={
                "timeouts": {"connect": "500ms", "per_try": "600ms", "total": "5s", "idle": "600ms"},
                "breaker": {"failure_threshold": 2},
            },
            http={"replay_buffer_bytes": 1024},
        )
        with sidecar_process(policy) as process:
            yield Stage(process, policy_listen(policy, "svc")[1], upstream)


def test_clients_that_stop_sending_their_body_get_408_and_never_open_the_breaker(stage: Stage) -> None:
    # Five clients each announce 100,000 bytes, send 8 KiB (past the replay buffer: it streams) and stop.
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", stage.port), 5) as sock:
            sock.sendall(b"PUT /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 100000\r\n\r\n" + b"x" * 8192)
            answer = read_until_closed(sock)
        assert status_and_reason(answer) == (408, "bad_request"), answer[:300]
        assert b"reason=client_body_timeout" in answer
    breaker = stage.breaker()
    assert breaker["state"] == "closed" and breaker["failures"] == 0, breaker
    assert breaker["rejected"].get("client_timeout", 0) >= 5  # type: ignore[attr-defined]
    # And the upstream is still served.
    with socket.create_connection(("127.0.0.1", stage.port), 5) as sock:
        sock.sendall(b"GET /after HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 200")


def test_clients_that_hang_up_mid_body_are_not_upstream_failures(stage: Stage) -> None:
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", stage.port), 5) as sock:
            sock.sendall(b"PUT /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 100000\r\n\r\n" + b"x" * 8192)
            time.sleep(0.05)
    time.sleep(0.2)  # the sidecar notices the closes; nothing is expected to come of them
    breaker = stage.breaker()
    assert breaker["state"] == "closed" and breaker["failures"] == 0, breaker


def test_a_pipelined_body_that_arrives_late_is_still_forwarded(stage: Stage) -> None:
    before = len(stage.upstream.requests)
    with socket.create_connection(("127.0.0.1", stage.port), 5) as sock:
        sock.sendall(
            b"GET /first HTTP/1.1\r\nHost: svc\r\n\r\n"
            b"POST /second HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
        )
        time.sleep(0.3)  # the body comes later than its head, behind a request still in flight
        sock.sendall(b"hello")
        answers = read_until_closed(sock)
    assert answers.count(b"HTTP/1.1 200") == 2, answers[:400]
    forwarded = stage.upstream.requests[before:]
    assert [(url, body) for url, _, body in forwarded] == [(b"/first", b""), (b"/second", b"hello")]


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def big_stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    body = b"z" * (1024 * 1024)
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    with recording_upstream_thread(answer) as upstream:
        policy = write_policy(tmp_path_factory.mktemp("big") / "p.yaml", {"svc": {"targets": [upstream.url]}})
        with sidecar_process(policy) as process:
            yield Stage(process, policy_listen(policy, "svc")[1], upstream)


def test_clients_that_pipeline_and_never_read_cannot_grow_the_sidecar(big_stage: Stage) -> None:
    pid = big_stage.process.proc.pid
    before = _rss_mib(pid)
    request = b"GET /big HTTP/1.1\r\nHost: svc\r\n\r\n"
    clients = []
    for _ in range(4):
        sock = socket.create_connection(("127.0.0.1", big_stage.port), 5)
        sock.settimeout(0.5)
        try:
            for _ in range(500):  # 500 pipelined requests for 1 MiB answers each, and never a byte read
                sock.sendall(request * 10)
        except TimeoutError:
            pass  # the sidecar stopped reading us: what back-pressure looks like from here
        clients.append(sock)
    peak = before
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:  # watch a bounded while: RSS must stay put
        peak = max(peak, _rss_mib(pid))
        time.sleep(0.1)
    forwarded = len(big_stage.upstream.requests)
    for sock in clients:
        sock.close()
    print(f"RSS {before:.1f} MiB → peak +{peak - before:.1f} MiB; {forwarded} requests forwarded for 20,000 sent")
    assert peak - before < 128, f"RSS grew {peak - before:.1f} MiB"
    assert forwarded < 400  # a handful of answers per connection, not every request pipelined
