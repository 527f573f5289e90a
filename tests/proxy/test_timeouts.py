"""The timeout model (issue #12), through a real listener to real upstreams, each compared with going direct.

``per_try`` bounds the wait for a response head from the request's last byte; ``total`` bounds the attempts until
a head is chosen; ``idle`` bounds a silence in either direction once a body flows. A slow client is never the
upstream's failure; an upstream that falls silent mid-body is. Short real durations throughout.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.server import Sidecar
from tests.support.admin import scrape
from tests.support.raw import status_and_reason
from tests.support.sidecar import admin_url, listener_url, policy_listen, running_sidecar, write_policy
from tests.support.upstream import scripted_upstream

CHUNK = 8 * 1024
FAST = {"connect": "200ms", "per_try": "300ms", "total": "600ms", "idle": "2s"}


async def _trickle(chunks: int, gap: float, pause: float = 0.0) -> AsyncIterator[bytes]:
    """A client uploading slowly: ``chunks`` pieces of 8 KiB, ``gap`` seconds apart, ``pause`` once halfway."""
    for index in range(chunks):
        if index:
            await asyncio.sleep(pause if pause and index == chunks // 2 else gap)
        yield bytes([index % 251]) * CHUNK


def _expected_digest(chunks: int) -> str:
    digest = hashlib.sha256()
    for index in range(chunks):
        digest.update(bytes([index % 251]) * CHUNK)
    return digest.hexdigest()


async def _hash_upload(request: web.Request) -> web.StreamResponse:
    digest = hashlib.sha256()
    size = 0
    async for piece in request.content.iter_any():
        digest.update(piece)
        size += len(piece)
    return web.json_response({"sha256": digest.hexdigest(), "size": size})


async def _breaker_samples(session: aiohttp.ClientSession, sidecar: Sidecar) -> dict[object, float]:
    samples = await scrape(session, admin_url(sidecar))
    return {key: value for key, value in samples.items() if key[0].startswith("sidecar_breaker_")}


async def _upload(
    session: aiohttp.ClientSession, url: str, chunks: int, gap: float, pause: float = 0.0
) -> tuple[int, object, float]:
    started = time.monotonic()
    body = _trickle(chunks, gap, pause)
    async with session.put(url, data=body, headers={"content-length": str(chunks * CHUNK)}) as r:
        body = await r.json() if r.status == 200 else await r.text()
        return r.status, body, time.monotonic() - started


async def test_a_slow_upload_longer_than_per_try_and_total_succeeds_and_the_breaker_is_untouched(
    tmp_path: Path,
) -> None:
    """~1.6 s of upload, one pause of 500 ms in it, against per_try 300 ms and total 600 ms: the pause is within
    idle, and the upstream answers at once after the last byte → 200."""
    async with scripted_upstream(default=_hash_upload) as upstream:
        policy = write_policy(
            tmp_path / "p.yaml",
            {"svc": {"targets": [upstream.url]}},
            defaults={"timeouts": FAST, "breaker": {"failure_threshold": 1}},
            http={"replay_buffer_bytes": 1024},  # the body streams (and is not retried)
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            before = await _breaker_samples(session, sidecar)
            direct = await _upload(session, upstream.url + "/up", 8, 0.15, pause=0.5)
            through = await _upload(session, listener_url(sidecar, "svc") + "/up", 8, 0.15, pause=0.5)
            assert direct[:2] == through[:2] == (200, {"sha256": _expected_digest(8), "size": 8 * CHUNK})
            assert through[2] > 1.2, "the upload outlived per_try and total"
            rt = sidecar.runtimes["svc"]
            assert rt.stats.failures == {} and rt.effective_state().value == "closed"
            assert await _breaker_samples(session, sidecar) == before


async def test_per_try_starts_at_the_last_byte_and_still_bounds_the_head(tmp_path: Path) -> None:
    """The upload takes longer than per_try: fine. An upstream that then thinks longer than per_try: 504."""

    async def read_then_think(request: web.Request) -> web.StreamResponse:
        await request.read()
        await asyncio.sleep(1.0)
        return web.Response(text="late")

    async with scripted_upstream(default=read_then_think) as upstream:
        policy = write_policy(
            tmp_path / "p.yaml",
            {"svc": {"targets": [upstream.url]}},
            defaults={"timeouts": {**FAST, "total": "5s"}},
            http={"replay_buffer_bytes": 1024},
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            started = time.monotonic()
            status, body, elapsed = await _upload(session, listener_url(sidecar, "svc") + "/up", 4, 0.2)
            assert status == 504 and "no response head within" in str(body), body
            # ~0.6 s of upload, then per_try from the last byte: not cut 300 ms after the first.
            assert 0.8 <= elapsed < 1.5, elapsed
            assert time.monotonic() - started < 2.0
            assert sidecar.runtimes["svc"].stats.failures == {"timeout": 1}


async def _sse(request: web.Request) -> web.StreamResponse:
    """Four events 700 ms apart: each gap longer than per_try, all four longer than total, shorter than idle."""
    response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
    await response.prepare(request)
    for index in range(4):
        if index:
            await asyncio.sleep(0.7)
        await response.write(f"id: {index}\ndata: event {index}\n\n".encode())
    await response.write_eof()
    return response


async def _events(session: aiohttp.ClientSession, url: str) -> tuple[list[str], float]:
    started = time.monotonic()
    async with session.get(url, headers={"accept": "text/event-stream"}) as response:
        assert response.status == 200
        assert response.headers["content-type"] == "text/event-stream"
        events = [line.decode().strip() async for line in response.content if line.startswith(b"data:")]
    return events, time.monotonic() - started


async def test_an_sse_stream_with_gaps_longer_than_per_try_arrives_whole(tmp_path: Path) -> None:
    async with scripted_upstream(default=_sse) as upstream:
        policy = write_policy(tmp_path / "p.yaml", {"svc": {"targets": [upstream.url]}}, defaults={"timeouts": FAST})
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            direct, _ = await _events(session, upstream.url + "/events")
            through, elapsed = await _events(session, listener_url(sidecar, "svc") + "/events")
            assert through == direct == [f"data: event {i}" for i in range(4)]
            assert elapsed > 2.0, "the stream outlived total (600 ms): total stops once the head is chosen"
            rt = sidecar.runtimes["svc"]
            assert rt.stats.failures == {} and rt.effective_state().value == "closed"


async def test_an_upstream_silent_mid_body_longer_than_idle_is_cut_and_counted(tmp_path: Path) -> None:
    async def falls_silent(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-length": "100000"})
        await response.prepare(request)
        await response.write(b"x" * 1000)
        await asyncio.sleep(3)  # the sidecar gives up at idle (500 ms)
        return response

    async with scripted_upstream(default=falls_silent) as upstream:
        policy = write_policy(
            tmp_path / "p.yaml",
            {"svc": {"targets": [upstream.url]}},
            defaults={"timeouts": {**FAST, "idle": "500ms"}, "breaker": {"failure_threshold": 5}},
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            started = time.monotonic()
            async with session.get(listener_url(sidecar, "svc") + "/big") as response:
                assert response.status == 200
                received = b""
                try:
                    async for piece in response.content.iter_any():
                        received += piece
                    raise AssertionError("the body was not cut")
                except aiohttp.ClientPayloadError:
                    pass
            assert received == b"x" * 1000
            assert 0.45 <= time.monotonic() - started < 2.0
            rt = sidecar.runtimes["svc"]
            assert rt.stats.failures == {"timeout": 1}
            assert rt.breaker.snapshot(rt.clock.monotonic()).failures_in_window == 1


async def _raw(port: int, payload: bytes, wait: float) -> tuple[bytes, float]:
    """Send ``payload`` and then nothing; read until the sidecar closes (or ``wait`` passes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(payload)
    chunks = []
    try:
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        writer.close()
    return b"".join(chunks), time.monotonic() - started


async def test_a_client_silent_mid_upload_longer_than_idle_gets_408_and_the_breaker_is_untouched(
    tmp_path: Path,
) -> None:
    async with scripted_upstream(default=_hash_upload) as upstream:
        policy = write_policy(
            tmp_path / "p.yaml",
            {"svc": {"targets": [upstream.url]}},
            defaults={"timeouts": {**FAST, "idle": "500ms"}, "breaker": {"failure_threshold": 1}},
            http={"replay_buffer_bytes": 1024},
        )
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            _, port = policy_listen(policy, "svc")
            before = await _breaker_samples(session, sidecar)
            streamed = b"PUT /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 100000\r\n\r\n" + b"x" * 8192
            small = b"PUT /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 100\r\n\r\n" + b"x" * 10  # read whole first
            for payload in (streamed, small):
                answer, elapsed = await _raw(port, payload, 3.0)
                assert status_and_reason(answer) == (408, "bad_request"), answer[:300]
                assert b"reason=client_body_timeout" in answer and b"(timeouts.idle)" in answer
                assert 0.45 <= elapsed < 2.0, elapsed
            samples = await scrape(session, admin_url(sidecar))
            assert samples[("sidecar_rejected_total", (("reason", "client_timeout"), ("upstream", "svc")))] == 2
            rt = sidecar.runtimes["svc"]
            assert rt.stats.failures == {} and rt.effective_state().value == "closed"
            assert await _breaker_samples(session, sidecar) == before
            assert upstream.hits == 1, "the streamed one reached the upstream, the small one never did"


async def test_an_upstream_held_back_by_a_client_that_does_not_read_is_never_charged(tmp_path: Path) -> None:
    """The client stops reading for 3 × idle: the sidecar stops reading the upstream (back-pressure), and that
    stillness is the client's, not an upstream silence. Then it reads on and gets every byte."""
    size = 32 << 20

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-length": str(size)})
        await response.prepare(request)
        block = b"y" * (1 << 20)
        for _ in range(size >> 20):
            await response.write(block)
        return response

    async with scripted_upstream(default=big) as upstream:
        policy = write_policy(
            tmp_path / "p.yaml",
            {"svc": {"targets": [upstream.url]}},
            defaults={"timeouts": {**FAST, "idle": "400ms"}},
            http={"keepalive_timeout": "10s"},
        )
        async with running_sidecar(policy) as sidecar:
            _, port = policy_listen(policy, "svc")
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
            try:
                writer.write(b"GET /big HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200")
                await asyncio.sleep(1.2)  # not reading: buffers fill, everything stands still
                assert sidecar.runtimes["svc"].stats.failures == {}
                received = 0
                async with asyncio.timeout(20):
                    while chunk := await reader.read(1 << 20):
                        received += len(chunk)
            finally:
                writer.close()
            assert received == size
            rt = sidecar.runtimes["svc"]
            assert rt.stats.failures == {} and rt.effective_state().value == "closed"
