"""Bulk streams, resets, shutdown and set-up failure on the L4 relay, by splice and by the protocol fallback (the
``relay_mode`` fixture runs every test on both, on both event loops)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy import splice, tcp
from proxy.server import Sidecar
from proxy.tcp import TcpClient
from tests.support.eventually import eventually
from tests.support.servers import echo, tcp_server
from tests.support.sidecar import running_sidecar, tcp_policy

# Fallbacks of the splice relay: they run with the splice relay only (never as skips on the protocol path).
SPLICE_ONLY = pytest.mark.parametrize("relay_mode", ["splice"] if splice.AVAILABLE else [], indirect=True)

LOCAL = "127.0.0.1"
MIB = 1024 * 1024
STREAM = 64 * MIB


def stream_block(seed: bytes) -> bytes:
    return hashlib.shake_256(seed).digest(MIB)  # 1 MiB, repeated: each side's stream differs from the other's


async def send_stream(writer: asyncio.StreamWriter, block: bytes, total: int) -> None:
    view = memoryview(block)
    for offset in range(0, total, 256 * 1024):
        writer.write(view[offset % len(block) :][: 256 * 1024])
        await writer.drain()
    writer.write_eof()  # half-close: done talking, still listening


async def read_to_eof(reader: asyncio.StreamReader, hold: float = 0.0) -> tuple[int, bytes]:
    """Read until EOF; ``hold`` seconds of not reading first (a slow reader: the relay must hold back)."""
    await asyncio.sleep(hold)
    digest, total = hashlib.sha256(), 0
    while chunk := await reader.read(MIB):
        digest.update(chunk)
        total += len(chunk)
    return total, digest.digest()


def expected(block: bytes, total: int) -> bytes:
    digest = hashlib.sha256()
    for _ in range(total // len(block)):
        digest.update(block)
    return digest.digest()


def the_relay(sidecar: Sidecar) -> TcpClient:
    (client_side,) = sidecar.listeners["svc"].connections
    assert isinstance(client_side, TcpClient)
    return client_side


async def test_64_mib_each_way_at_once_byte_exact_with_half_close_and_slow_readers(
    tmp_path: Path, relay_mode: str
) -> None:
    up_block, down_block = stream_block(b"up"), stream_block(b"down")
    server_got: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()

    async def both_ways(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sending = asyncio.create_task(send_stream(writer, down_block, STREAM))
        server_got.set_result(await read_to_eof(reader, hold=0.5))
        await sending

    async with tcp_server(both_ways) as (_, port):
        policy, listen = tcp_policy(tmp_path, "svc", [f"{LOCAL}:{port}"])
        async with running_sidecar(policy) as sidecar:
            reader, writer = await asyncio.open_connection(LOCAL, listen)
            try:
                sending = asyncio.create_task(send_stream(writer, up_block, STREAM))
                receiving = asyncio.create_task(read_to_eof(reader, hold=0.5))
                await asyncio.sleep(0.3)  # both readers hold back: what the sidecar holds meanwhile is bounded
                relay = the_relay(sidecar)
                assert relay.buffered() <= 2 * (splice.PIPE_SIZE + splice.COPY_SIZE), relay.buffered()
                async with asyncio.timeout(60):
                    assert await receiving == (STREAM, expected(down_block, STREAM))
                    assert await server_got == (STREAM, expected(up_block, STREAM))
                    await sending
                if relay_mode == "splice":
                    assert relay.relay is not None
                    assert relay.relay.spliced() > STREAM  # the bulk went by splice, not through Python
                else:
                    assert relay.relay is None
                # Both directions ended with a half-close each: the relay is gone and its slot free.
                await eventually(lambda: not sidecar.listeners["svc"].connections)
                await eventually(lambda: sidecar.runtimes["svc"].stats.inflight == 0)
            finally:
                writer.close()


async def test_small_exchanges_after_a_bulk_one_still_arrive_whole(tmp_path: Path) -> None:
    # A direction splices after a large read and copies again after a small one: the order must hold across.
    async with tcp_server(echo) as (_, port):
        policy, listen = tcp_policy(tmp_path, "svc", [f"{LOCAL}:{port}"])
        async with running_sidecar(policy):
            reader, writer = await asyncio.open_connection(LOCAL, listen)
            try:
                async with asyncio.timeout(30):
                    for size in (10, 4 * MIB, 3, 70_000, 1, 2 * MIB, 5):
                        payload = os.urandom(size)
                        writer.write(payload)
                        await writer.drain()
                        assert await reader.readexactly(size) == payload
            finally:
                writer.close()


async def test_an_upstream_reset_closes_the_client_and_frees_the_slot(tmp_path: Path) -> None:
    async def reset_after_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        writer.transport.abort()

    async with tcp_server(reset_after_hello) as (_, port):
        policy, listen = tcp_policy(tmp_path, "svc", [f"{LOCAL}:{port}"])
        async with running_sidecar(policy) as sidecar:
            reader, writer = await asyncio.open_connection(LOCAL, listen)
            try:
                writer.write(b"hello")
                async with asyncio.timeout(5):
                    with contextlib.suppress(ConnectionResetError):  # a reset or an EOF: either is closed
                        assert await reader.read() == b""
                await eventually(lambda: not sidecar.listeners["svc"].connections)
                await eventually(lambda: sidecar.runtimes["svc"].stats.inflight == 0)
            finally:
                writer.close()


async def test_stopping_the_sidecar_closes_open_relays(tmp_path: Path) -> None:
    async with tcp_server(echo) as (_, port):
        policy, listen = tcp_policy(tmp_path, "svc", [f"{LOCAL}:{port}"])
        sidecar = Sidecar(policy)
        await sidecar.start()
        try:
            reader, writer = await asyncio.open_connection(LOCAL, listen)
            writer.write(b"ping")
            async with asyncio.timeout(2):
                assert await reader.readexactly(4) == b"ping"
            started = time.monotonic()
            await sidecar.stop(drain_timeout=0.5)
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # closed by the sidecar, not left hanging
            assert time.monotonic() - started < 3
            assert sidecar.runtimes["svc"].stats.inflight == 0
            writer.close()
        finally:
            await sidecar.stop()


@contextlib.asynccontextmanager
async def echoed_through_a_relay(tmp_path: Path) -> AsyncIterator[Sidecar]:
    """A sidecar relaying to an echo server, after 3 MiB went through it and came back whole."""
    async with tcp_server(echo) as (_, port):
        policy, listen = tcp_policy(tmp_path, "svc", [f"{LOCAL}:{port}"])
        async with running_sidecar(policy) as sidecar:
            reader, writer = await asyncio.open_connection(LOCAL, listen)
            try:
                payload = os.urandom(3 * MIB)
                writer.write(payload)
                async with asyncio.timeout(10):
                    assert await reader.readexactly(len(payload)) == payload
                yield sidecar
            finally:
                writer.close()


@SPLICE_ONLY
async def test_a_relay_that_cannot_get_its_pipes_copies_instead(
    tmp_path: Path, relay_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:

    def no_pipes(flags: int) -> tuple[int, int]:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(splice.os, "pipe2", no_pipes)
    async with echoed_through_a_relay(tmp_path) as sidecar:
        relay = the_relay(sidecar).relay
        assert relay is not None and relay.spliced() == 0


@SPLICE_ONLY
async def test_a_client_socket_that_cannot_be_taken_over_is_relayed_by_the_protocols(
    tmp_path: Path, relay_mode: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:

    def no_descriptor(transport: object) -> socket.socket:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(tcp, "take_socket", no_descriptor)
    with caplog.at_level(logging.WARNING, logger="seawall.tcp"):
        async with echoed_through_a_relay(tmp_path) as sidecar:
            assert the_relay(sidecar).relay is None
    assert any(getattr(r, "event", "") == "tcp_splice_unavailable" for r in caplog.records)


@SPLICE_ONLY
async def test_a_pipe_smaller_than_the_copy_buffer_is_not_used(
    tmp_path: Path, relay_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(splice, "PIPE_SIZE", 4096)  # as past the per-user pipe budget: a page or two
    async with echoed_through_a_relay(tmp_path) as sidecar:
        relay = the_relay(sidecar).relay
        assert relay is not None and relay.spliced() == 0
