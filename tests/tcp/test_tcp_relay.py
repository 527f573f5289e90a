"""The L4 relay against scripted TCP servers: half-close, back-pressure, server-first bytes, overload, and
a breaker that refuses new connections while leaving established ones alone."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

from proxy.server import Sidecar
from proxy.tcp import TcpClient
from tests.support.eventually import eventually
from tests.support.servers import echo, tcp_server
from tests.support.sidecar import free_port, running_sidecar, tcp_policy

LOCAL = "127.0.0.1"


async def roundtrip(port: int, payload: bytes = b"ping") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(LOCAL, port)
    writer.write(payload)
    await writer.drain()
    async with asyncio.timeout(2):
        assert await reader.readexactly(len(payload)) == payload
    return reader, writer


async def refused_quickly(port: int) -> float:
    """Connect and return how long it took to see the sidecar close the connection."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(LOCAL, port)
    try:
        async with asyncio.timeout(2):
            data = await reader.read(1)
    finally:
        writer.close()
    assert data == b""
    return time.monotonic() - started


def relays(sidecar: Sidecar, name: str) -> int:
    return len(sidecar.listeners[name].connections)


async def test_half_close_the_client_shuts_down_writing_and_still_gets_the_reply(tmp_path: Path) -> None:
    async def count_then_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's EOF arrives through the relay
        writer.write(b"got %d bytes" % len(data))
        await writer.drain()

    async with tcp_server(count_then_reply) as (_, port):
        policy, listen = tcp_policy(tmp_path, "svc", [f"{LOCAL}:{port}"])
        async with running_sidecar(policy):
            reader, writer = await asyncio.open_connection(LOCAL, listen)
            writer.write(b"x" * 100_000)
            writer.write_eof()
            async with asyncio.timeout(5):
                assert await reader.read() == b"got 100000 bytes"
            writer.close()


async def test_half_close_the_server_finishes_first_and_still_hears_the_client(tmp_path: Path) -> None:
    heard: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def bye_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        writer.write_eof()  # done talking, still listening
        heard.set_result(await reader.read())

    async with tcp_server(bye_then_listen) as (_, port):
        policy, listen = tcp_policy(tmp_path, "svc", [f"{LOCAL}:{port}"])
        async with running_sidecar(policy) as sidecar:
            reader, writer = await asyncio.open_connection(LOCAL, listen)
            async with asyncio.timeout(5):
                assert await reader.read() == b"bye"  # the server's EOF came through
                writer.write(b"late words")
                writer.write_eof()
                assert await heard == b"late words"
            # Both directions finished: the relay is gone and its slot is free.
            await eventually(lambda: relays(sidecar, "svc") == 0 and sidecar.runtimes["svc"].stats.inflight == 0)
            writer.close()


async def test_large_transfer_is_byte_exact_and_bounded_by_back_pressure(tmp_path: Path, relay_mode: str) -> None:
    total = 48 * 1024 * 1024
    payload = os.urandom(1024 * 1024) * (total // (1024 * 1024))
    async with tcp_server(echo) as (_, port):
        policy, listen = tcp_policy(tmp_path, "svc", [f"{LOCAL}:{port}"])
        async with running_sidecar(policy) as sidecar:
            reader, writer = await asyncio.open_connection(LOCAL, listen)
            sent = 0

            async def send() -> None:
                nonlocal sent
                view = memoryview(payload)
                for offset in range(0, total, 65536):
                    writer.write(view[offset : offset + 65536])
                    await writer.drain()
                    sent = offset + 65536
                writer.write_eof()

            sender = asyncio.create_task(send())
            try:
                # Nobody reads the echo: the sender must stall once the kernel buffers are full, and the
                # sidecar must not soak the rest up in memory.
                progress = {"sent": -1, "since": time.monotonic()}

                def stalled() -> bool:
                    if sent != progress["sent"]:
                        progress.update(sent=sent, since=time.monotonic())
                    return time.monotonic() - progress["since"] >= 0.3

                await eventually(stalled, timeout=10, what="the sender stalling (no progress for 0.3 s)")
                assert not sender.done() and sent < total
                (client_side,) = sidecar.listeners["svc"].connections
                assert isinstance(client_side, TcpClient)
                assert (client_side.relay is not None) == (relay_mode == "splice")
                buffered = client_side.buffered()
                assert buffered < 2 * 1024 * 1024, buffered

                digest = hashlib.sha256()
                received = 0
                async with asyncio.timeout(30):
                    while chunk := await reader.read(1 << 20):
                        digest.update(chunk)
                        received += len(chunk)
                    await sender
                assert received == total
                assert digest.digest() == hashlib.sha256(payload).digest()
            finally:
                sender.cancel()
                writer.close()


async def test_a_server_that_speaks_first_is_heard(tmp_path: Path) -> None:
    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hello\r\n")  # before the client has said anything (SMTP, MySQL do this)
        await writer.drain()
        line = await reader.readline()
        writer.write(b"echo " + line)
        await writer.drain()

    async with tcp_server(greet) as (_, port):
        policy, listen = tcp_policy(tmp_path, "svc", [f"{LOCAL}:{port}"])
        async with running_sidecar(policy):
            for _ in range(20):
                reader, writer = await asyncio.open_connection(LOCAL, listen)
                async with asyncio.timeout(2):
                    assert await reader.readline() == b"220 hello\r\n"
                    writer.write(b"hi\r\n")
                    assert await reader.readline() == b"echo hi\r\n"
                writer.close()


async def test_overload_closes_at_once_and_does_not_count_against_the_breaker(tmp_path: Path) -> None:
    async with tcp_server(echo) as (_, port):
        policy, listen = tcp_policy(
            tmp_path,
            "svc",
            [f"{LOCAL}:{port}"],
            limits={"max_concurrent": 1, "max_pending": 0},
            breaker={"failure_threshold": 1},
        )
        async with running_sidecar(policy) as sidecar:
            rt = sidecar.runtimes["svc"]
            _, held = await roundtrip(listen)
            for _ in range(3):  # max_pending 0: nothing to wait for (generous bound; see tests/benchmarks/at_once.py)
                assert await refused_quickly(listen) < 1.0
            assert rt.stats.rejected.get("overload") == 3
            assert rt.effective_state().value == "closed"
            held.close()
            await eventually(lambda: rt.stats.inflight == 0)
            _, again = await roundtrip(listen)  # the slot is free again
            again.close()


async def test_breaker_opens_on_connect_failures_and_leaves_established_relays_alone(tmp_path: Path) -> None:
    async with tcp_server(echo) as (server, port):
        policy, listen = tcp_policy(
            tmp_path, "svc", [f"{LOCAL}:{port}"], breaker={"failure_threshold": 2, "open_duration": "60s"}
        )
        async with running_sidecar(policy) as sidecar:
            rt = sidecar.runtimes["svc"]
            reader, writer = await roundtrip(listen, b"before")
            server.close()  # stop accepting; the established connection stays up
            for _ in range(2):
                assert await refused_quickly(listen) < 1.0  # a refused connect upstream: closed, counted
            assert rt.stats.failures.get("connect_error") == 2
            assert rt.effective_state().value == "open"

            # New connections: closed at once, with no upstream attempt (the counters show it; the bound is generous
            # for a busy CI machine, tests/benchmarks/at_once.py measures the real figure).
            assert await refused_quickly(listen) < 1.0
            assert rt.stats.rejected.get("breaker_open") == 1
            assert rt.stats.failures.get("connect_error") == 2

            # The relay opened before the breaker tripped still carries bytes both ways.
            writer.write(b"after")
            await writer.drain()
            async with asyncio.timeout(2):
                assert await reader.readexactly(5) == b"after"
            writer.close()


async def test_a_dead_target_is_skipped_and_ejected(tmp_path: Path) -> None:
    dead = free_port()  # nothing listens there
    async with tcp_server(echo) as (_, port):
        policy, listen = tcp_policy(
            tmp_path,
            "svc",
            [f"{LOCAL}:{dead}", f"{LOCAL}:{port}"],
            retry={"max_retries": 1},
            outlier={"consecutive_failures": 2, "base_ejection": "30s", "max_ejected_percent": 50},
            breaker={"failure_threshold": 50},
        )
        async with running_sidecar(policy) as sidecar:
            rt = sidecar.runtimes["svc"]
            for _ in range(6):  # every connection works: a failed connect moves on to the other target
                _, writer = await roundtrip(listen)
                writer.close()
            dead_state, live_state = rt.balancer.states
            assert dead_state.ejected(rt.clock.monotonic())
            assert dead_state.ejection_reason == "2_consecutive_connect_error"
            assert rt.stats.failures.get("connect_error") == 2  # ejected after two: never tried again
            await eventually(lambda: live_state.outstanding == 0)


async def test_a_client_that_leaves_while_connecting_frees_its_slot(tmp_path: Path) -> None:
    async with tcp_server(echo) as (_, port):
        policy, listen = tcp_policy(tmp_path, "svc", [f"{LOCAL}:{port}"], limits={"max_concurrent": 2})
        async with running_sidecar(policy) as sidecar:
            rt = sidecar.runtimes["svc"]
            for _ in range(10):
                _, writer = await asyncio.open_connection(LOCAL, listen)
                writer.close()
            await eventually(lambda: rt.stats.inflight == 0 and relays(sidecar, "svc") == 0)
            assert rt.balancer.states[0].outstanding == 0
            _, writer = await roundtrip(listen)
            writer.close()


async def test_every_target_down_in_shadow_mode_gives_up_after_one_try_each(tmp_path: Path) -> None:
    # Shadow mode never refuses, so only the try bound ends the connect loop; the lone live target left
    # after ejection must not be tried again and again.
    dead = [free_port(), free_port()]
    policy, listen = tcp_policy(
        tmp_path,
        "svc",
        [f"{LOCAL}:{port}" for port in dead],
        retry={"max_retries": 5},
        breaker={"failure_threshold": 1, "enforce": False},
        outlier={"consecutive_failures": 1, "max_ejected_percent": 50},
    )
    async with running_sidecar(policy) as sidecar:
        rt = sidecar.runtimes["svc"]
        for round_ in range(1, 4):
            assert await refused_quickly(listen) < 1.0
            assert rt.stats.failures.get("connect_error") == 2 * round_
        assert rt.stats.rejected.get("breaker_open_shadow", 0) >= 1
        await eventually(lambda: rt.stats.inflight == 0)
