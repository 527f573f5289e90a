"""Raw-socket peers: an upstream that records every byte and counts the requests it parsed, and a client."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import httptools

from tests.support.sidecar import free_port


@dataclass
class RecordingUpstream:
    """Answers every well-formed request with a fixed 200; remembers all it was sent, per connection."""

    port: int
    connections: list[bytearray] = field(default_factory=list)
    requests: list[tuple[bytes, list[tuple[bytes, bytes]], bytes]] = field(default_factory=list)
    response: bytes = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def raw(self) -> bytes:
        return b"".join(bytes(c) for c in self.connections)


class _Recorder(asyncio.Protocol):
    def __init__(self, upstream: RecordingUpstream) -> None:
        self.upstream = upstream
        self.buffer = bytearray()
        upstream.connections.append(self.buffer)
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # answered (a 200, not a 101): the sidecar never reuses the connection of an upgrade request
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.upstream.requests.append((self.url, self.headers, bytes(self.body)))
        assert self.transport is not None
        self.transport.write(self.upstream.response)


@contextlib.asynccontextmanager
async def recording_upstream(response: bytes | None = None) -> AsyncIterator[RecordingUpstream]:
    upstream = RecordingUpstream(port=free_port())
    if response is not None:
        upstream.response = response
    server = await asyncio.get_running_loop().create_server(lambda: _Recorder(upstream), "127.0.0.1", upstream.port)
    try:
        yield upstream
    finally:
        server.close()


async def exchange(host: str, port: int, payload: bytes, read_timeout: float = 2.0) -> bytes:
    """Send raw bytes, read until the sidecar closes or goes quiet."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(payload)
    chunks = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), read_timeout)
            if not chunk:
                break
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        writer.close()
    return b"".join(chunks)


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the peer sends until it closes (or resets, or goes quiet for ``timeout``)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def status_and_reason(answer: bytes) -> tuple[int, str]:
    """The status code of the first answer in ``answer`` and its ``x-sidecar-reason`` (empty when absent)."""
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    match = re.search(r"x-sidecar-reason: (\S+)", head)
    return int(head.split(" ", 2)[1]), match.group(1) if match else ""


@contextlib.contextmanager
def recording_upstream_thread(response: bytes | None = None) -> Iterator[RecordingUpstream]:
    """A ``RecordingUpstream`` on its own event loop in a thread: for module-scoped fixtures that outlive any
    test's loop (and for tests that talk blocking sockets to a sidecar process)."""
    upstream = RecordingUpstream(port=free_port())
    if response is not None:
        upstream.response = response
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(
        loop.create_server(lambda: _Recorder(upstream), "127.0.0.1", upstream.port), loop
    ).result(5)
    try:
        yield upstream
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


class HeadServer:
    """A blocking loopback server, a thread per connection: reads one request head, counts it, then hands the
    socket to ``respond`` (which answers, stalls or hangs up as its test needs). ``close()`` stops accepting."""

    def __init__(self, respond: Callable[[socket.socket], None]) -> None:
        self.respond = respond
        self.port = free_port()
        self.heads = 0
        self.stopped = threading.Event()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.1)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by close()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.heads += 1
            try:
                self.respond(conn)
            except OSError:
                return  # the sidecar hung up on us

    def close(self) -> None:
        self.stopped.set()
        self._server.close()
