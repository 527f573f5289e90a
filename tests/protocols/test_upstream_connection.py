"""The upstream connection on a fake transport and a ManualClock: the response head's bound and the body's
silences, each exactly on its boundary; how and when the exchange hears of its head; one lazy timer per
connection, not one per request."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from proxy.resilience.clock import ManualClock
from proxy.upstream.connection import ResponseHead, UpstreamConnection
from proxy.upstream.errors import ConnectionReset, UpstreamError, UpstreamTimedOut
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


class Heard:
    """A ``HeadReceiver`` that records what it hears, and whether it was called back while the connection was
    still inside a call (it must not be: the exchange would re-enter it)."""

    def __init__(self) -> None:
        self.calls: list[tuple[ResponseHead | None, UpstreamError | None]] = []

    def __call__(self, head: ResponseHead | None, error: UpstreamError | None) -> None:
        self.calls.append((head, error))

    @property
    def head(self) -> ResponseHead:
        ((head, error),) = self.calls
        assert head is not None and error is None
        return head

    @property
    def error(self) -> UpstreamError:
        ((_, error),) = self.calls
        assert error is not None
        return error


GET = b"GET / HTTP/1.1\r\nhost: u\r\n\r\n"


def connected() -> tuple[UpstreamConnection, FakeTransport, ManualClock, Pool]:
    clock, pool = ManualClock(), Pool()
    conn = UpstreamConnection(pool, clock=clock)
    transport = FakeTransport()
    transport.set_protocol(conn)
    conn.connection_made(cast(asyncio.Transport, transport))
    return conn, transport, clock, pool


async def test_no_response_head_within_the_bound_fails_the_exchange_exactly_at_it() -> None:
    conn, transport, clock, pool = connected()
    heard = Heard()
    conn.begin(GET, None, False, 5.0, heard)
    assert transport.written == GET
    clock.advance(5.0 - MS)
    assert not heard.calls and not transport.aborted
    clock.advance(MS)
    assert transport.aborted and pool.forgotten == [conn]
    assert not heard.calls, "told from the loop, not from inside the timer's own call"
    await asyncio.sleep(0)
    assert isinstance(heard.error, UpstreamTimedOut) and str(heard.error) == "no response head within 5s"


async def test_a_streamed_request_starts_the_heads_clock_at_its_last_byte() -> None:
    conn, transport, clock, _ = connected()
    conn.request_complete = False
    heard = Heard()
    conn.begin(b"POST / HTTP/1.1\r\nhost: u\r\ntransfer-encoding: chunked\r\n\r\n", None, False, 5.0, heard)
    clock.advance(60.0)
    assert not transport.aborted, "no bound while the body is still being sent"
    conn.request_sent()
    clock.advance(5.0 - MS)
    assert not transport.aborted
    clock.advance(MS)
    await asyncio.sleep(0)
    assert isinstance(heard.error, UpstreamTimedOut) and transport.aborted


async def test_a_body_silent_for_idle_fails_exactly_then_but_not_while_the_client_holds_it() -> None:
    conn, transport, clock, _ = connected()
    heard = Heard()
    conn.begin(GET, None, False, 5.0, heard)
    conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345")
    assert heard.head.status == 200
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


async def test_the_head_is_told_at_the_end_of_its_read_so_an_answer_that_came_whole_is_complete() -> None:
    conn, _, _, _ = connected()
    seen: list[list[bytes] | None] = []
    conn.begin(GET, None, False, 5.0, lambda head, error: seen.append(conn.complete_body()))
    conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
    assert seen == [[b"hello"]]


async def test_a_busy_keep_alive_connection_arms_one_timer_not_one_per_request() -> None:
    conn, transport, clock, pool = connected()
    for i in range(50):
        heard = Heard()
        conn.begin(GET, None, False, 5.0, heard)
        clock.advance(0.2)  # 50 requests over 10 s: two head timeouts' worth
        conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n%d" % (i % 10))
        assert heard.head.status == 200 and conn.complete_body() == [b"%d" % (i % 10)]
        conn.finish()
        assert clock.pending_timers <= 1
    assert pool.released == [conn] * 50 and not transport.aborted


async def test_a_late_head_is_still_bounded_after_many_quick_ones_on_the_same_timer() -> None:
    conn, transport, clock, _ = connected()
    for _ in range(3):
        conn.begin(GET, None, False, 5.0, Heard())
        clock.advance(3.0)
        conn.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
        conn.finish()
    heard = Heard()
    conn.begin(GET, None, False, 5.0, heard)  # the timer armed for the first request has long fired and moved on
    clock.advance(5.0 - MS)
    assert not transport.aborted
    clock.advance(MS)
    await asyncio.sleep(0)
    assert isinstance(heard.error, UpstreamTimedOut) and transport.aborted


async def test_a_closed_pooled_connection_is_told_from_the_loop_never_inside_begin() -> None:
    conn, transport, _, _ = connected()
    transport.close()
    heard = Heard()
    conn.begin(GET, None, False, 5.0, heard)
    assert not heard.calls and transport.written == b""
    await asyncio.sleep(0)
    assert isinstance(heard.error, ConnectionReset) and heard.error.sent_nothing


async def test_an_exchange_aborted_from_under_its_waiter_hears_so_once_and_nothing_after() -> None:
    conn, transport, clock, _ = connected()
    heard = Heard()
    conn.begin(GET, None, False, 5.0, heard)
    conn.abort()  # as the body pump does when the client stalls mid-upload
    assert heard.calls == [] and transport.aborted and clock.pending_timers == 0
    clock.advance(10.0)
    await asyncio.sleep(0)
    assert isinstance(heard.error, ConnectionReset) and str(heard.error) == "exchange abandoned"
