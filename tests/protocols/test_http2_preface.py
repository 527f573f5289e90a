"""The listener's first bytes: HTTP/2's client preface (h2c prior knowledge, what gRPC clients send) hands the
connection over whole, also when it comes split across reads; anything else, even a prefix of it, stays HTTP/1.1.
Driven on the fake transport, as tests/protocols/test_http1.py does."""

from __future__ import annotations

import asyncio
from typing import cast

from hyperframe.frame import Frame, GoAwayFrame, SettingsFrame

from proxy.http.h2_refusal import HTTP_1_1_REQUIRED
from proxy.http.listener import H2_PREFACE, ClientConnection
from proxy.policy.loader import load_text
from proxy.resilience.clock import ManualClock
from proxy.runtime import UpstreamRuntime
from proxy.sockets import Drainable
from tests.protocols.fakes import FakeTransport
from tests.protocols.test_http1 import POLICY, Handler, ok, settle

Handed = list[tuple[object, bytes]]


def connect(handed: Handed | None) -> tuple[ClientConnection, FakeTransport, Handler, set[Drainable]]:
    """A listener connection; with ``handed``, HTTP/2 goes to a recording hand-off, else to the default refusal."""
    config, issues = load_text(POLICY)
    assert config is not None, issues
    clock = ManualClock()
    rt = UpstreamRuntime(config.upstreams[0], clock)
    handler = Handler()
    connections: set[Drainable] = set()

    def handoff(transport: asyncio.Transport, received: bytes, conns: set[Drainable]) -> None:
        assert handed is not None and conns is connections
        handed.append((transport, received))

    http2 = handoff if handed is not None else None
    conn = ClientConnection(lambda: rt, config.http, connections, False, clock, handler, http2)
    transport = FakeTransport(1 << 16)
    transport.set_protocol(conn)
    conn.connection_made(cast(asyncio.Transport, transport))
    return conn, transport, handler, connections


async def test_the_preface_split_across_reads_hands_the_connection_over_with_every_byte_read() -> None:
    handed: Handed = []
    conn, transport, handler, connections = connect(handed)
    settings = SettingsFrame(0).serialize()
    for piece in (H2_PREFACE[:3], H2_PREFACE[3:17], H2_PREFACE[17:] + settings):
        assert handed == []
        conn.data_received(piece)
    assert handed == [(transport, H2_PREFACE + settings)]
    assert connections == set(), "the HTTP/2 side registers its own connection for draining"
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")  # a late read: not the listener's any more
    await settle()
    assert handler.seen == [] and transport.written == b""


async def test_a_request_starting_like_the_preface_stays_http11() -> None:
    handed: Handed = []
    conn, transport, handler, _ = connect(handed)
    conn.data_received(b"P")  # could still be "PRI * HTTP/2.0..."
    await settle()
    assert handler.seen == []
    conn.data_received(b"OST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    await settle()
    assert handed == []
    assert [(r.method, r.path) for r in handler.seen] == [("POST", b"/p")]
    assert transport.written == ok(b"/p")


async def test_http2_on_an_http_upstream_is_refused_in_http2_http_1_1_required() -> None:
    conn, transport, handler, _ = connect(None)
    conn.data_received(H2_PREFACE + SettingsFrame(0).serialize())
    await settle()
    assert handler.seen == []
    written = bytes(transport.written)
    settings, rest = Frame.parse_frame_header(memoryview(written[:9]))
    assert isinstance(settings, SettingsFrame) and rest == 0
    goaway, length = Frame.parse_frame_header(memoryview(written[9:18]))
    assert isinstance(goaway, GoAwayFrame)
    goaway.parse_body(memoryview(written[18 : 18 + length]))
    assert goaway.error_code == HTTP_1_1_REQUIRED
    assert transport.closed
