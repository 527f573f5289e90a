"""Bodies stream both ways byte-exact, and the sidecar's memory does not grow with their size."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.support.sidecar import policy_listen, sidecar_process, write_policy
from tests.support.upstream import scripted_upstream

MiB = 1 << 20
CHUNK = 256 * 1024


def _pattern(size: int) -> AsyncIterator[bytes]:
    """Deterministic, incompressible-looking bytes without holding them all."""

    async def generate() -> AsyncIterator[bytes]:
        block = hashlib.sha512(b"seawall").digest() * (CHUNK // 64)
        sent = 0
        counter = 0
        while sent < size:
            piece = block[: min(CHUNK, size - sent)]
            piece = counter.to_bytes(8, "big") + piece[8:] if len(piece) >= 8 else piece
            counter += 1
            sent += len(piece)
            yield piece

    return generate()


async def _digest_of(size: int) -> str:
    digest = hashlib.sha256()
    async for piece in _pattern(size):
        digest.update(piece)
    return digest.hexdigest()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@contextlib.asynccontextmanager
async def _peak_rss(pid: int) -> AsyncIterator[list[int]]:
    """Samples the process's RSS every 20 ms while the block runs; yields [baseline, peak] in KiB."""
    result = [_rss_kib(pid), 0]
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            result[1] = max(result[1], _rss_kib(pid))
            await asyncio.sleep(0.02)

    task = asyncio.create_task(sample())
    try:
        yield result
    finally:
        stop.set()
        await task


async def _hash_upload(request: web.Request) -> web.StreamResponse:
    digest = hashlib.sha256()
    size = 0
    async for piece in request.content.iter_chunked(CHUNK):
        digest.update(piece)
        size += len(piece)
    return web.json_response({"sha256": digest.hexdigest(), "size": size})


def _download(size: int):  # type: ignore[no-untyped-def]
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        if request.query.get("framing") == "length":
            response.content_length = size
        await response.prepare(request)
        async for piece in _pattern(size):
            await response.write(piece)
        await response.write_eof()
        return response

    return handler


@pytest.mark.parametrize("size_mib", [8, 256])
async def test_bodies_both_ways_are_byte_exact_in_bounded_memory(tmp_path: Path, size_mib: int) -> None:
    size = size_mib * MiB
    expected = await _digest_of(size)

    async def route(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            return await _download(size)(request)
        return await _hash_upload(request)

    async with scripted_upstream(default=route) as upstream:
        policy = write_policy(
            tmp_path / "p.yaml", {"big": {"targets": [upstream.url], "timeouts": {"per_try": "10s", "total": "60s"}}}
        )
        with sidecar_process(policy) as sidecar:
            host, port = policy_listen(policy, "big")
            url = f"http://{host}:{port}/blob"
            timeout = aiohttp.ClientTimeout(total=120)
            async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as client:
                async with _peak_rss(sidecar.proc.pid) as rss:
                    # Upload, chunked (no Content-Length: streamed, not retried).
                    async with client.post(url, data=_pattern(size)) as response:
                        assert response.status == 200
                        assert await response.json() == {"sha256": expected, "size": size}
                    # Upload with a Content-Length.
                    async with client.put(url, data=_pattern(size), headers={"content-length": str(size)}) as r:
                        assert await r.json() == {"sha256": expected, "size": size}
                    # Downloads, chunked and with a length.
                    for framing in ("chunked", "length"):
                        digest = hashlib.sha256()
                        received = 0
                        async with client.get(url, params={"framing": framing}) as response:
                            assert response.status == 200
                            async for piece in response.content.iter_chunked(CHUNK):
                                digest.update(piece)
                                received += len(piece)
                        assert received == size
                        assert digest.hexdigest() == expected
            baseline, peak = rss
            growth_mib = (peak - baseline) / 1024
            assert growth_mib < 64, f"sidecar RSS grew {growth_mib:.1f} MiB while streaming {size_mib} MiB"
