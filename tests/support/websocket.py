"""A real WebSocket server (the ``websockets`` library) on loopback, and client scenarios that can run against
it directly or through the sidecar, so the two can be compared outcome for outcome.

Paths on the server:
  /echo     echoes every message; records the close code and reason it received
  /refuse   refuses the handshake: 403 with a body
  /fail     refuses the handshake: 500 (a failure, for the breaker)
  /drop     after the first message, the server goes away (TCP close, no close frame)
  /plain    a plain HTTP 200 (for requests that are not handshakes)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Request, Response, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

REFUSED_BODY = "no websockets for you\n"


@dataclass
class WsServer:
    port: int
    closes: list[tuple[int | None, str | None]] = field(default_factory=list)  # what the server was told
    open: int = 0

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"


@contextlib.asynccontextmanager
async def websocket_server(ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[WsServer]:
    """With ``ssl_context``: a wss:// server (TLS on the same port)."""
    record = WsServer(port=0)

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/refuse":
            return connection.respond(HTTPStatus.FORBIDDEN, REFUSED_BODY)
        if request.path == "/fail":
            return connection.respond(HTTPStatus.INTERNAL_SERVER_ERROR, "broken\n")
        if request.path == "/plain":
            return connection.respond(HTTPStatus.OK, "plain\n")
        return None

    async def handler(ws: ServerConnection) -> None:
        record.open += 1
        try:
            async for message in ws:
                if ws.request is not None and ws.request.path == "/drop":
                    ws.transport.abort()
                    return
                await ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            record.open -= 1
            record.closes.append((ws.close_code, ws.close_reason))

    async with serve(
        handler, "127.0.0.1", 0, process_request=process_request, ping_interval=None, ssl=ssl_context
    ) as server:
        record.port = int(next(iter(server.sockets)).getsockname()[1])
        yield record


def client(url: str, **kw: Any) -> connect:
    """A client with no keep-alive pings of its own (silences are the tests' to make) and bounded waits."""
    return connect(url, ping_interval=None, open_timeout=5, close_timeout=5, **kw)


async def handshake_refused(url: str, **kw: Any) -> tuple[int, bytes]:
    """The status and body of a refused handshake."""
    try:
        async with client(url, **kw):
            pass
    except InvalidStatus as exc:
        return exc.response.status_code, exc.response.body or b""
    raise AssertionError(f"{url}: the handshake was accepted")


async def conversation(base: str, server: WsServer, **kw: Any) -> dict[str, Any]:
    """The scenarios the sidecar must not change: text, a 256 KiB binary frame, ping/pong, a clean close with
    code and reason (seen by both ends), and a refused handshake. ``base`` is ``ws://host:port`` (or wss://,
    with the client's ``ssl`` context in ``kw``)."""
    seen: dict[str, Any] = {}
    payload = os.urandom(256 * 1024)
    closes_before = len(server.closes)
    async with client(base + "/echo", **kw) as ws:
        await ws.send("hello, relay")
        seen["text"] = await asyncio.wait_for(ws.recv(), 5)
        await ws.send(payload)
        echoed = await asyncio.wait_for(ws.recv(), 5)
        seen["binary"] = (len(echoed), echoed == payload)
        pong = await ws.ping(b"are you there")
        await asyncio.wait_for(pong, 5)
        seen["pong"] = True
        await ws.close(4000, "done here")
        seen["client_close"] = (ws.close_code, ws.close_reason)
    for _ in range(100):  # the server's handler records its view as it ends; bounded
        if len(server.closes) > closes_before:
            break
        await asyncio.sleep(0.01)
    seen["server_close"] = server.closes[closes_before:]
    seen["refused"] = await handshake_refused(base + "/refuse", **kw)
    return seen


async def closed_by_peer(ws: ClientConnection, timeout: float) -> tuple[int | None, float]:
    """Wait for the connection to be closed from the other side: (close code the client saw, seconds waited)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(ws.wait_closed(), timeout)
    return ws.close_code, loop.time() - started
