"""The client role of ``H2Endpoint`` and ``H2Pool`` against real grpc.aio servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.h2.engine import H2Endpoint, StreamReset
from proxy.policy.values import Target
from proxy.upstream.errors import ConnectFailed
from proxy.upstream.h2pool import H2Pool
from tests.h2.support import CHUNK, read_all, request_headers, start_grpc_server, unary
from tests.support.sidecar import free_port


@pytest.fixture
async def server() -> AsyncIterator[tuple[Any, int]]:
    srv, port = await start_grpc_server()
    yield srv, port
    await srv.stop(None)


async def connect(port: int) -> H2Endpoint:
    loop = asyncio.get_running_loop()
    _, endpoint = await loop.create_connection(H2Endpoint.client, "127.0.0.1", port)
    await asyncio.wait_for(endpoint.ready, 5)
    return endpoint


async def test_unary_call(server: tuple[Any, int]) -> None:
    _, port = server
    endpoint = await connect(port)
    stream = await endpoint.open_stream(request_headers(port, "Unary"))
    messages, status = await asyncio.wait_for(unary(stream, b"hello"), 5)
    assert (messages, status) == ([b"hello"], b"0")
    assert stream.headers is not None and (b":status", b"200") in stream.headers
    await asyncio.wait_for(stream.closed, 5)
    assert not endpoint.streams
    endpoint.close()
    await asyncio.wait_for(endpoint.lost, 5)


async def test_server_streaming_30_mb(server: tuple[Any, int]) -> None:
    _, port = server
    endpoint = await connect(port)
    stream = await endpoint.open_stream(request_headers(port, "Stream"))
    messages, status = await asyncio.wait_for(unary(stream, b"30"), 30)
    assert status == b"0"
    assert len(messages) == 30 and all(len(m) == CHUNK for m in messages)
    assert [m[0] for m in messages] == list(range(30))
    endpoint.abort()


async def test_a_stalled_stream_does_not_stall_the_others(server: tuple[Any, int]) -> None:
    """One stream's consumer stops reading after its window fills; another stream on the same connection
    still completes, and the stalled one finishes once it reads again."""
    _, port = server
    endpoint = await connect(port)
    stalled = await endpoint.open_stream(request_headers(port, "Stream"))
    await stalled.send_data(b"\0\0\0\0\x018", end_stream=True)  # 8 MiB, never consumed for now
    await stalled.wait_headers()
    flowing = await endpoint.open_stream(request_headers(port, "Stream"))
    messages, status = await asyncio.wait_for(unary(flowing, b"4"), 20)
    assert status == b"0" and len(messages) == 4
    assert sum(len(c) for c in stalled._chunks) <= 1 << 20  # bounded by the stream window
    body = await asyncio.wait_for(read_all(stalled), 20)
    assert len(body) == 8 * (CHUNK + 5)
    endpoint.abort()


async def test_goaway_lets_in_flight_streams_finish_and_refuses_new_ones(server: tuple[Any, int]) -> None:
    srv, port = server
    endpoint = await connect(port)
    slow = await endpoint.open_stream(request_headers(port, "Slow"))
    call = asyncio.ensure_future(unary(slow, b"0.5"))
    await asyncio.sleep(0.1)
    stopping = asyncio.ensure_future(srv.stop(5))
    for _ in range(100):
        if not endpoint.accepting:
            break
        await asyncio.sleep(0.02)
    assert not endpoint.accepting
    with pytest.raises(StreamReset) as refused:
        await endpoint.open_stream(request_headers(port, "Unary"))
    assert refused.value.never_processed
    assert await asyncio.wait_for(call, 5) == ([b"0.5"], b"0")
    await asyncio.wait_for(stopping, 10)
    await asyncio.wait_for(endpoint.lost, 5)


async def test_streams_over_the_servers_limit_are_refused_never_processed() -> None:
    srv, port = await start_grpc_server(("grpc.max_concurrent_streams", 1))
    try:
        endpoint = await connect(port)
        assert endpoint.available_streams == 1
        first = await endpoint.open_stream(request_headers(port, "Slow"))
        call = asyncio.ensure_future(unary(first, b"0.3"))
        with pytest.raises(StreamReset) as refused:
            await endpoint.open_stream(request_headers(port, "Unary"))
        assert refused.value.never_processed
        assert await asyncio.wait_for(call, 5) == ([b"0.3"], b"0")
        endpoint.abort()
    finally:
        await srv.stop(None)


async def test_pool_opens_a_second_connection_at_the_stream_limit() -> None:
    srv, port = await start_grpc_server(("grpc.max_concurrent_streams", 2))
    pool = H2Pool(Target("http", "127.0.0.1", port), None, connect_timeout=5)
    try:
        streams = [await pool.open_stream(request_headers(port, "Slow")) for _ in range(3)]
        assert len(pool.connections) == 2
        results = await asyncio.wait_for(asyncio.gather(*(unary(s, b"0.2") for s in streams)), 10)
        assert results == [([b"0.2"], b"0")] * 3
        again = await pool.open_stream(request_headers(port, "Unary"))
        assert await unary(again, b"x") == ([b"x"], b"0")
        assert len(pool.connections) == 2
    finally:
        await asyncio.wait_for(pool.aclose(), 5)
        await srv.stop(None)


async def test_pool_connect_failure_is_connect_failed() -> None:
    pool = H2Pool(Target("http", "127.0.0.1", free_port()), None, connect_timeout=2)
    with pytest.raises(ConnectFailed):
        await pool.open_stream(request_headers(1, "Unary"))


async def test_pool_replaces_a_connection_after_goaway() -> None:
    srv, port = await start_grpc_server()
    pool = H2Pool(Target("http", "127.0.0.1", port), None, connect_timeout=5)
    try:
        assert await unary(await pool.open_stream(request_headers(port, "Unary")), b"a") == ([b"a"], b"0")
        first = pool.connections[0]
        first.conn.goaway(0, 0)  # (as if the server had sent it: the endpoint is no longer accepting)
        first.accepting = False
        assert await unary(await pool.open_stream(request_headers(port, "Unary")), b"b") == ([b"b"], b"0")
        assert pool.connections[-1] is not first
    finally:
        await asyncio.wait_for(pool.aclose(), 5)
        await srv.stop(None)
