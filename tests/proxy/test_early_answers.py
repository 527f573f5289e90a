"""Streamed uploads on keep-alive connections: an upstream that answers before it has read the body (nginx's
``return 200``) loses no request and closes no connection unannounced; the upstream connection is pooled.

The client is ``http.client`` (in a thread) or a raw socket; upstreams are a real nginx and aiohttp servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from aiohttp import web

from proxy.http.body import DISCARD_BYTES, DISCARD_SECONDS
from tests.support.servers import stopping, wait_http
from tests.support.sidecar import free_port, listener_url, running_sidecar, write_policy
from tests.support.tools import require_tool
from tests.support.upstream import scripted_upstream

MiB = 1 << 20
PIECE = 64 * 1024

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  log_format conn '$connection $request_method $status';
  access_log {tmp}/access.log conn;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  keepalive_requests 1000000;
  client_max_body_size 0;
  client_body_buffer_size 2m;  # in memory: the workers may not write to the test's directory
  server {{
    listen 127.0.0.1:{port};
    location / {{ return 200 "ok\\n"; }}
    # Reads the whole body before answering: proxied on (request buffering) to the server below.
    location /read {{ proxy_pass http://127.0.0.1:{inner}/; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
  server {{ listen 127.0.0.1:{inner}; access_log off; location / {{ return 200 "read\\n"; }} }}
}}
"""


@contextlib.contextmanager
def nginx_returning_200(tmp: Path) -> Iterator[tuple[str, Path]]:
    """nginx answering ``return 200`` at once, before it reads a request body (it drops the body after), and
    after reading it whole under ``/read``; its access log names each request's connection (``$connection``)."""
    binary = require_tool("nginx", "Debian package `nginx-light`")
    port = free_port()
    (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, port=port, inner=free_port()))
    proc = subprocess.Popen(
        [binary, "-c", str(tmp / "nginx.conf"), "-p", str(tmp), "-e", str(tmp / "nginx-error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with stopping(proc):
        wait_http(f"http://127.0.0.1:{port}/", 10.0, proc)
        yield f"http://127.0.0.1:{port}", tmp / "access.log"


def _pieces(size: int, pause: float) -> Iterator[bytes]:
    """The body in pieces, ``pause`` seconds apart: an upstream answering at once answers in the middle of it."""
    block = bytes(range(256)) * (PIECE // 256)
    for offset in range(0, size, PIECE):
        if offset:
            time.sleep(pause)
        yield block[: min(PIECE, size - offset)]


def _upload_many(
    port: int, count: int, size: int, chunked: bool, pause: float = 0.0, path: str = "/upload"
) -> list[tuple[int, str | None, bool]]:
    """``count`` POSTs of ``size`` bytes on one keep-alive http.client connection: (status, the answer's
    Connection header, whether the request went on the same socket as the one before)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    results: list[tuple[int, str | None, bool]] = []
    sock = None
    try:
        for _ in range(count):
            headers = {} if chunked else {"Content-Length": str(size)}
            conn.request("POST", path, body=_pieces(size, pause), headers=headers, encode_chunked=chunked)
            same = sock is None or conn.sock is sock
            sock = conn.sock
            response = conn.getresponse()
            response.read()
            results.append((response.status, response.getheader("connection"), same))
    finally:
        conn.close()
    return results


def _policy(tmp: Path, target: str) -> Path:
    timeouts = {"per_try": "10s", "total": "30s", "idle": "10s"}
    return write_policy(
        tmp / "p.yaml", {"up": {"targets": [target], "timeouts": timeouts}}, {"breaker": {"enforce": False}}
    )


def _assert_all_kept(results: list[tuple[int, str | None, bool]], count: int) -> None:
    assert [status for status, _, _ in results] == [200] * count
    # Never closed unannounced: every request after the first went on the same client connection, and no answer
    # had to say close (each body's rest fits the discard bound).
    assert [(connection, same) for _, connection, same in results] == [(None, True)] * count


async def test_nginx_answering_before_the_body_loses_no_request(tmp_path: Path) -> None:
    """The issue's case: 40 chunked 1 MiB POSTs on one connection to nginx's ``return 200`` — all answered on one
    kept-alive client connection, and the upstream connection pooled (nginx drops the rest of each body)."""
    with nginx_returning_200(tmp_path) as (url, access_log):
        async with running_sidecar(_policy(tmp_path, url)) as sidecar:
            port = int(listener_url(sidecar, "up").rsplit(":", 1)[1])
            results = await asyncio.to_thread(_upload_many, port, 40, MiB, True, 0.002)
        _assert_all_kept(results, 40)
        posts = [line.split() for line in access_log.read_text().splitlines() if " POST " in line]
        assert len(posts) == 40  # nginx saw all 40
        connections = {connection for connection, _, _ in posts}
        assert len(connections) == 1, f"{len(connections)} upstream connections for 40 uploads"


async def test_aiohttp_answering_without_reading_loses_no_request(tmp_path: Path) -> None:
    async def early(request: web.Request) -> web.StreamResponse:
        return web.Response(text="early")  # not a byte of the body read

    async with scripted_upstream(default=early) as upstream:
        async with running_sidecar(_policy(tmp_path, upstream.url)) as sidecar:
            port = int(listener_url(sidecar, "up").rsplit(":", 1)[1])
            for chunked in (True, False):
                results = await asyncio.to_thread(_upload_many, port, 10, MiB, chunked, 0.002)
                _assert_all_kept(results, 10)


async def test_streamed_uploads_reuse_one_upstream_connection(tmp_path: Path) -> None:
    """The upstream reads each whole body before answering (the normal case): one upstream connection for all
    the uploads of a keep-alive client, chunked or with a length."""
    peers: list[int] = []
    sizes: list[int] = []

    async def read_all(request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        peers.append(peer[1] if peer else -1)
        sizes.append(len(await request.read()))
        return web.Response(text="read")

    async with scripted_upstream(default=read_all) as upstream:
        async with running_sidecar(_policy(tmp_path, upstream.url)) as sidecar:
            port = int(listener_url(sidecar, "up").rsplit(":", 1)[1])
            for chunked in (True, False):
                results = await asyncio.to_thread(_upload_many, port, 20, MiB, chunked)
                _assert_all_kept(results, 20)
    assert sizes == [MiB] * 40
    assert len(set(peers)) == 1, f"{len(set(peers))} upstream connections for 40 uploads"


async def test_streamed_uploads_to_nginx_reuse_one_upstream_connection(tmp_path: Path) -> None:
    """nginx answers the moment the last body byte is in: still one upstream connection for all uploads."""
    with nginx_returning_200(tmp_path) as (url, access_log):
        async with running_sidecar(_policy(tmp_path, url)) as sidecar:
            port = int(listener_url(sidecar, "up").rsplit(":", 1)[1])
            for chunked in (True, False):
                results = await asyncio.to_thread(_upload_many, port, 20, MiB, chunked, 0.0, "/read")
                _assert_all_kept(results, 20)
        posts = [line.split() for line in access_log.read_text().splitlines() if " POST " in line]
        assert [status for _, _, status in posts] == ["200"] * 40
        connections = {connection for connection, _, _ in posts}
        assert len(connections) == 1, f"{len(connections)} upstream connections for 40 uploads"


async def _post_raw(port: int, head: bytes, pieces: int, chunked: bool) -> tuple[bytes, bool]:
    """Send a head and up to ``pieces`` body pieces while reading the answer: (the answer's head, whether the
    connection was closed after it). Sending stops at the first error (the sidecar stops reading)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        with contextlib.suppress(OSError):
            writer.write(head)
            piece = b"x" * PIECE
            for _ in range(pieces):
                writer.write(b"%x\r\n%b\r\n" % (PIECE, piece) if chunked else piece)
                await writer.drain()

    sender = asyncio.create_task(send())
    try:
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(answer.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        try:
            closed = await asyncio.wait_for(reader.read(1), 10) == b""
        except ConnectionResetError:
            closed = True
        return answer, closed
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.close()


async def test_a_body_beyond_the_discard_bound_is_answered_with_connection_close(tmp_path: Path) -> None:
    async def early(request: web.Request) -> web.StreamResponse:
        return web.Response(text="early")

    async with scripted_upstream(default=early) as upstream:
        async with running_sidecar(_policy(tmp_path, upstream.url)) as sidecar:
            port = int(listener_url(sidecar, "up").rsplit(":", 1)[1])
            # Chunked, and it goes on past the bound after the answer: the answer waits for it, then says close.
            many = 2 * DISCARD_BYTES // PIECE
            head = b"POST /big HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
            answer, closed = await _post_raw(port, head, many, chunked=True)
            assert answer.startswith(b"HTTP/1.1 200") and b"connection: close\r\n" in answer.lower()
            assert closed
            # A length known to reach past the bound: said at once, without waiting for any more of the body.
            head = b"POST /big HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % (4 * DISCARD_BYTES)
            started = time.monotonic()
            answer, closed = await _post_raw(port, head, 2 * MiB // PIECE, chunked=False)
            assert answer.startswith(b"HTTP/1.1 200") and b"connection: close\r\n" in answer.lower()
            assert closed and time.monotonic() - started < DISCARD_SECONDS


async def test_answers_made_mid_body_keep_the_connection_only_for_a_rest_known_to_fit(tmp_path: Path) -> None:
    """A 502 (nothing listens) and a streamed answer (it starts before the body is in) while the body still
    arrives: with a Content-Length the rest is dropped and the connection carries the next upload; chunked, the
    end is unknown, so the answer says close — and the next request goes on a new connection, none is lost."""

    async def streamed(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked, its head out before the request body is read
        await response.prepare(request)
        for _ in range(16):
            await response.write(b"z" * PIECE)
        return response

    dead = f"http://127.0.0.1:{free_port()}"
    async with scripted_upstream(default=streamed) as upstream:
        for target, status in ((dead, 502), (upstream.url, 200)):
            async with running_sidecar(_policy(tmp_path, target)) as sidecar:
                port = int(listener_url(sidecar, "up").rsplit(":", 1)[1])
                kept = await asyncio.to_thread(_upload_many, port, 5, MiB, False, 0.002)
                assert kept == [(status, None, True)] * 5
                closed = await asyncio.to_thread(_upload_many, port, 5, MiB, True, 0.002)
                assert [(s, connection) for s, connection, _ in closed] == [(status, "close")] * 5
