"""The HTTP/1.1 client protocol (``ClientConnection``) driven without sockets, after uvicorn's ``tests/protocols``:
bytes go in through ``data_received``, a fake transport records what comes out, a ``ManualClock`` moves time,
and a stand-in for the forwarder answers through the same sink calls ``forward`` makes. The real-socket tests
(tests/proxy, tests/abuse) stay: these pin the protocol's own decisions to exact bytes and exact boundaries."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

from proxy.http.listener import LINGER_SECONDS, ClientConnection
from proxy.http.request import Request
from proxy.http.sink import InFlight, ResponseSink, in_task
from proxy.http.upgrade import Relay
from proxy.policy.loader import load_text
from proxy.policy.model import HttpServerPolicy
from proxy.resilience.clock import ManualClock
from proxy.runtime import UpstreamRuntime
from proxy.sockets import Drainable
from proxy.upstream.connection import UpstreamConnection
from tests.protocols.fakes import FakeTransport

HEADER_TIMEOUT = 10.0
KEEPALIVE_TIMEOUT = 30.0
IDLE = 60.0  # the route's timeouts.idle: a body's silences, an upgraded relay's
MS = 0.001

POLICY = f"""\
http: {{header_timeout: {HEADER_TIMEOUT:g}s, keepalive_timeout: {KEEPALIVE_TIMEOUT:g}s}}
upstreams:
  api:
    listen: 127.0.0.1:18080
    targets: [http://127.0.0.1:18081]
    timeouts: {{idle: {IDLE:g}s}}
"""


@dataclass
class Handler:
    """The forwarder's stand-in: records each request, then runs ``answer`` on it (by default a 200 whose body
    is the request's path)."""

    answer: Callable[[Request, ResponseSink], Awaitable[None]] | None = None
    seen: list[Request] = field(default_factory=list)
    cancelled: int = 0

    def __call__(self, rt: UpstreamRuntime, req: Request, sink: ResponseSink) -> InFlight | None:
        return in_task(self._serve(req, sink), sink)

    async def _serve(self, req: Request, sink: ResponseSink) -> None:
        self.seen.append(req)
        try:
            if self.answer is None:
                sink.respond_whole(ok_head(len(req.path), sink.keep_alive), [req.path], False, sink.keep_alive)
            else:
                await self.answer(req, sink)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def ok_head(length: int | None, keep_alive: bool = True) -> bytes:
    framing = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    return b"HTTP/1.1 200 OK\r\n" + framing + (b"" if keep_alive else b"\r\nconnection: close") + b"\r\n\r\n"


def ok(body: bytes) -> bytes:
    return ok_head(len(body)) + body


@dataclass
class Client:
    conn: ClientConnection
    transport: FakeTransport
    clock: ManualClock
    handler: Handler
    connections: set[Drainable]
    clock_start: float

    def send(self, data: bytes) -> None:
        self.conn.data_received(data)

    def advance_to(self, offset: float) -> None:
        """Stand exactly ``offset`` seconds after the connection was made."""
        self.clock.advance(self.clock_start + offset - self.clock.monotonic())


async def settle() -> None:
    """Let every task the protocol started run as far as it can without the test doing anything."""
    for _ in range(10):
        await asyncio.sleep(0)


def connect(handler: Handler | None = None, high_water: int = 1 << 16) -> Client:
    config, issues = load_text(POLICY)
    assert config is not None, issues
    clock = ManualClock()
    rt = UpstreamRuntime(config.upstreams[0], clock)
    http: HttpServerPolicy = config.http
    assert (http.header_timeout, http.keepalive_timeout) == (HEADER_TIMEOUT, KEEPALIVE_TIMEOUT)
    handler = handler or Handler()
    connections: set[Drainable] = set()
    conn = ClientConnection(lambda: rt, http, connections, False, clock, handler)
    transport = FakeTransport(high_water)
    transport.set_protocol(conn)
    conn.connection_made(cast(asyncio.Transport, transport))
    return Client(conn, transport, clock, handler, connections, clock.monotonic())


GET = b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n"


async def test_a_get_is_handed_to_the_handler_and_its_answer_written_and_the_connection_kept() -> None:
    client = connect()
    client.send(GET)
    await settle()
    (req,) = client.handler.seen
    assert (req.method, req.path, req.client_ip, req.http11) == ("GET", b"/a", b"10.1.2.3", True)
    assert client.transport.written == ok(b"/a")
    assert not client.transport.is_closing() and not client.transport.eof and client.transport.reading
    assert client.connections == {client.conn}


async def test_pipelined_requests_are_answered_in_order_one_at_a_time() -> None:
    gates = [asyncio.Event(), asyncio.Event()]

    async def answer(req: Request, sink: ResponseSink) -> None:
        await gates[len(handler.seen) - 1].wait()
        sink.respond_whole(ok_head(len(req.path)), [req.path], False, True)

    handler = Handler(answer)
    client = connect(handler)
    client.send(b"GET /1 HTTP/1.1\r\nHost: svc\r\n\r\nGET /2 HTTP/1.1\r\nHost: svc\r\n\r\n")
    await settle()
    assert [r.path for r in handler.seen] == [b"/1"], "the second waits for the first's answer"
    assert not client.transport.reading, "no more is read while a pipelined request waits"
    gates[1].set()  # the second is ready first: it must still be answered second
    await settle()
    assert client.transport.written == b""
    gates[0].set()
    await settle()
    assert [r.path for r in handler.seen] == [b"/1", b"/2"]
    assert client.transport.written == ok(b"/1") + ok(b"/2")
    assert client.transport.reading and not client.transport.is_closing()


async def test_a_malformed_request_is_answered_400_and_the_connection_closed_after_lingering() -> None:
    client = connect()
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\nBad Header: x\r\n\r\n")
    await settle()
    assert client.handler.seen == [], "nothing of it is forwarded"
    out = bytes(client.transport.written)
    assert out.startswith(b"HTTP/1.1 400 ") and b"\r\nconnection: close\r\n" in out.lower()
    assert b"bad_request" in out
    assert client.transport.eof and not client.transport.closed  # FIN sent; unread input drained for a while
    client.send(b"more junk")  # dropped, not parsed
    assert client.transport.written == out
    client.advance_to(LINGER_SECONDS - MS)
    assert not client.transport.closed
    client.advance_to(LINGER_SECONDS)
    assert client.transport.closed and not client.transport.aborted


async def test_a_head_not_complete_in_header_timeout_gets_408_exactly_at_the_bound() -> None:
    client = connect()
    client.advance_to(4.0)
    client.send(b"GET / HTTP/1.1\r\nHost: s")  # the head starts 4 s after the connection
    client.advance_to(4.0 + HEADER_TIMEOUT - MS)
    assert client.transport.written == b"" and not client.transport.eof
    client.advance_to(4.0 + HEADER_TIMEOUT)
    out = bytes(client.transport.written)
    assert out.startswith(b"HTTP/1.1 408 ") and b"request head not received in time" in out
    assert client.transport.eof and client.handler.seen == []


async def test_a_new_connection_that_sends_nothing_is_closed_at_header_timeout_silently() -> None:
    client = connect()
    client.advance_to(HEADER_TIMEOUT - MS)
    assert not client.transport.is_closing()
    client.advance_to(HEADER_TIMEOUT)
    assert client.transport.closed and client.transport.written == b""


async def test_an_idle_keep_alive_connection_is_closed_at_keepalive_timeout_after_its_last_answer() -> None:
    client = connect()
    client.advance_to(5.0)
    client.send(GET)
    await settle()
    assert client.transport.written == ok(b"/a")
    client.advance_to(5.0 + KEEPALIVE_TIMEOUT - MS)
    assert not client.transport.is_closing(), "idle, not yet for keepalive_timeout"
    client.advance_to(5.0 + KEEPALIVE_TIMEOUT)
    assert client.transport.closed and client.transport.written == ok(b"/a")  # nothing asked, nothing answered
    assert client.clock.pending_timers == 0


class UpstreamReads:
    """The upstream connection as the sink sees it while streaming: told to stop and go on reading; the rest of
    its answer can only come while it is read (``flowing``)."""

    def __init__(self) -> None:
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.pauses = 0

    def pause_reading(self) -> None:
        self.flowing.clear()
        self.pauses += 1

    def resume_reading(self) -> None:
        self.flowing.set()


async def test_a_client_that_stops_reading_pauses_the_upstream_and_its_next_request_waits() -> None:
    upstream = UpstreamReads()
    big, tail = b"x" * 200, b"the end"

    async def answer(req: Request, sink: ResponseSink) -> None:
        if req.path == b"/big":
            sink.start_response(ok_head(len(big + tail)), False, True, cast(UpstreamConnection, upstream))
            sink.write_body(big)
            await upstream.flowing.wait()
            sink.write_body(tail)
            sink.end_response()
        else:
            sink.respond_whole(ok_head(2), [b"ok"], False, True)

    handler = Handler(answer)
    client = connect(handler, high_water=100)
    client.send(b"GET /big HTTP/1.1\r\nHost: svc\r\n\r\nGET /next HTTP/1.1\r\nHost: svc\r\n\r\n")
    await settle()
    assert upstream.pauses == 1 and not upstream.flowing.is_set(), "the upstream is read no faster than the client"
    assert [r.path for r in handler.seen] == [b"/big"], "the next request waits for the client to read"
    assert not client.transport.reading
    client.transport.client_reads()
    await settle()
    assert upstream.flowing.is_set()
    assert [r.path for r in handler.seen] == [b"/big", b"/next"]
    assert client.transport.written == ok_head(len(big + tail)) + big + tail + ok(b"ok")
    assert client.transport.reading


async def test_a_client_that_never_reads_again_is_dropped_after_keepalive_timeout() -> None:
    async def answer(req: Request, sink: ResponseSink) -> None:
        sink.respond_whole(ok_head(300), [b"y" * 300], False, True)

    client = connect(Handler(answer), high_water=100)
    client.send(GET)
    await settle()
    assert client.transport.writing_paused and client.transport.written == ok_head(300) + b"y" * 300
    # Paused at 0; the connection's lazy timer looks every header_timeout, and keepalive_timeout is a multiple.
    client.advance_to(KEEPALIVE_TIMEOUT - MS)
    assert not client.transport.is_closing()
    client.advance_to(KEEPALIVE_TIMEOUT)
    assert client.transport.aborted


async def test_expect_100_continue_is_answered_before_the_body_is_read() -> None:
    async def answer(req: Request, sink: ResponseSink) -> None:
        assert req.body is not None and req.expect_continue
        sink.send_continue()  # as the forwarder does before waiting for a small body
        await req.body.wait_ready(IDLE)
        echoed = req.body.whole or b""
        sink.respond_whole(ok_head(len(echoed)), [echoed], False, True)

    client = connect(Handler(answer))
    client.send(b"PUT /u HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    await settle()
    assert client.transport.written == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.send(b"hello")
    await settle()
    assert client.transport.written == b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"hello")


async def test_a_body_wait_times_out_exactly_after_idle_of_client_silence() -> None:
    outcome: list[str] = []

    async def answer(req: Request, sink: ResponseSink) -> None:
        assert req.body is not None
        try:
            await req.body.wait_ready(IDLE)
        except TimeoutError:
            outcome.append("timed out")
            sink.respond_whole(b"HTTP/1.1 408 X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n", [], False, False)

    client = connect(Handler(answer))
    client.send(b"POST /u HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\n12345")
    await settle()
    client.advance_to(IDLE - MS)
    await settle()
    assert outcome == [] and client.transport.written == b""
    client.advance_to(IDLE)
    await settle()
    assert outcome == ["timed out"]
    assert client.transport.written.startswith(b"HTTP/1.1 408 X\r\n") and client.transport.eof


async def test_a_chunked_request_with_trailers_and_a_chunked_answer_with_trailers() -> None:
    async def answer(req: Request, sink: ResponseSink) -> None:
        if req.body is None:
            sink.respond_whole(ok_head(len(req.path)), [req.path], False, True)
            return
        assert req.chunked
        await req.body.wait_ready(IDLE)
        body = req.body.whole or b""
        sink.respond_whole(ok_head(None), [body.upper()], True, True, [(b"x-digest", b"abc"), (b"host", b"evil")])

    handler = Handler(answer)
    client = connect(handler)
    client.send(b"POST /c HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await settle()
    assert client.transport.written == b"", "answered only once the body has ended"
    client.send(b"6\r\n world\r\n0\r\nX-Sum: 42\r\n\r\n")
    await settle()
    (req,) = handler.seen
    assert all(name.lower() != b"x-sum" for name, _ in req.headers), "trailers never join the head"
    assert client.transport.written == ok_head(None) + b"b\r\nHELLO WORLD\r\n0\r\nx-digest: abc\r\n\r\n"
    client.send(GET)  # the connection carries the next request
    await settle()
    assert client.transport.written.endswith(ok(b"/a"))


async def test_an_upgrade_request_hands_the_transport_and_the_early_bytes_to_the_relay() -> None:
    upstream_transport, relays = FakeTransport(), list[Relay]()
    switched = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"

    async def answer(req: Request, sink: ResponseSink) -> None:
        assert req.upgrade == b"websocket" and not req.keep_alive
        taken = sink.switch_protocols()
        assert taken is not None
        relay = Relay(IDLE, client.clock)
        relays.append(relay)
        relay.start(taken, (cast(asyncio.Transport, upstream_transport), asyncio.Protocol(), b"hi"), switched)
        await relay.done

    client = connect(Handler(answer))
    client.send(b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nframe1")
    await settle()
    (relay,) = relays
    assert client.transport.written == switched + b"hi"  # the 101, then what the upstream sent past it
    assert upstream_transport.written == b"frame1", "what the client sent past its head goes first"
    assert client.transport.reading and client.transport.get_protocol() is not client.conn
    cast(asyncio.Protocol, client.transport.get_protocol()).data_received(b"frame2")
    assert upstream_transport.written == b"frame1frame2"
    client.advance_to(IDLE - MS)
    assert not relay.done.done()
    client.advance_to(IDLE)
    await settle()
    assert relay.timed_out and client.transport.closed and upstream_transport.closed


async def test_an_http09_request_is_refused_400() -> None:
    client = connect()
    client.send(b"GET /\r\n")
    await settle()
    out = bytes(client.transport.written)
    assert out.startswith(b"HTTP/1.1 400 ") and b"HTTP/0.9 requests are not served" in out
    assert client.transport.eof and client.handler.seen == []


async def test_the_client_going_away_mid_request_cancels_the_handler_and_leaves_no_timer() -> None:
    async def answer(req: Request, sink: ResponseSink) -> None:
        await asyncio.Event().wait()  # an upstream that never answers

    handler = Handler(answer)
    client = connect(handler)
    client.send(GET)
    await settle()
    assert len(handler.seen) == 1 and handler.cancelled == 0
    client.conn.connection_lost(ConnectionResetError())
    await settle()
    assert handler.cancelled == 1
    assert client.transport.written == b"" and client.connections == set()
    assert client.clock.pending_timers == 0
