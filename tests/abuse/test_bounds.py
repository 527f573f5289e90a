"""Hostile and broken peers, each against a real sidecar process over real sockets: every bad answer gets a
clear answer of the sidecar's own, a bound holds (RSS, bytes), and nothing is charged to an innocent party.

Upstream side: endless or huge response heads, status 099, transfer codings other than chunked, an unsolicited
101. Client side: request trailers, userinfo in absolute-form, a bad request on a reused connection, a
connection that never sends a byte, and the sidecar's own 4xx answers in the request counters.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.raw import (
    HeadServer,
    RecordingUpstream,
    read_until_closed,
    recording_upstream_thread,
    status_and_reason,
)
from tests.support.sidecar import SidecarProcess, policy_listen, sidecar_process, write_policy

MiB = 1024 * 1024


class RawUpstream:
    """Reads a request head, then writes whatever ``answer`` yields (bounded generators only), then closes."""

    def __init__(self, answer: Callable[[], Iterator[bytes]]) -> None:
        self.answer = answer
        self.written = 0
        self.server: HeadServer | None = None

    def start(self) -> None:
        self.server = HeadServer(self._respond)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def requests(self) -> int:
        return self.server.heads if self.server is not None else 0

    def _respond(self, conn: socket.socket) -> None:
        for piece in self.answer():
            conn.sendall(piece)
            self.written += len(piece)


def endless_header_lines() -> Iterator[bytes]:
    yield b"HTTP/1.1 200 OK\r\n"
    line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
    for _ in range(64 * 1024):  # at most 64 MiB: the sidecar must stop reading long before
        yield line * 16


def one_huge_header() -> Iterator[bytes]:
    yield b"HTTP/1.1 200 OK\r\nX-Huge: "
    for _ in range(64):
        yield b"b" * MiB
    yield b"\r\ncontent-length: 0\r\n\r\n"


def fixed(raw: bytes) -> Callable[[], Iterator[bytes]]:
    return lambda: iter([raw])


UPSTREAMS = {
    "endless": RawUpstream(endless_header_lines),
    "huge": RawUpstream(one_huge_header),
    "status099": RawUpstream(fixed(b"HTTP/1.1 099 Odd\r\ncontent-length: 0\r\n\r\n")),
    "gzip": RawUpstream(fixed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nnot really gzip")),
    "xchunked": RawUpstream(fixed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")),
    "badchunk": RawUpstream(fixed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")),
    "switch": RawUpstream(
        fixed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05hello")
    ),
}


@dataclass
class Bench:
    process: SidecarProcess
    policy: Path
    recording: RecordingUpstream

    def port(self, upstream: str) -> int:
        return policy_listen(self.policy, upstream)[1]

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.process.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]

    def metric(self, line_start: str) -> float:
        with socket.create_connection(("127.0.0.1", int(self.process.admin.rsplit(":", 1)[1])), 5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            text = read_until_closed(sock).decode()
        for line in text.splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def request(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall(payload)
        return read_until_closed(sock, timeout)


def get(upstream: str = "svc") -> bytes:
    return b"GET /x HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % upstream.encode()


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    for upstream in UPSTREAMS.values():
        upstream.start()
    with recording_upstream_thread() as recording:
        yield from _bench(tmp_path_factory, recording)


def _bench(tmp_path_factory: pytest.TempPathFactory, recording: RecordingUpstream) -> Iterator[Bench]:
    upstreams = {name: {"targets": [f"http://127.0.0.1:{u.port}"]} for name, u in UPSTREAMS.items()}
    upstreams["svc"] = {"targets": [recording.url]}
    policy = write_policy(
        tmp_path_factory.mktemp("bounds") / "bounds.yaml",
        upstreams,
        defaults={
            "timeouts": {"connect": "500ms", "per_try": "5s", "total": "10s"},
            # Retries on: none of these answers may be retried or counted more than once.
            "retry": {"max_retries": 2, "retry_on": ["connect_error", "reset", "5xx"]},
        },
        http={"header_timeout": "500ms", "keepalive_timeout": "75s"},
    )
    with sidecar_process(policy) as process:
        yield Bench(process, policy, recording)


def test_endless_response_header_lines_are_cut_at_the_head_limit_with_bounded_memory(bench: Bench) -> None:
    before = bench.rss_mib()
    for _ in range(3):
        assert status_and_reason(request(bench.port("endless"), get("endless"))) == (502, "bad_response")
    grown = bench.rss_mib() - before
    print(f"RSS {before:.1f} MiB → +{grown:.1f} MiB after 3 endless-header answers")
    assert grown < 64, f"RSS grew {grown:.1f} MiB"
    # The sidecar stopped reading: the upstream got nowhere near its 64 MiB per answer.
    assert UPSTREAMS["endless"].written < 3 * 16 * MiB


def test_a_64_mib_response_head_is_not_forwarded(bench: Bench) -> None:
    answer = request(bench.port("huge"), get("huge"))
    assert status_and_reason(answer) == (502, "bad_response")
    assert len(answer) < 4096 and b"bbbb" not in answer
    assert UPSTREAMS["huge"].written < 16 * MiB  # cut after the limit; socket buffers hold the rest of that


@pytest.mark.parametrize("upstream", ["status099", "gzip", "xchunked", "badchunk"])
def test_answers_the_sidecar_cannot_relay_faithfully_are_502_bad_response(bench: Bench, upstream: str) -> None:
    before = UPSTREAMS[upstream].requests
    answer = request(bench.port(upstream), get(upstream))
    assert status_and_reason(answer) == (502, "bad_response"), answer[:300]
    assert b"not really gzip" not in answer and b"abc" not in answer
    assert UPSTREAMS[upstream].requests - before == 1  # bad_response is not in retry_on: asked once


def test_an_unsolicited_101_is_a_bad_response_asked_once_and_the_sidecar_stays_well(bench: Bench) -> None:
    before = UPSTREAMS["switch"].requests
    answer = request(bench.port("switch"), get("switch"))
    assert status_and_reason(answer) == (502, "bad_response"), answer[:300]
    assert b"hello" not in answer
    assert UPSTREAMS["switch"].requests - before == 1
    log = bench.process.log()
    assert "Fatal error" not in log and "Traceback" not in log


def test_request_trailers_never_reach_the_upstream_as_headers(bench: Bench) -> None:
    before = len(bench.recording.requests)
    answer = request(
        bench.port("svc"),
        b"POST /t HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"3\r\nabc\r\n0\r\nAuthorization: Bearer forged\r\nX-Checksum: 1\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200")
    ((url, headers, body),) = bench.recording.requests[before:]
    assert (url, body) == (b"/t", b"abc")
    names = {name.lower() for name, _ in headers}
    assert b"authorization" not in names and b"x-checksum" not in names


def test_userinfo_in_an_absolute_form_target_is_refused_and_nothing_is_forwarded(bench: Bench) -> None:
    before = len(bench.recording.requests)
    answer = request(bench.port("svc"), b"GET http://user:pw@evil/abs HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert status_and_reason(answer) == (400, "bad_request")
    assert len(bench.recording.requests) == before


def test_a_bad_request_on_a_reused_connection_still_gets_its_answer(bench: Bench) -> None:
    with socket.create_connection(("127.0.0.1", bench.port("svc")), 5) as sock:
        sock.sendall(b"GET /first HTTP/1.1\r\nHost: svc\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /second HTTP/1.1\r\nHost: svc\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx")
        assert status_and_reason(read_until_closed(sock)) == (400, "bad_request")


def test_the_sidecars_own_4xx_answers_are_counted(bench: Bench) -> None:
    code = 'sidecar_requests_total{code="400",upstream="svc"}'
    reason = 'sidecar_rejected_total{reason="bad_request",upstream="svc"}'
    before = (bench.metric(code), bench.metric(reason))
    answer = request(bench.port("svc"), b"GET /a HTTP/1.1\r\nHost: svc\r\nHost: evil\r\n\r\n")
    assert status_and_reason(answer) == (400, "bad_request")
    assert (bench.metric(code), bench.metric(reason)) == (before[0] + 1, before[1] + 1)


def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(bench: Bench) -> None:
    with socket.create_connection(("127.0.0.1", bench.port("svc")), 5) as sock:
        started = time.monotonic()
        assert read_until_closed(sock, timeout=30) == b""  # closed without an answer: nothing was asked
        held = time.monotonic() - started
    # header_timeout is 500 ms and keepalive_timeout 75 s: a generous bound still tells them apart.
    assert held < 30, f"held {held:.1f}s"


@pytest.mark.parametrize("line", [b"GET /\r\n", b"GET /\n", b"GET /\r\n\r\n"])
def test_an_http_0_9_request_is_refused_at_once(bench: Bench, line: bytes) -> None:
    before = len(bench.recording.requests)
    started = time.monotonic()
    answer = request(bench.port("svc"), line)
    assert status_and_reason(answer) == (400, "bad_request"), answer[:200]
    assert time.monotonic() - started < 5  # not after header_timeout: nothing more is awaited
    assert len(bench.recording.requests) == before


def test_an_upgrade_answered_without_101_gets_one_answer_and_nothing_after_it_is_read(bench: Bench) -> None:
    """A WebSocket handshake is forwarded with its Upgrade; an answer other than 101 is the only one, the
    connection closes after it, and the bytes pipelined behind the handshake never reach the upstream."""
    before = len(bench.recording.requests)
    answer = request(
        bench.port("svc"),
        b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n",
    )
    assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 200"), answer[:400]
    assert b"connection: close" in answer.lower()
    forwarded = bench.recording.requests[before:]
    assert [url for url, _, _ in forwarded] == [b"/ws"]
    sent = {name.lower(): value for name, value in forwarded[0][1]}
    assert sent[b"upgrade"] == b"websocket" and sent[b"connection"] == b"upgrade"
    assert sent[b"sec-websocket-key"] == b"dGhlIHNhbXBsZSBub25jZQ=="


def test_an_h2c_upgrade_is_served_once_as_plain_http_and_the_next_request_follows(bench: Bench) -> None:
    before = len(bench.recording.requests)
    answer = request(
        bench.port("svc"),
        b"GET /h2c HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n",
    )
    assert answer.count(b"HTTP/1.1 ") == 2 and b" 501 " not in answer, answer[:400]
    forwarded = bench.recording.requests[before:]
    assert [url for url, _, _ in forwarded] == [b"/h2c", b"/next"]
    assert not {b"upgrade", b"http2-settings"} & {name.lower() for name, _ in forwarded[0][1]}


def test_an_upgrade_request_with_a_body_is_refused_and_its_body_never_parsed(bench: Bench) -> None:
    """llhttp stops at the head of an upgrade request, so its body would be read as the next request."""
    before = len(bench.recording.requests)
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: svc\r\n\r\n"
    answer = request(
        bench.port("svc"),
        b"POST /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled,
    )
    assert status_and_reason(answer) == (400, "bad_request"), answer[:400]
    assert answer.count(b"HTTP/1.1 ") == 1
    assert bench.recording.requests[before:] == []
