"""The fault proxy's own tests: each toxic does what it says, in the direction and from the offset asked."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.support.eventually import eventually
from tests.support.faults import (
    DOWNSTREAM,
    UPSTREAM,
    Bandwidth,
    Latency,
    LimitData,
    ResetPeer,
    Slicer,
    SlowClose,
    Timeout,
    fault_proxy,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def target(handler: Handler = _echo) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A loopback server; yields its port and what each connection sent it (filled as they end)."""
    received: list[bytes] = []

    async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = bytearray()
        received.append(b"")
        index = len(received) - 1

        class Tee:
            async def read(self, n: int) -> bytes:
                data = await reader.read(n)
                buffer.extend(data)
                received[index] = bytes(buffer)
                return data

        await (_echo(Tee(), writer) if handler is _echo else handler(Tee(), writer))  # type: ignore[arg-type]

    server = await asyncio.start_server(recording, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()


async def _roundtrip(port: int, payload: bytes, expect: int, timeout: float = 3.0) -> tuple[bytes, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(payload)
    data = b""
    async with asyncio.timeout(timeout):
        while len(data) < expect:
            chunk = await reader.read(65536)
            if not chunk:
                break
            data += chunk
    elapsed = time.monotonic() - started
    writer.close()
    return data, elapsed


async def _read_all(reader: asyncio.StreamReader, timeout: float = 3.0) -> bytes:
    data = b""
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            data += chunk
    return data


async def test_without_toxics_bytes_pass_both_ways_and_are_counted() -> None:
    async with target() as (port, _), fault_proxy(port) as proxy:
        payload = bytes(range(256)) * 100
        data, _ = await _roundtrip(proxy.port, payload, len(payload))
        assert data == payload
        # The proxy records the last bytes after relaying them: wait for it to have done so.
        await eventually(
            lambda: proxy.records and proxy.records[0].bytes_down == len(payload), what="the last bytes recorded"
        )
        record = proxy.records[0]
        assert record.connected and record.bytes_up == len(payload) and record.bytes_down == len(payload)


async def test_latency_with_jitter_delays_each_chunk_within_bounds() -> None:
    async with target() as (port, _), fault_proxy(port, Latency(latency=0.1, jitter=0.03), seed=1) as proxy:
        timings = []
        for _ in range(5):
            data, elapsed = await _roundtrip(proxy.port, b"ping", 4)
            assert data == b"ping"
            timings.append(elapsed)
        assert all(0.07 <= t < 0.2 for t in timings), timings
        assert max(timings) - min(timings) > 0.005, "jitter should vary the delay"


async def test_bandwidth_limits_the_rate() -> None:
    async with target() as (port, _), fault_proxy(port, Bandwidth(rate=100_000)) as proxy:
        data, elapsed = await _roundtrip(proxy.port, b"x" * 30_000, 30_000)
        assert len(data) == 30_000
        assert 0.27 <= elapsed < 1.0, elapsed


async def test_slow_close_holds_the_fin() -> None:
    async def say_bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        await writer.drain()
        writer.close()

    async with target(say_bye) as (port, _), fault_proxy(port, SlowClose(delay=0.3)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        started = time.monotonic()
        assert await _read_all(reader) == b"bye"
        assert time.monotonic() - started >= 0.28
        writer.close()


async def test_timeout_holds_data_then_closes() -> None:
    async with target() as (port, received), fault_proxy(port, Timeout(direction=UPSTREAM, timeout=0.3)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        started = time.monotonic()
        writer.write(b"never delivered")
        assert await _read_all(reader) == b""
        assert time.monotonic() - started >= 0.28
        writer.close()
    assert received in ([], [b""])


async def test_timeout_zero_holds_the_connection_open() -> None:
    async with target() as (port, _), fault_proxy(port, Timeout(timeout=0)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"echo me")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(10), 0.3)
        writer.close()


@pytest.mark.parametrize("direction", [UPSTREAM, DOWNSTREAM])
async def test_reset_peer_sends_rst(direction: str) -> None:
    async with target() as (port, _), fault_proxy(port, ResetPeer(direction=direction)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"hello")
        with pytest.raises(ConnectionResetError):
            await _read_all(reader)
        writer.close()
        assert proxy.records[0].ended == "reset"


async def test_reset_mid_stream_after_an_offset() -> None:
    async with target() as (port, _), fault_proxy(port, ResetPeer(after=10, timeout=0.05)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"0123456789abcdef")
        got = b""
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(3):
                while chunk := await reader.read(100):
                    got += chunk
        assert got == b"0123456789", "the bytes before the offset pass, nothing after"
        writer.close()


async def test_slicer_delivers_intact_data_in_small_delayed_pieces() -> None:
    async with target() as (port, _), fault_proxy(port, Slicer(average_size=10, size_variation=3, delay=0.01)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        payload = bytes(range(200))
        writer.write(payload)
        pieces = []
        async with asyncio.timeout(3):
            while sum(map(len, pieces)) < len(payload):
                pieces.append(await reader.read(65536))
        assert b"".join(pieces) == payload
        assert len(pieces) >= 10 and max(map(len, pieces)) <= 13
        writer.close()


async def test_limit_data_closes_after_n_bytes_in_its_direction() -> None:
    async with target() as (port, received), fault_proxy(port, LimitData(direction=UPSTREAM, bytes=7)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"0123456789")
        await _read_all(reader)  # the whole connection is closed (the echo may not make it back first)
        writer.close()
    assert received == [b"0123456"], "the target saw the first 7 bytes only"


async def test_limit_data_from_an_offset_downstream() -> None:
    async with target() as (port, _), fault_proxy(port, LimitData(after=4, bytes=2)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"0123456789")
        assert await _read_all(reader) == b"012345"
        writer.close()


async def test_probability_and_connection_cap() -> None:
    async with target() as (port, _), fault_proxy(port, seed=7) as proxy:
        never = proxy.add(LimitData(bytes=0, probability=0.0))
        sometimes = proxy.add(Latency(latency=0.0, probability=0.5))
        first_only = proxy.add(Latency(latency=0.0, connections=1))
        for _ in range(40):
            data, _ = await _roundtrip(proxy.port, b"hi", 2)
            assert data == b"hi"
        assert never.applied == 0
        assert 10 <= sometimes.applied <= 30, sometimes.applied
        assert first_only.applied == 1


async def test_toxics_added_later_act_on_open_connections() -> None:
    async with target() as (port, _), fault_proxy(port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"a")
        assert await reader.read(1) == b"a"
        proxy.add(ResetPeer(direction=UPSTREAM))
        writer.write(b"b")
        with pytest.raises(ConnectionResetError):
            await _read_all(reader)
        writer.close()


async def test_disable_refuses_and_drops_then_enable_serves_on_the_same_port() -> None:
    async with target() as (port, _), fault_proxy(port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await proxy.disable()
        with pytest.raises(ConnectionResetError):
            await _read_all(reader)
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", proxy.port)
        await proxy.enable()
        data, _ = await _roundtrip(proxy.port, b"back", 4)
        assert data == b"back"


async def test_target_refusing_is_passed_on_as_a_reset() -> None:
    async with target() as (port, _):
        pass  # closed again: nothing listens on `port` now
    async with fault_proxy(port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        with pytest.raises(ConnectionResetError):
            await _read_all(reader)
        writer.close()
        assert proxy.records[0].ended == "refused"
