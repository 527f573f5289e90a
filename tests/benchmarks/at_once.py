"""How long "at once" really is: the latency of the answers the suite only bounds generously.

    python tests/benchmarks/at_once.py [--count 200] [--loop uvloop|asyncio]

The suite checks that some answers come "at once" — an overload 503, a breaker_open 503, a refused connect's
502, a TCP connection closed by an open breaker or a full bulkhead, an upstream request cancelled when its
client goes away — with bounds generous enough for a loaded 2-core CI machine (up to a second), because what
they prove is that nothing was waited for (no timeout, no queue), which their counters and event order show.
This script measures the real figures on an in-process sidecar (as the tests run it), ``--count`` times each,
client round trip included, and prints median, p95, p99 and max in milliseconds. Loopback only; every loop is
bounded by its count and a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere in the checkout

import aiohttp
from aiohttp import web

from tests.support.servers import echo, tcp_server
from tests.support.sidecar import free_port, listener_url, running_sidecar, tcp_policy, write_policy
from tests.support.upstream import scripted_upstream, status

Measure = Callable[[Path, int], Awaitable[list[float]]]


async def timed(coro: Awaitable[Any]) -> float:
    started = time.perf_counter()
    await coro
    return (time.perf_counter() - started) * 1000


async def http_get(session: aiohttp.ClientSession, url: str, want: int, reason: str) -> None:
    async with asyncio.timeout(5), session.get(url) as response:
        await response.read()
        assert response.status == want and response.headers.get("x-sidecar-reason", "") == reason, response


async def tcp_closed(port: int) -> None:
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert await reader.read(1) == b""
        finally:
            writer.close()


async def http_overload(tmp: Path, count: int) -> list[float]:
    """max_concurrent 1, max_pending 0, the one slot held: 503 overload."""
    release = asyncio.Event()

    async def held(_: web.Request) -> web.StreamResponse:
        async with asyncio.timeout(60):
            await release.wait()
        return web.Response(text="held")

    async with scripted_upstream(held) as up:
        policy = write_policy(
            tmp / "p.yaml", {"api": {"targets": [up.url], "limits": {"max_concurrent": 1, "max_pending": 0}}}
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            url = listener_url(sidecar, "api")
            holder = asyncio.create_task(session.get(url))
            while up.hits == 0 and not holder.done():  # bounded by the upstream's 60 s hold
                await asyncio.sleep(0.005)
            try:
                return [await timed(http_get(session, url, 503, "overload")) for _ in range(count)]
            finally:
                release.set()
                (await holder).close()


async def http_breaker_open(tmp: Path, count: int) -> list[float]:
    """The breaker opened by one 503: 503 breaker_open, nothing reaches the upstream."""
    async with scripted_upstream(status(503)) as up:
        policy = write_policy(tmp / "p.yaml", {"api": {"targets": [up.url], "breaker": {"failure_threshold": 1}}})
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            url = listener_url(sidecar, "api")
            await http_get(session, url, 503, "")
            return [await timed(http_get(session, url, 503, "breaker_open")) for _ in range(count)]


async def http_connect_refused(tmp: Path, count: int) -> list[float]:
    """A target nothing listens on (the breaker kept closed): 502 connect_error."""
    dead = f"http://127.0.0.1:{free_port()}"
    policy = write_policy(tmp / "p.yaml", {"api": {"targets": [dead], "breaker": {"failure_threshold": 1_000_000}}})
    async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
        url = listener_url(sidecar, "api")
        return [await timed(http_get(session, url, 502, "connect_error")) for _ in range(count)]


async def tcp_breaker_open(tmp: Path, count: int) -> list[float]:
    """A TCP upstream whose breaker one refused connect opened: new connections closed."""
    policy, listen = tcp_policy(tmp, "db", [f"127.0.0.1:{free_port()}"], breaker={"failure_threshold": 1})
    async with running_sidecar(policy):
        await tcp_closed(listen)  # the refused connect that opens it
        return [await timed(tcp_closed(listen)) for _ in range(count)]


async def tcp_overload(tmp: Path, count: int) -> list[float]:
    """A TCP upstream with max_concurrent 1, max_pending 0, the one slot held: new connections closed."""
    async with tcp_server(echo) as (_, port):
        policy, listen = tcp_policy(tmp, "db", [f"127.0.0.1:{port}"], limits={"max_concurrent": 1, "max_pending": 0})
        async with running_sidecar(policy):
            reader, writer = await asyncio.open_connection("127.0.0.1", listen)
            try:
                writer.write(b"hold")
                async with asyncio.timeout(5):
                    assert await reader.readexactly(4) == b"hold"
                return [await timed(tcp_closed(listen)) for _ in range(count)]
            finally:
                writer.close()


@contextlib.asynccontextmanager
async def hanging() -> AsyncIterator[tuple[int, list[asyncio.Event], list[asyncio.Event]]]:
    """An upstream that reads requests and never answers; per connection: request seen, connection lost."""
    seen: list[asyncio.Event] = []
    lost: list[asyncio.Event] = []

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.seen, self.lost = asyncio.Event(), asyncio.Event()
            seen.append(self.seen)
            lost.append(self.lost)

        def data_received(self, data: bytes) -> None:
            self.seen.set()

        def connection_lost(self, exc: Exception | None) -> None:
            self.lost.set()

    server = await asyncio.get_running_loop().create_server(Protocol, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1]), seen, lost
    finally:
        server.close()


async def client_disconnect(tmp: Path, count: int) -> list[float]:
    """A client closes its connection mid-request: time until the upstream connection is dropped."""
    async with hanging() as (port, seen, lost):
        timeouts = {"per_try": "10s", "total": "20s"}
        policy = write_policy(tmp / "p.yaml", {"api": {"targets": [f"http://127.0.0.1:{port}"], "timeouts": timeouts}})
        async with running_sidecar(policy) as sidecar:
            _, _, address = listener_url(sidecar, "api").rpartition("/")
            host, _, listen = address.rpartition(":")
            timings = []
            for _ in range(count):
                before = len(seen)  # the upstream connection this request opens is the next one
                _, writer = await asyncio.open_connection(host, int(listen))
                writer.write(b"GET /hang HTTP/1.1\r\nhost: api\r\n\r\n")
                async with asyncio.timeout(5):
                    while len(seen) <= before or not seen[before].is_set():  # bounded by the timeout
                        await asyncio.sleep(0.001)
                    upstream_lost = lost[before]
                    closed = time.perf_counter()
                    writer.close()
                    await upstream_lost.wait()
                timings.append((time.perf_counter() - closed) * 1000)
            return timings


MEASURES: dict[str, Measure] = {
    "HTTP 503 overload": http_overload,
    "HTTP 503 breaker_open": http_breaker_open,
    "HTTP 502 connect_error (refused)": http_connect_refused,
    "TCP close, breaker open": tcp_breaker_open,
    "TCP close, overload": tcp_overload,
    "client gone → upstream dropped": client_disconnect,
}


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def run(count: int) -> None:
    print(f"{'what':<34} {'median':>8} {'p95':>8} {'p99':>8} {'max':>8}   (ms, {count} each)")
    for name, measure in MEASURES.items():
        with tempfile.TemporaryDirectory(prefix="seawall-at-once-") as tmp:
            samples = await measure(Path(tmp), count)
        print(
            f"{name:<34} {statistics.median(samples):8.3f} {quantile(samples, 0.95):8.3f} "
            f"{quantile(samples, 0.99):8.3f} {max(samples):8.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="measurements of each kind (default 200)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="as `sidecar run` (uvloop)")
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)  # the sidecar's own log lines would interleave with the table
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(run(args.count))
    else:
        asyncio.run(run(args.count))
    return 0


if __name__ == "__main__":
    sys.exit(main())
