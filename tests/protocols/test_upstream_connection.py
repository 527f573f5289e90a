"""The upstream connection's timers on a ManualClock: the response head's bound and the body's silences, each
exactly on its boundary, with a fake transport in place of the socket."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from proxy.resilience.clock import ManualClock
from proxy.upstream.connection import UpstreamConnection
from proxy.upstream.errors import UpstreamTimedOut
from tests.protocols.fakes import FakeTransport

MS = 0.001


class Pool:
    """Where the connection goes back to, recorded."""

    def __init__(self) -> None:
        self.released: list[UpstreamConnection] = []
        self.forgotten: list[UpstreamConnection] = []

    def release(self, conn: UpstreamConnection) -> None:
        self.released.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self.forgotten.append(conn)


def connected() -> tuple[UpstreamConnection, FakeTransport, ManualClock, Pool]:
    clock, pool = ManualClock(), Pool()
    conn = UpstreamConnection(pool, clock=clock)
    transport = FakeTransport()
    transport.set_protocol(conn)
    conn.connection_made(cast(asyncio.Transport, transport))
    return conn, transport, clock, pool


async def test_no_response_head_within_the_bound_fails_the_exchange_exactly_at_it() -> None:
    conn, transport, clock, pool = connected()
    waiter = conn.begin(b"GET / HTTP/1.1\r\nhost: u\r\n\r\n", None, False, 5.0)
    assert transport.written == b"GET / HTTP/1.1\r\nhost: u\r\n\r\n"
    clock.advance(5.0 - MS)
    assert not waiter.done() and not transport.aborted
    clock.advance(MS)
    with pytest.raises(UpstreamTimedOut, match="no response head within 5s"):
        await waiter
    assert transport.aborted and pool.forgotten == [conn]


async def test_a_streamed_request_starts_the_heads_clock_at_its_last_byte() -> None:
    conn, transport, clock, _ = connected()
    conn.request_complete = False
    waiter = conn.begin(b"POST / HTTP/1.1\r\nhost: u\r\ntransfer-encoding: chunked\r\n\r\n", None, False, 5.0)
    clock.advance(60.0)
    assert not waiter.done(), "no bound while the body is still being sent"
    conn.request_sent()
    clock.advance(5.0 - MS)
    assert not waiter.done()
    clock.advance(MS)
    assert isinstance(waiter.exception(), UpstreamTimedOut) and transport.aborted


async def test_a_body_silent_for_idle_fails_exactly_then_but_not_while_the_client_holds_it() -> None:
    conn, transport, clock, _ = connected()
    head = conn.begin(b"GET / HTTP/1.1\r\nhost: u\r\n\r\n", None, False, 5.0)
    conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345")
    assert (await head).status == 200
    got: list[bytes] = []
    done = conn.deliver(got.append, 30.0)
    assert got == [b"12345"]
    clock.advance(20.0)
    conn.data_received(b"67")  # activity: the silence starts again
    assert got == [b"12345", b"67"]
    conn.pause_reading()  # the client lags: holding the upstream is not its silence
    clock.advance(100.0)
    assert not done.done() and not transport.reading
    conn.resume_reading()
    clock.advance(30.0 - MS)
    assert not done.done()
    clock.advance(MS)
    with pytest.raises(UpstreamTimedOut, match="response body stalled for 30s"):
        await done
