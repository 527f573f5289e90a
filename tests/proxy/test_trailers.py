"""Trailers: ``TE: trailers`` reaches the upstream, and a chunked answer's trailer section reaches an HTTP/1.1
client as the upstream sent it (gRPC-web status, checksums), through the sidecar as directly. h11 plays both the
upstream (a real HTTP/1.1 server that writes trailers) and the client (which parses them)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h11

from tests.support.raw import read_until_closed
from tests.support.sidecar import policy_listen, running_sidecar, write_policy

TRAILERS = [(b"grpc-status", b"0"), (b"x-checksum", b"sha256=9f86d08")]
# Fields RFC 9110 §6.5.1 keeps out of trailers: a client could take them for head fields. Never relayed. (A
# Content-Length trailer is malformed to llhttp and answered 502 bad_response, like any malformed answer.)
FORBIDDEN = [(b"set-cookie", b"session=stolen"), (b"content-type", b"text/evil"), (b"content-encoding", b"gzip")]


@dataclass
class TrailerServer:
    """An h11 server on a loopback socket: each answer is chunked, in ``pieces`` written ``gap`` apart, with
    ``trailers`` after the last chunk. Records each request's headers."""

    trailers: list[tuple[bytes, bytes]]
    pieces: list[bytes] = field(default_factory=lambda: [b"hello ", b"world"])
    gap: float = 0.0
    requests: list[list[tuple[bytes, bytes]]] = field(default_factory=list)

    def serve(self, listening: socket.socket) -> None:
        while True:
            try:
                sock, _ = listening.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(sock,), daemon=True).start()

    def _connection(self, sock: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER)
        with sock:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = sock.recv(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    self.requests.append(list(event.headers))
                elif isinstance(event, h11.EndOfMessage):
                    self._answer(conn, sock)
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return

    def _answer(self, conn: h11.Connection, sock: socket.socket) -> None:
        announce = b", ".join(name for name, _ in self.trailers)
        sock.sendall(
            conn.send(
                h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked"), (b"trailer", announce)])
            )
            or b""
        )
        for piece in self.pieces:
            if self.gap:
                time.sleep(self.gap)
            sock.sendall(conn.send(h11.Data(data=piece)) or b"")
        sock.sendall(conn.send(h11.EndOfMessage(headers=self.trailers)) or b"")


@contextlib.contextmanager
def trailer_server(server: TrailerServer) -> Iterator[int]:
    listening = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=server.serve, args=(listening,), daemon=True).start()
    try:
        yield listening.getsockname()[1]
    finally:
        listening.close()


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    trailers: list[tuple[bytes, bytes]]


def h11_get(port: int, headers: list[tuple[bytes, bytes]], times: int = 1) -> list[Answer]:
    """GET / ``times`` on one keep-alive connection with an h11 client; each answer with its trailers."""
    answers = []
    conn = h11.Connection(h11.CLIENT)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for _ in range(times):
            request = h11.Request(method="GET", target="/", headers=[(b"host", b"upstream"), *headers])
            sock.sendall((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
            status, head, body, trailers = 0, {}, b"", []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(sock.recv(65536))
                elif isinstance(event, h11.Response):
                    status, head = event.status_code, dict(event.headers)
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    trailers = list(event.headers)
                    break
            answers.append(Answer(status, head, body, trailers))
            conn.start_next_cycle()
    return answers


async def test_te_trailers_is_forwarded_and_trailers_reach_the_client_as_directly(tmp_path: Path) -> None:
    server = TrailerServer(TRAILERS)
    with trailer_server(server) as port:
        direct = await asyncio.to_thread(h11_get, port, [(b"te", b"trailers")])
        policy = write_policy(tmp_path / "p.yaml", {"grpc": {"targets": [f"http://127.0.0.1:{port}"]}})
        async with running_sidecar(policy):
            _, listen = policy_listen(policy, "grpc")
            # Twice on one connection: the trailer section ends the first answer exactly, the second is clean.
            proxied = await asyncio.to_thread(h11_get, listen, [(b"te", b"trailers, deflate;q=0.5")], 2)
    for answer in (*direct, *proxied):
        assert answer.status == 200 and answer.body == b"hello world"
        assert answer.trailers == TRAILERS
        assert answer.headers[b"trailer"] == b"grpc-status, x-checksum"
    sent = dict(server.requests[1])
    assert sent[b"te"] == b"trailers", "only the trailers token: other codings belong to the client's own hop"
    assert b"te" in sent[b"connection"].lower().split(b",")


async def test_trailers_after_a_streamed_body_are_relayed(tmp_path: Path) -> None:
    # Chunks written apart: the answer is streamed (not in hand at once), its trailers arrive last.
    server = TrailerServer(TRAILERS, pieces=[b"a" * 70_000, b"b" * 70_000, b"c"], gap=0.05)
    with trailer_server(server) as port:
        policy = write_policy(tmp_path / "p.yaml", {"grpc": {"targets": [f"http://127.0.0.1:{port}"]}})
        async with running_sidecar(policy):
            _, listen = policy_listen(policy, "grpc")
            (answer,) = await asyncio.to_thread(h11_get, listen, [])
    assert answer.body == b"a" * 70_000 + b"b" * 70_000 + b"c"
    assert answer.trailers == TRAILERS
    assert b"te" not in dict(server.requests[0]), "no TE from the client, none forwarded"


async def test_framing_and_payload_fields_are_never_relayed_as_trailers(tmp_path: Path) -> None:
    server = TrailerServer([*TRAILERS, *FORBIDDEN])
    with trailer_server(server) as port:
        direct = await asyncio.to_thread(h11_get, port, [])
        policy = write_policy(tmp_path / "p.yaml", {"grpc": {"targets": [f"http://127.0.0.1:{port}"]}})
        async with running_sidecar(policy):
            _, listen = policy_listen(policy, "grpc")
            (proxied,) = await asyncio.to_thread(h11_get, listen, [])
    assert direct[0].trailers == [*TRAILERS, *FORBIDDEN]  # the upstream really sent them
    assert proxied.trailers == TRAILERS and proxied.body == b"hello world"


async def test_an_http_1_0_client_gets_the_body_without_trailers(tmp_path: Path) -> None:
    server = TrailerServer(TRAILERS)
    with trailer_server(server) as port:
        policy = write_policy(tmp_path / "p.yaml", {"grpc": {"targets": [f"http://127.0.0.1:{port}"]}})
        async with running_sidecar(policy):
            host, listen = policy_listen(policy, "grpc")

            def fetch() -> bytes:
                with socket.create_connection((host, listen), timeout=5) as sock:
                    sock.sendall(b"GET / HTTP/1.0\r\nTE: trailers\r\n\r\n")
                    return read_until_closed(sock)

            raw = await asyncio.to_thread(fetch)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"hello world", "close-delimited: no chunk framing and no trailer section for HTTP/1.0"
    lowered = head.lower()
    assert b"transfer-encoding" not in lowered and b"trailer:" not in lowered and b"grpc-status" not in raw
