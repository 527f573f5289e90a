"""What the abuse and fuzz tests share: the ``Stack`` a ``stack`` fixture yields (tests/abuse/conftest.py) — one
real ``sidecar run`` per parser axis — and the upstreams behind it.

The upstreams (a recording one, a configurable "evil" one and a canary that must never be reached) run on an
event loop in a background thread, so they outlive each test's own loop and serve the whole module.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from tests.support.raw import RecordingUpstream
from tests.support.sidecar import SidecarProcess

T = TypeVar("T")
TOKEN = "s3cret-admin-token-0123456789abcdef"
PARSERS = {
    # aiohttp's C extension parser (the default) vs its pure-Python one. The data plane parses with llhttp
    # (httptools) under both, so only the admin plane's parser changes along this axis.
    "aiohttp-c": {},
    "aiohttp-pure": {"AIOHTTP_NO_EXTENSIONS": "1"},
}
UPSTREAM_OK = b"HTTP/1.1 201 Created\r\ncontent-length: 8\r\nx-from: upstream\r\n\r\nupstream"


class BackgroundLoop:
    """An asyncio loop in a daemon thread; servers started on it live until ``stop``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Canary(asyncio.Protocol):
    """Counts every connection: absolute-form and CONNECT aimed at it must never produce one."""

    connections = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Canary.connections += 1
        transport.close()


@dataclass
class Stack:
    parser: str
    process: SidecarProcess
    port: int  # the "svc" listener, in front of ``upstream``
    evil_port: int  # the "evil" listener, in front of ``evil``
    admin_port: int
    upstream: RecordingUpstream
    evil: RecordingUpstream
    canary_port: int

    def forwarded_bytes(self) -> int:
        return sum(len(c) for c in self.upstream.connections)

    def alive(self) -> bool:
        if self.process.proc.poll() is not None:
            return False
        with socket.create_connection(("127.0.0.1", self.admin_port), 2) as sock:
            sock.sendall(b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
