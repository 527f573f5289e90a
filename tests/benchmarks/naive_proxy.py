"""The naive aiohttp reverse proxy the benchmark compares against: what one writes in an afternoon.

web.Application in front, one shared ClientSession behind, whole bodies buffered. It runs on uvloop (as the
sidecar does) so the comparison is about the proxy code, not the event loop.

    python tests/benchmarks/naive_proxy.py LISTEN_PORT UPSTREAM_URL
"""

from __future__ import annotations

import sys

from aiohttp import ClientSession, TCPConnector, web

# RFC 9110 §7.6.1 hop-by-hop headers, plus the ones aiohttp sets itself for the body it sends.
SKIP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "content-encoding",
}


def make_app(upstream: str) -> web.Application:
    app = web.Application()

    async def open_session(app: web.Application) -> None:
        # limit=0: no connection cap, so the pool never becomes the bottleneck at 50 connections.
        app["session"] = ClientSession(connector=TCPConnector(limit=0), auto_decompress=False)

    async def close_session(app: web.Application) -> None:
        await app["session"].close()

    async def handle(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in SKIP and k.lower() != "host"}
        body = await request.read()
        async with app["session"].request(
            request.method, upstream + request.rel_url.raw_path_qs, headers=headers, data=body or None
        ) as resp:
            payload = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in SKIP}
            return web.Response(status=resp.status, body=payload, headers=out)

    app.on_startup.append(open_session)
    app.on_cleanup.append(close_session)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2].rstrip("/")
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # still a fair baseline without it, just slower
        import asyncio

        loop = asyncio.new_event_loop()
    web.run_app(make_app(upstream), host="127.0.0.1", port=port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
