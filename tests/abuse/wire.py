"""Blocking raw-socket helpers for the abuse and fuzz suites: send bytes, read what came back, parse it strictly."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import httptools


@dataclass
class Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


class Responses:
    """Every response in a byte stream, in order; ``error`` if the stream is not valid HTTP/1.1."""

    def __init__(self, raw: bytes, head_only: int = 0) -> None:
        self.items: list[Response] = []
        self.error: str | None = None
        for _ in range(head_only):  # answers to HEAD requests: a head and no body, whatever it says
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                break
            self._parser = httptools.HttpResponseParser(self)
            try:
                self._parser.feed_data(raw[: end + 4])
            except httptools.HttpParserError as exc:
                self.error = str(exc)
                return
            self.items[-1].complete = True
            raw = raw[end + 4 :]
        self._parser = httptools.HttpResponseParser(self)
        try:
            self._parser.feed_data(raw)
        except httptools.HttpParserError as exc:
            self.error = str(exc)

    def on_message_begin(self) -> None:
        self.items.append(Response())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.items[-1].headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.items[-1].status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.items[-1].body += body

    def on_message_complete(self) -> None:
        self.items[-1].complete = True

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.items]


def talk(port: int, payload: bytes, timeout: float = 2.0, pieces: list[int] | None = None) -> bytes:
    """Send ``payload`` (optionally split at ``pieces`` offsets), read until the peer closes or goes quiet."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout) as sock:
        try:
            start = 0
            for cut in [*(pieces or []), len(payload)]:
                sock.sendall(payload[start:cut])
                start = cut
        except (ConnectionResetError, BrokenPipeError):
            pass  # the peer answered and closed before the rest was sent: what it answered is still to be read
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError, BrokenPipeError):
            pass
    return b"".join(chunks)


class KeepAliveClient:
    """Sequential requests over one connection, each read until its response is complete."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), 5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get(self, path: bytes = b"/") -> int:
        self.sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n")
        raw = b""
        while True:
            raw += self.sock.recv(65536)
            parsed = Responses(raw)
            if parsed.items and parsed.items[0].complete:
                return parsed.items[0].status

    def close(self) -> None:
        self.sock.close()
