"""HTTP/1.0 clients: a keep-alive they asked for is granted out loud (``Connection: keep-alive``, as
ApacheBench and old clients wait for it), and an answer they cannot be given a length for ends with a close."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web

from tests.support.sidecar import listener_url, running_sidecar, write_policy
from tests.support.tools import require_tool


@contextlib.asynccontextmanager
async def serving(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[int]:
    """An aiohttp upstream answering GET / with ``handler`` on a free loopback port; yields the port."""
    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    listening = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, listening).start()
    try:
        yield listening.getsockname()[1]
    finally:
        await runner.cleanup()


async def _read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    return head, await asyncio.wait_for(reader.readexactly(length), 5)


async def test_http_1_0_keep_alive_is_granted_explicitly_and_the_connection_is_reused(tmp_path: Path) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async with serving(hello) as port:
        policy = write_policy(tmp_path / "p.yaml", {"old": {"targets": [f"http://127.0.0.1:{port}"]}})
        async with running_sidecar(policy) as sidecar:
            url = listener_url(sidecar, "old")
            host, listen_port = url.removeprefix("http://").rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(listen_port))
            for _ in range(2):  # the same connection twice: it was really kept
                writer.write(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                head, body = await _read_answer(reader)
                assert head.startswith(b"HTTP/1.1 200") and body == b"hello"
                assert b"connection: keep-alive\r\n" in head.lower()
            writer.write(b"GET / HTTP/1.0\r\n\r\n")  # no keep-alive asked: closed after the answer
            head, body = await _read_answer(reader)
            assert b"connection: close\r\n" in head.lower() and body == b"hello"
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()


async def test_a_chunked_answer_to_an_http_1_0_client_ends_with_a_close(tmp_path: Path) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"one ", b"two"):
            await response.write(part)
        await response.write_eof()
        return response

    async with serving(stream) as port:
        policy = write_policy(tmp_path / "p.yaml", {"old": {"targets": [f"http://127.0.0.1:{port}"]}})
        async with running_sidecar(policy) as sidecar:
            host, listen_port = listener_url(sidecar, "old").removeprefix("http://").rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(listen_port))
            writer.write(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)  # returns only because the sidecar closes
            writer.close()
            head, body = answer.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower()
            assert b"transfer-encoding" not in head.lower() and body == b"one two"


async def test_apachebench_keep_alive_completes_through_the_sidecar_as_directly(tmp_path: Path) -> None:
    """ApacheBench (``ab -k``) speaks HTTP/1.0 with ``Connection: keep-alive`` and waits for the grant: without
    it every request hung until ab's timeout. Bounded: 200 requests on 4 connections, each side."""
    ab = require_tool("ab", "Debian package apache2-utils")

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def run_ab(url: str) -> dict[str, str]:
        proc = await asyncio.create_subprocess_exec(
            ab, "-k", "-n", "200", "-c", "4", "-s", "5", url, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, out.decode()
        fields = {}
        for line in out.decode().splitlines():
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip()] = value.strip()
        return fields

    async with serving(hello) as port:
        direct = await run_ab(f"http://127.0.0.1:{port}/")
        policy = write_policy(tmp_path / "p.yaml", {"old": {"targets": [f"http://127.0.0.1:{port}"]}})
        async with running_sidecar(policy) as sidecar:
            proxied = await run_ab(listener_url(sidecar, "old") + "/")
    for fields in (direct, proxied):
        assert fields["Complete requests"] == "200" and fields["Failed requests"] == "0"
        assert fields["Keep-Alive requests"] == "200", "every request on a kept connection"
