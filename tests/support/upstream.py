"""Real upstream servers on loopback sockets, scripted per test."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from tests.support.sidecar import free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ScriptedUpstream:
    """An aiohttp server answering from a script: each request pops the next handler (or uses the default)."""

    port: int
    script: deque[Handler] = field(default_factory=deque)
    default: Handler | None = None
    hits: int = 0
    requests: list[web.Request] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    hit_times: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def then(self, *handlers: Handler) -> ScriptedUpstream:
        self.script.extend(handlers)
        return self

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        self.hit_times.append(asyncio.get_running_loop().time())
        self.requests.append(request)
        handler = self.script.popleft() if self.script else self.default
        if handler is None:
            return web.Response(text="ok")
        return await handler(request)


def status(code: int, body: str = "", headers: dict[str, str] | None = None) -> Handler:
    async def handler(_: web.Request) -> web.StreamResponse:
        return web.Response(status=code, text=body or f"status {code}", headers=headers)

    return handler


def delay(seconds: float, code: int = 200) -> Handler:
    async def handler(_: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(status=code, text="slow")

    return handler


@contextlib.asynccontextmanager
async def scripted_upstream(default: Handler | None = None) -> AsyncIterator[ScriptedUpstream]:
    upstream = ScriptedUpstream(port=free_port(), default=default)
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", upstream.port).start()
    try:
        yield upstream
    finally:
        await runner.cleanup()
