"""What the forwarder writes an answer to: the client side of one exchange, seen as a protocol.

The listener's ``ClientConnection`` is the real one. Keeping the forwarder to this narrow surface means the
forwarder never imports the listener (no cycle), and an ``Exchange`` can be tested with a recording fake.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from proxy.http.wire import Headers
from proxy.upstream.connection import UpstreamConnection


class ResponseSink(Protocol):
    http11: bool  # the client speaks HTTP/1.1: chunked framing is available
    keep_alive: bool  # the connection stays open after this answer unless the answer says otherwise
    log_requests: bool

    def send_continue(self) -> None:
        """``100 Continue``, for a client waiting to send its body."""

    def send_raw(self, answer: bytes) -> None:
        """A whole answer the sidecar made, already encoded (``proxy.http.answers``)."""

    def respond_whole(
        self, head: bytes, chunks: list[bytes], chunked: bool, keep_alive: bool, trailers: Headers | None = None
    ) -> None:
        """An upstream answer already complete: head and body (and, chunked, its trailers) in one write."""

    def start_response(self, head: bytes, chunked: bool, keep_alive: bool, upstream: UpstreamConnection) -> None:
        """The head of a streamed answer; ``upstream`` is paused while the client cannot keep up."""

    def switch_protocols(self) -> tuple[asyncio.Transport, asyncio.BaseProtocol, list[bytes]] | None:
        """A 101 to an upgrade request: the client's transport for the relay to take over, the protocol that
        still hears of its end, and the bytes the client sent past its request head; None if the client is gone."""

    def write_body(self, data: bytes) -> None:
        """One body chunk of a streamed answer."""

    def end_response(self, trailers: Headers | None = None) -> None:
        """The streamed answer is complete; a chunked one ends with the upstream's relayable trailers."""

    def abort(self) -> None:
        """Cut the answer short: the client sees a truncated body, never a second status line."""
