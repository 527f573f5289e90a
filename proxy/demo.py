"""A built-in demo upstream (``sidecar run --demo``) so the default config answers at once.

Routes: ``/`` (a small JSON hello), ``/health``, ``/status/{code}`` (answers that status), ``/delay/{ms}``.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

DEMO_HOST = "127.0.0.1"
DEMO_PORT = 18080


async def _hello(request: web.Request) -> web.Response:
    return web.json_response({"service": "seawall-demo", "path": request.path, "ok": True})


async def _health(_: web.Request) -> web.Response:
    return web.json_response({"status": "healthy"})


async def _status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    if not 200 <= code <= 599:
        raise web.HTTPBadRequest(text="status must be 200-599\n")
    return web.Response(status=code, text=json.dumps({"status": code}) + "\n", content_type="application/json")


async def _delay(request: web.Request) -> web.Response:
    milliseconds = min(int(request.match_info["ms"]), 60_000)
    await asyncio.sleep(milliseconds / 1000)
    return web.json_response({"delayed_ms": milliseconds})


def demo_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/health", _health)
    app.router.add_get(r"/status/{code:\d{3}}", _status)
    app.router.add_get(r"/delay/{ms:\d+}", _delay)
    app.router.add_route("*", "/{tail:.*}", _hello)
    return app


async def start_demo(host: str = DEMO_HOST, port: int = DEMO_PORT) -> web.AppRunner:
    runner = web.AppRunner(demo_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
