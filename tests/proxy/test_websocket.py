"""Upgraded connections (issue #12): a real WebSocket server and client (the ``websockets`` library), through a real
``sidecar run`` process, compared with talking to the server directly.

Each test starts its own sidecar process (uvloop, as in production) with ``drain_timeout`` 1 s, so leaving one is
quick even with a relay still open.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import trustme
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support.admin import admin_json, metric
from tests.support.eventually import eventually
from tests.support.raw import recording_upstream, status_and_reason
from tests.support.servers import tcp_server
from tests.support.sidecar import SidecarProcess, policy_listen, sidecar_process, write_policy
from tests.support.tls import ca_file, client_context, leaf, server_context
from tests.support.websocket import (
    REFUSED_BODY,
    client,
    closed_by_peer,
    conversation,
    handshake_refused,
    websocket_server,
)

HANDSHAKE = (
    b"GET /echo HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


@contextlib.contextmanager
def sidecar(tmp_path: Path, target_port: int, **upstream: Any) -> Iterator[tuple[SidecarProcess, str, int]]:
    """A sidecar process in front of one target: (process, ws:// base URL, listener port)."""
    policy = write_policy(
        tmp_path / "ws.yaml",
        {"svc": {"targets": [f"http://127.0.0.1:{target_port}"], **upstream}},
        http={"drain_timeout": "1s"},
    )
    port = policy_listen(policy, "svc")[1]
    with sidecar_process(policy) as process:
        yield process, f"ws://127.0.0.1:{port}", port


async def raw_exchange(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send ``payload``, read until the peer closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def test_a_conversation_through_the_sidecar_is_the_one_had_directly(tmp_path: Path) -> None:
    async with websocket_server() as server:
        direct = await conversation(f"ws://127.0.0.1:{server.port}", server)
        with sidecar(tmp_path, server.port) as (process, base, _):
            proxied = await conversation(base, server)
            assert metric(process.admin, "sidecar_requests_total", upstream="svc", code="101") == 1
            assert metric(process.admin, "sidecar_requests_total", upstream="svc", code="403") == 1
    assert direct == {
        "text": "hello, relay",
        "binary": (256 * 1024, True),
        "pong": True,
        "client_close": (4000, "done here"),
        "server_close": [(4000, "done here")],
        "refused": (403, REFUSED_BODY.encode()),
    }
    assert proxied == direct


async def _early_bytes_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers 101 and a greeting in one write, echoes upper-cased until EOF, then says BYE and closes."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nGREETING;")
    while data := await reader.read(65536):
        writer.write(data.upper())
    writer.write(b";BYE")
    await writer.drain()


async def _early_bytes_client(port: int) -> bytes:
    """Sends its first bytes with the handshake, half-closes once they are echoed, reads until closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(HANDSHAKE + b"early bytes")
        seen = await asyncio.wait_for(reader.readuntil(b"EARLY BYTES"), 5)
        writer.write_eof()
        return seen + await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_bytes_sent_past_either_head_are_relayed_and_a_half_close_passed_on(tmp_path: Path) -> None:
    async with tcp_server(_early_bytes_upstream) as (_, upstream_port):
        direct = await _early_bytes_client(upstream_port)
        with sidecar(tmp_path, upstream_port) as (_, _, port):
            proxied = await _early_bytes_client(port)
    assert direct.endswith(b"\r\n\r\nGREETING;EARLY BYTES;BYE")
    assert proxied.split(b"\r\n\r\n", 1)[1] == direct.split(b"\r\n\r\n", 1)[1]
    head = proxied.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 101") and b"upgrade: websocket" in head and b"connection: upgrade" in head


async def test_a_refused_handshake_is_one_answer_and_the_connection_closes(tmp_path: Path) -> None:
    async with websocket_server() as server:
        with sidecar(tmp_path, server.port) as (_, _, port):
            # A request pipelined behind the handshake is neither answered nor forwarded.
            answer = await raw_exchange(
                port, HANDSHAKE.replace(b"/echo", b"/refuse") + b"GET /plain HTTP/1.1\r\nHost: svc\r\n\r\n"
            )
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert answer.startswith(b"HTTP/1.1 403") and answer.endswith(REFUSED_BODY.encode())
    assert b"connection: close" in answer.lower()


async def test_an_open_websocket_holds_its_concurrency_slot(tmp_path: Path) -> None:
    async with websocket_server() as server:
        limits = {"max_concurrent": 1, "max_pending": 0}
        with sidecar(tmp_path, server.port, limits=limits) as (process, base, port):
            plain = f"http://127.0.0.1:{port}/plain"
            async with aiohttp.ClientSession() as session:
                async with client(base + "/echo") as ws:
                    await ws.send("hold")
                    assert await ws.recv() == "hold"
                    assert metric(process.admin, "sidecar_upgraded_connections", upstream="svc") == 1
                    assert metric(process.admin, "sidecar_inflight_requests", upstream="svc") == 1
                    async with session.get(plain) as response:
                        assert response.status == 503
                        assert response.headers["x-sidecar-reason"] == "overload"
                    status, body = await handshake_refused(base + "/echo")
                    assert status == 503 and b"overload" in body

                async def plain_status() -> int:
                    async with session.get(plain) as response:
                        return response.status

                await eventually(plain_status, until=lambda s: s == 200, what="the slot released when the relay closed")
            assert metric(process.admin, "sidecar_upgraded_connections", upstream="svc") == 0


async def test_a_silent_relay_is_closed_after_timeouts_idle_and_a_talking_one_is_not(tmp_path: Path) -> None:
    idle = 0.6
    async with websocket_server() as server:
        with sidecar(tmp_path, server.port, timeouts={"idle": f"{idle * 1000:g}ms"}) as (_, base, _):
            async with client(base + "/echo") as ws:
                started = last = time.monotonic()
                while last - started < 2 * idle:  # talking: each silence shorter than idle
                    await asyncio.sleep(idle / 4)
                    await ws.send("tick")
                    assert await asyncio.wait_for(ws.recv(), 2) == "tick"
                    last = time.monotonic()
                code, _ = await closed_by_peer(ws, timeout=idle + 3)
                silence = time.monotonic() - last
    assert code == 1006  # a TCP close, no close frame: the sidecar does not speak WebSocket
    assert idle * 0.9 <= silence < idle + 2, silence
    assert server.closes[-1][0] == 1006


async def test_the_upstream_going_away_closes_the_client_as_it_would_directly(tmp_path: Path) -> None:
    async def drop(base: str) -> tuple[int | None, str]:
        async with client(base + "/drop") as ws:
            await ws.send("bye")
            try:
                await asyncio.wait_for(ws.recv(), 5)
            except ConnectionClosed as exc:
                return ws.close_code, type(exc).__name__
        raise AssertionError("the connection stayed open")

    async with websocket_server() as server:
        direct = await drop(f"ws://127.0.0.1:{server.port}")
        with sidecar(tmp_path, server.port) as (_, base, _):
            proxied = await drop(base)
    assert direct == (1006, "ConnectionClosedError")
    assert proxied == direct


async def test_failed_handshakes_open_the_breaker_and_a_101_is_a_success_at_once(tmp_path: Path) -> None:
    async with websocket_server() as server:
        breaker = {"failure_threshold": 2, "open_duration": "500ms"}
        with sidecar(tmp_path, server.port, breaker=breaker) as (process, base, _):
            assert await handshake_refused(base + "/fail") == (500, b"broken\n")
            assert await handshake_refused(base + "/fail") == (500, b"broken\n")
            try:
                async with client(base + "/echo"):
                    raise AssertionError("handshake accepted while the breaker is open")
            except InvalidStatus as exc:
                assert exc.response.status_code == 503
                assert exc.response.headers["x-sidecar-reason"] == "breaker_open"
            assert server.open == 0

            async def probe() -> bool:
                with contextlib.suppress(InvalidStatus):
                    async with client(base + "/echo") as ws:
                        # The half-open probe succeeded with its 101: the breaker closes while the relay is open.
                        report = admin_json(process.admin, "/breakers")["svc"]
                        await ws.send("still here")
                        assert await ws.recv() == "still here"
                        return bool(report["state"] == "closed" and report["totals"]["successes"] == 1)
                return False

            await eventually(probe, timeout=5, what="a handshake succeeding once the breaker half-opens")
            assert admin_json(process.admin, "/breakers")["svc"]["totals"]["failures"] == 2


async def test_sigterm_closes_an_open_relay_when_drain_timeout_ends(tmp_path: Path) -> None:
    async with websocket_server() as server:
        with sidecar(tmp_path, server.port) as (process, base, _):
            async with client(base + "/echo") as ws:
                process.signal(signal.SIGTERM)
                await ws.send("draining")  # the relay runs on through the drain
                assert await asyncio.wait_for(ws.recv(), 2) == "draining"
                code, waited = await closed_by_peer(ws, timeout=5)
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, process.proc.wait, 10) == 0
    assert code == 1006
    assert waited < 1.0 + 1.5, f"closed {waited:.2f}s after SIGTERM with drain_timeout 1s"


async def test_h2c_is_not_upgraded_but_served_as_plain_http(tmp_path: Path) -> None:
    async with recording_upstream() as upstream:
        with sidecar(tmp_path, upstream.port) as (_, _, port):
            answer = await raw_exchange(
                port,
                b"GET /h2c HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\nGET /next HTTP/1.1\r\nHost: svc\r\n"
                b"Connection: close\r\n\r\n",
            )
    assert answer.count(b"HTTP/1.1 200 OK") == 2 and b" 101 " not in answer
    assert [url for url, _, _ in upstream.requests] == [b"/h2c", b"/next"]
    sent = {name.lower() for name, _ in upstream.requests[0][1]}
    assert not {b"upgrade", b"http2-settings"} & sent
    assert {name.lower(): value for name, value in upstream.requests[0][1]}.get(b"connection") is None


def _switching(answer: bytes) -> Any:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        await reader.read()  # until the sidecar lets go

    return serve


async def test_a_101_nobody_asked_for_or_without_upgrade_is_a_bad_response(tmp_path: Path) -> None:
    full = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi"
    bare = b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x02hi"
    async with tcp_server(_switching(full)) as (_, full_port), tcp_server(_switching(bare)) as (_, bare_port):
        with sidecar(tmp_path, full_port) as (_, _, port):
            unasked = await raw_exchange(port, b"GET /plain HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
        with sidecar(tmp_path, bare_port) as (_, _, port):
            without_upgrade = await raw_exchange(port, HANDSHAKE)
    for answer in (unasked, without_upgrade):
        assert status_and_reason(answer) == (502, "bad_response"), answer
        assert answer.count(b"HTTP/1.1 ") == 1 and b"\x81\x02hi" not in answer


async def test_a_client_that_stops_reading_stops_the_upstream_being_read(tmp_path: Path) -> None:
    """Back-pressure through the relay: the sidecar buffers a window, not the stream."""
    total, chunk = 64 << 20, b"x" * (256 << 10)
    sent = 0

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        while sent < total:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
        await reader.read()

    async with tcp_server(flood) as (_, upstream_port):
        with sidecar(tmp_path, upstream_port, timeouts={"idle": "10s"}) as (_, _, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
            try:
                writer.write(HANDSHAKE)
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                writer.transport.pause_reading()  # the client stops reading

                async def stalled() -> bool:
                    before = sent
                    await asyncio.sleep(0.3)
                    return 0 < sent == before

                await eventually(stalled, timeout=10, what="the upstream held back while the client does not read")
                assert sent < total // 2, f"{sent} of {total} bytes left the upstream"
                writer.transport.resume_reading()
                received = 0
                while received < total:
                    data = await asyncio.wait_for(reader.read(1 << 20), 5)
                    assert data, f"closed after {received} bytes"
                    received += len(data)
                assert received == total
            finally:
                writer.close()


async def test_a_handshake_pipelined_behind_a_request_is_answered_in_turn(tmp_path: Path) -> None:
    async def plain_then_switch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readuntil(b"\r\n\r\n")).startswith(b"GET /plain "):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        while data := await reader.read(65536):
            writer.write(data.upper())

    async def talk(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /plain HTTP/1.1\r\nHost: svc\r\n\r\n" + HANDSHAKE + b"early bytes")
            return await asyncio.wait_for(reader.readuntil(b"EARLY BYTES"), 5)
        finally:
            writer.close()

    async with tcp_server(plain_then_switch) as (_, upstream_port):
        direct = await talk(upstream_port)
        with sidecar(tmp_path, upstream_port) as (_, _, port):
            proxied = await talk(port)
    for answer in (direct, proxied):
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.count(b"HTTP/1.1 ") == 2
        switched = answer.split(b"ok", 1)[1]
        assert switched.startswith(b"HTTP/1.1 101 ") and switched.endswith(b"\r\n\r\nEARLY BYTES")


async def test_a_conversation_with_a_wss_upstream_is_the_one_had_directly(tmp_path: Path) -> None:
    """The relay over an https:// target: the sidecar's TLS connection to the upstream carries the WebSocket."""
    ca = trustme.CA()
    cert = leaf(ca, tmp_path, "ws", "127.0.0.1")
    async with websocket_server(server_context(cert)) as server:
        direct = await conversation(f"wss://127.0.0.1:{server.port}", server, ssl=client_context(ca))
        policy = write_policy(
            tmp_path / "wss.yaml",
            {
                "svc": {
                    "targets": [f"https://127.0.0.1:{server.port}"],
                    "tls": {"ca_file": str(ca_file(ca, tmp_path / "ca.pem"))},
                }
            },
            http={"drain_timeout": "1s"},
        )
        port = policy_listen(policy, "svc")[1]
        with sidecar_process(policy) as process:
            proxied = await conversation(f"ws://127.0.0.1:{port}", server)
            assert metric(process.admin, "sidecar_requests_total", upstream="svc", code="101") == 1
    assert direct["binary"] == (256 * 1024, True) and direct["client_close"] == (4000, "done here")
    assert proxied == direct
