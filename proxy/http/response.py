"""The answer to one request on a client's HTTP/1.1 connection: the ``ResponseSink`` its exchange writes through.

It holds the state of that one answer — started yet?, chunked?, may the connection carry another request?, the
upstream connection a streamed body comes from (paused while the client lags) — so that none of it lives on the
connection, which outlives every request on it. The connection (``proxy.http.listener``) is the codec: it parses,
queues requests, makes one ``Response`` per request it serves, and owns the socket; a ``Response`` writes through
it only while it is open.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from proxy.http import chunked as chunking
from proxy.http import wire

if TYPE_CHECKING:
    from proxy.http.request import Request
    from proxy.upstream.connection import UpstreamConnection

_JOIN_LIMIT = 64 * 1024  # below this, copying head and body together beats a vectored write


class Codec(Protocol):
    """What a ``Response`` needs of its connection."""

    def writable(self) -> asyncio.Transport | None:
        """The transport, while answers may still be written on it."""

    def finished(self, response: Response) -> None:
        """The exchange of ``response`` is over: go on with the next request, if the connection may carry one."""

    def failed(self, response: Response) -> None:
        """Serving raised: answer 500 if nothing of ``response`` went out yet, else cut it short."""

    def hand_over(self) -> tuple[asyncio.Transport, asyncio.BaseProtocol, list[bytes]] | None:
        """After a 101: the transport for the relay, the protocol that hears of its end, the bytes read past it."""

    def cut(self) -> None:
        """Drop the connection now: an answer cut short must not be followed by anything."""


class Response:
    """One request's answer (``proxy.http.sink.ResponseSink``)."""

    __slots__ = ("_codec", "chunked", "http11", "keep_alive", "log_requests", "req", "started", "upstream")

    def __init__(self, codec: Codec, req: Request, log_requests: bool) -> None:
        self._codec = codec
        self.req = req
        self.http11 = req.http11
        self.keep_alive = req.keep_alive  # what the client asked for; the answer may still close
        self.log_requests = log_requests
        self.started = False  # a status line has gone out: a failure now can only cut the answer short
        self.chunked = False  # the body goes out chunked
        self.upstream: UpstreamConnection | None = None  # where a streamed body comes from

    def send_continue(self) -> None:
        transport = self._codec.writable()
        if transport is not None:
            transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def send_raw(self, answer: bytes) -> None:
        """A whole answer made by the sidecar, already encoded."""
        transport = self._codec.writable()
        if self.started or transport is None:
            return
        self.started = True
        transport.write(answer)

    def switch_protocols(self) -> tuple[asyncio.Transport, asyncio.BaseProtocol, list[bytes]] | None:
        """A 101: the relay takes the transport over, with the bytes read past the head."""
        handed = self._codec.hand_over()
        if handed is not None:
            self.started = True
        return handed

    def start_response(self, head: bytes, chunked: bool, keep_alive: bool, upstream: UpstreamConnection) -> None:
        self.started = True
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.upstream = upstream
        transport = self._codec.writable()
        if transport is not None:
            transport.write(head)

    def respond_whole(
        self, head: bytes, chunks: list[bytes], chunked: bool, keep_alive: bool, trailers: wire.Headers | None = None
    ) -> None:
        """Head and a body already complete, in one write (one syscall for the common small answer)."""
        self.started = True
        self.keep_alive = keep_alive
        transport = self._codec.writable()
        if transport is None:
            return
        if chunked:
            transport.write(chunking.whole(head, chunks, trailers))
        elif not chunks:
            transport.write(head)
        elif len(chunks) == 1 and len(chunks[0]) < _JOIN_LIMIT:
            transport.write(head + chunks[0])  # the common small answer: one buffer, one syscall
        else:
            transport.writelines((head, *chunks))  # large: hand the buffers over as they are (writev)

    def write_body(self, data: bytes) -> None:
        transport = self._codec.writable()
        if transport is not None:
            transport.write(chunking.chunk(data) if self.chunked else data)

    def end_response(self, trailers: wire.Headers | None = None) -> None:
        transport = self._codec.writable()
        if self.chunked and transport is not None:
            transport.write(chunking.end(trailers))
        self.upstream = None

    def abort(self) -> None:
        """Cut the answer short: the client sees a truncated body, never a second status line."""
        self.keep_alive = False
        self._codec.cut()

    def internal_error(self) -> None:
        self._codec.failed(self)

    def served(self) -> None:
        self.upstream = None
        self._codec.finished(self)
