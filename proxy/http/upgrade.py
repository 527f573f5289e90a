"""Upgraded connections (WebSocket): after a ``101 Switching Protocols`` both sides become one byte relay.

    client ──GET, Connection: upgrade, Upgrade: websocket──▶ listener (``mark_upgrade``) ─▶ forwarder ─▶ upstream
        101 → the 101 head to the client, then bytes both ways until one side closes or both fall silent
        any other answer → delivered as usual, and the client connection closes after it

The relay takes both transports over (``set_protocol``), so neither the listener nor the upstream connection
sees a byte of it, and the plain request path pays nothing for it. What either side sent past its head before
the switch (the client's first frames, the upstream's greeting) was held by the listener and the upstream
connection and goes first. Back-pressure as on the L4 relay (``proxy.tcp``): a side whose send buffer is full
stops the other from being read. EOF from one side becomes ``write_eof`` on the other; the relay ends when both
sides are done, when either closes, or after ``timeouts.idle`` with no byte in either direction. The exchange's
bulkhead slot is held until then, so ``limits.max_concurrent`` bounds open upgraded connections too.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from proxy.http.heads import response_head

if TYPE_CHECKING:
    from proxy.http.sink import ResponseSink
    from proxy.resilience.clock import Clock, Timer
    from proxy.runtime import UpstreamRuntime
    from proxy.upstream.connection import ResponseHead, UpstreamConnection

log = logging.getLogger("seawall.upgrade")


def switching_head(head: ResponseHead, attempts: int) -> bytes:
    """The 101 for the client: the upstream's end-to-end headers, with ``Connection``/``Upgrade`` put back."""
    plain = response_head(head, False, attempts, True, True)  # drops every hop-by-hop header
    protocol = head.header(b"upgrade") or b""
    return plain[:-2] + b"connection: upgrade\r\nupgrade: " + protocol + b"\r\n\r\n"


class _End(asyncio.Protocol):
    """One side of the relay, in place of the protocol that served it until the switch (``inner``, which still
    hears of the connection's end: the listener forgets the client, the pool forgets the upstream)."""

    def __init__(self, relay: Relay, transport: asyncio.Transport, inner: asyncio.BaseProtocol) -> None:
        self.relay = relay
        self.transport = transport
        self.inner = inner
        self.peer: _End | None = None
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and not peer.lost:
            self.relay.last_activity = self.relay.clock.monotonic()
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.lost or peer.eof or not peer.transport.can_write_eof():
            self.relay.end()  # both directions are done (or EOF cannot be passed on): nothing more can flow
        elif not peer.transport.is_closing():
            peer.transport.write_eof()
        return True  # keep our write side open: the other direction may still be talking

    def pause_writing(self) -> None:
        # Our send buffer is full: stop reading the side that fills it.
        if self.peer is not None and not self.peer.lost:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.lost:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay.end()
        self.inner.connection_lost(exc)


class Relay:
    """Both ends of one upgraded connection, and the idle bound they share."""

    def __init__(self, idle: float, clock: Clock) -> None:
        self.clock = clock
        self.idle = idle
        self.last_activity = clock.monotonic()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ends: list[_End] = []
        self.timed_out = False
        self._timer: Timer | None = None

    def start(
        self,
        client: tuple[asyncio.Transport, asyncio.BaseProtocol, list[bytes]],
        upstream: tuple[asyncio.Transport, asyncio.BaseProtocol, bytes],
        head: bytes,
    ) -> None:
        """Take both transports over: the 101 head and the upstream's early bytes to the client, the client's
        early bytes to the upstream, then read both."""
        client_transport, client_inner, client_early = client
        upstream_transport, upstream_inner, upstream_early = upstream
        near = _End(self, client_transport, client_inner)
        far = _End(self, upstream_transport, upstream_inner)
        near.peer, far.peer = far, near
        self.ends = [near, far]
        client_transport.set_protocol(near)
        upstream_transport.set_protocol(far)
        client_transport.write(head + upstream_early)
        if upstream_transport.is_closing():
            self.end()  # the upstream closed right after its 101: the client gets what it sent, then the close
            return
        upstream_transport.writelines(client_early)
        for end in self.ends:
            if end.transport.is_reading() is False:  # paused for the switch (by the listener, by the connection)
                end.transport.resume_reading()
        self._timer = self.clock.call_later(self.idle, self._check_idle)

    def end(self) -> None:
        """Close both sides (what is buffered for either is still sent first)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for end in self.ends:
            if not end.lost:
                end.transport.close()
        if not self.done.done():
            self.done.set_result(None)

    def abort(self) -> None:
        """Drop both sides at once (the client went away mid-relay); nothing once the relay has ended cleanly."""
        if self.done.done():
            return
        for end in self.ends:
            if not end.lost:
                end.transport.abort()
        self.end()

    def _check_idle(self) -> None:
        self._timer = None
        silent = self.clock.monotonic() - self.last_activity
        if silent >= self.idle:
            self.timed_out = True
            self.end()
        else:
            self._timer = self.clock.call_later(self.idle - silent, self._check_idle)


async def relay(
    rt: UpstreamRuntime,
    client: ResponseSink,
    conn: UpstreamConnection,
    head: ResponseHead,
    attempts: int,
    idle: float,
) -> None:
    """Serve an upgraded connection until it ends; it owns ``conn`` from here on. It is counted open
    (``sidecar_upgraded_connections``) meanwhile, and the caller's bulkhead slot stays held. Either side going
    away ends it (the other is closed once what is buffered for it is sent); a drain that runs out of time
    aborts the client side, which ends it the same way. ``idle``: the longest silence both ways."""
    taken = client.switch_protocols()
    upstream_transport = conn.transport
    if taken is None or upstream_transport is None:
        conn.abort()
        return  # the client is gone (the upstream's 101 is counted, and that is all)
    # An upstream already gone still has its 101 (and what followed it) delivered, then the close: as directly.
    link = Relay(idle, rt.clock)  # the matched route's timeouts.idle
    stats = rt.stats
    stats.upgraded += 1
    try:
        link.start(taken, (upstream_transport, conn, conn.upgraded_tail), switching_head(head, attempts))
        await link.done
    except BaseException:
        if not link.done.done():  # cancelled mid-relay, or a bug: drop both sides, leave nothing open
            link.abort()
            conn.abort()
        raise
    finally:
        stats.upgraded -= 1
    if link.timed_out:
        log.info(
            "upgraded connection to %s closed after %gs of silence",
            rt.name,
            link.idle,
            extra={"event": "upgrade_idle_timeout", "upstream": rt.name},
        )
