"""SIGTERM drains: a request in flight finishes within ``drain_timeout``; one that outlives it is cut, and the
sidecar still exits 0 with its pools and admin server closed — never a traceback."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.eventually import eventually_sync
from tests.support.raw import HeadServer
from tests.support.sidecar import free_port, policy_listen, sidecar_process, write_policy


class SlowUpstream(HeadServer):
    """Reads a request head, waits ``delay`` seconds, then answers 200 (``delay=None``: never answers)."""

    def __init__(self, delay: float | None) -> None:
        self.delay = delay
        super().__init__(self._answer)

    def _answer(self, conn: socket.socket) -> None:
        if self.delay is None:
            self.stopped.wait(30)  # hold the request until the test ends
            return
        time.sleep(self.delay)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndone")


def _policy(tmp_path: Path, upstream: SlowUpstream, drain: str) -> Path:
    return write_policy(
        tmp_path / "drain.yaml",
        {"slow": {"targets": [f"http://127.0.0.1:{upstream.port}"]}},
        defaults={"timeouts": {"connect": "500ms", "per_try": "20s", "total": "20s"}},
        http={"drain_timeout": drain},
    )


def _send_get(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), 5)
    sock.sendall(b"GET /slow HTTP/1.1\r\nHost: svc\r\n\r\n")
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Until the sidecar closes (or resets) the connection; a socket timeout fails the test."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def _wait_for_heads(upstream: SlowUpstream, count: int) -> None:
    eventually_sync(lambda: upstream.heads >= count, what="the request reaching the upstream")


@pytest.fixture
def slow_upstream(request: pytest.FixtureRequest) -> Iterator[SlowUpstream]:
    upstream = SlowUpstream(request.param)
    yield upstream
    upstream.close()


@pytest.mark.parametrize("slow_upstream", [0.5], indirect=True)
def test_a_request_in_flight_finishes_before_the_sidecar_exits(tmp_path: Path, slow_upstream: SlowUpstream) -> None:
    policy = _policy(tmp_path, slow_upstream, drain="10s")
    with sidecar_process(policy) as process:
        client = _send_get(policy_listen(policy, "slow")[1])
        _wait_for_heads(slow_upstream, 1)
        process.signal(signal.SIGTERM)
        answer = _read_all(client)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"done")
        assert b"connection: close\r\n" in answer.lower()  # draining: the answer says the connection ends
        assert process.proc.wait(10) == 0
    assert "Traceback" not in process.log()


@pytest.mark.parametrize("slow_upstream", [None], indirect=True)
def test_a_drain_that_runs_out_of_time_cuts_what_is_left_and_still_exits_0(
    tmp_path: Path, slow_upstream: SlowUpstream
) -> None:
    policy = _policy(tmp_path, slow_upstream, drain="300ms")
    with sidecar_process(policy) as process:
        client = _send_get(policy_listen(policy, "slow")[1])
        _wait_for_heads(slow_upstream, 1)
        process.signal(signal.SIGTERM)
        try:
            returncode = process.proc.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail("the sidecar did not exit after its drain timeout")
        assert returncode == 0, process.log()
        assert _read_all(client) == b""  # cut: no half answer, no made-up one
    log = process.log()
    assert "Traceback" not in log, log
    assert '"event": "stopped"' in log


@pytest.mark.parametrize("slow_upstream", [None], indirect=True)
def test_a_reload_that_moves_a_listener_cuts_what_outlives_the_drain(
    tmp_path: Path, slow_upstream: SlowUpstream
) -> None:
    policy = _policy(tmp_path, slow_upstream, drain="300ms")
    old_port = policy_listen(policy, "slow")[1]
    with sidecar_process(policy) as process:
        client = _send_get(old_port)
        _wait_for_heads(slow_upstream, 1)
        new_port = free_port()
        policy.write_text(policy.read_text().replace(f"127.0.0.1:{old_port}", f"127.0.0.1:{new_port}"))
        process.signal(signal.SIGHUP)
        client.settimeout(10)
        assert _read_all(client) == b""  # cut once the drain ran out, not held forever
        with socket.create_connection(("127.0.0.1", new_port), 5) as fresh:
            fresh.sendall(b"GET /slow HTTP/1.1\r\nHost: svc\r\n\r\n")
        assert process.proc.poll() is None
    assert "Traceback" not in process.log(), process.log()
