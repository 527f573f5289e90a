"""A streamed request body's way to the upstream, driven by callbacks: no task, no future, no timer per chunk.

The client's bytes are handed to the upstream's transport from the listener's ``data_received`` (through the
body's ``on_ready``). When the upstream's socket buffer is full the pump stops taking them — the body then
pauses reading the client above its high-water mark — and the upstream's ``resume_writing`` starts it again.
The last byte written marks the request sent at once, so an answer that follows it finds the connection
reusable.

One lazy timer per body bounds the silences by ``timeouts.idle``: the client sending nothing (its fault: 408
``client_body_timeout``, nothing charged to the upstream) or the upstream taking nothing (the upstream's timeout).
It wakes at the earliest deadline the pump could have and looks at which side it is waiting for.

An upstream may answer before the body is all in (nginx's ``return 200`` does). ``settle`` then sees the body to
its end within the discard bounds (``proxy.http.body``): on to the upstream while it takes it (its connection
can then be pooled), dropped when it does not (its connection is closed: a request half sent cannot be followed
by another one).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from proxy.http import chunked
from proxy.http.body import DISCARD_BYTES, DISCARD_SECONDS

if TYPE_CHECKING:
    from proxy.http.body import RequestBody
    from proxy.resilience.clock import Clock, Timer
    from proxy.upstream.connection import UpstreamConnection


class PumpOwner(Protocol):
    """The exchange: charged the time its client took to send, told when the client failed."""

    client_time: float
    client_fault: str | None


class BodyPump:
    __slots__ = (
        "_chunked",
        "_clock",
        "_dropped",
        "_idle",
        "_limit",
        "_owner",
        "_settle_from",
        "_settled",
        "_since",
        "_started",
        "_timer",
        "_waiting_upstream",
        "body",
        "conn",
        "done",
        "loop",
    )

    def __init__(
        self,
        owner: PumpOwner,
        body: RequestBody,
        conn: UpstreamConnection,
        chunked: bool,
        idle: float,
        clock: Clock,
    ) -> None:
        self._owner = owner
        self.body = body
        self.conn = conn
        self._chunked = chunked
        self._idle = self._limit = idle
        self._clock = clock
        self._started = clock.monotonic()
        self.loop = conn.loop
        self.done = False
        self._dropped = False  # the upstream is let go: the rest of the body is dropped (only while settling)
        self._waiting_upstream = False  # which silence the timer bounds: the upstream's, else the client's
        self._settled: asyncio.Future[bool] | None = None
        self._settle_from = 0
        self._since = self._started
        self._timer: Timer | None = clock.call_later(idle, self._check)

    def start(self) -> None:
        """Send what has arrived, and from now on what arrives."""
        self.body.on_ready = self._pump
        self.conn.on_writable = self._pump
        self._pump()

    def settle(self, keep_upstream: bool) -> asyncio.Future[bool]:
        """The upstream's whole answer is in and the body is not: see the body to its end within the discard
        bounds. True if it ended in them (the client's connection can carry its next request). ``keep_upstream``:
        the upstream's connection could be reused, so the body goes on to it; else it is dropped here."""
        settled = self._settled = self.loop.create_future()
        self._settle_from = self.body.size
        self._limit = DISCARD_SECONDS
        self._since = self._clock.monotonic()
        self._rearm(DISCARD_SECONDS)
        if not keep_upstream:
            self._drop_upstream()
        self._pump()
        return settled

    def stop(self) -> None:
        """The exchange is over: let go of the body and the connection, whatever is left of the body."""
        if not self.done:
            self._end(False)

    # -- internals -------------------------------------------------------------------------------------------

    def _pump(self) -> None:
        if self.done:
            return
        body, conn = self.body, self.conn
        if body.error is not None:
            self._client_failed("body_aborted")
            return
        settling = self._settled is not None
        if settling and body.size - self._settle_from > DISCARD_BYTES:
            self._end(False)  # more than the discard bound after the answer: the client's connection closes
            return
        if not self._dropped:
            if conn.closed or conn.write_paused:
                if not settling:
                    # Wait for the upstream (a closed one: the response side reports it, and stops us).
                    if not self._waiting_upstream:
                        self._waiting_upstream = True
                        self._since = self._clock.monotonic()
                    return
                self._drop_upstream()  # it has answered and takes no more, or is gone: drop the rest here
            else:
                chunks = body.take()
                conn.write_body(chunked.frames(chunks, body.complete) if self._chunked else chunks)
                if not settling:
                    self._waiting_upstream = False
                    self._since = self._clock.monotonic()
        if body.complete:
            self._owner.client_time += self._clock.monotonic() - self._started
            if not self._dropped:
                conn.request_sent()
            self._end(True)

    def _drop_upstream(self) -> None:
        self._dropped = True
        self.conn.on_writable = None
        self.conn.abort()  # a request half sent cannot be followed by another one on this connection
        self.body.discard()

    def _client_failed(self, fault: str) -> None:
        self._owner.client_fault = fault
        self.conn.abort()  # never let a half-sent request be completed by someone else's bytes
        self._end(False)

    def _end(self, ended: bool) -> None:
        self.done = True
        if self.body.on_ready == self._pump:
            self.body.on_ready = None
        if self.conn.on_writable == self._pump:
            self.conn.on_writable = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        settled = self._settled
        if settled is not None and not settled.done():
            settled.set_result(ended)

    def _rearm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._clock.call_later(delay, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.done:
            return
        now = self._clock.monotonic()
        if now - self._since < self._limit:
            self._timer = self._clock.call_later(self._since + self._limit - now, self._check)
        elif self._settled is not None:
            self._end(False)  # the body did not end within the discard bound's time
        elif self._waiting_upstream:
            self.conn.stalled(f"upstream took no request body for {self._idle:g}s")
            self._end(False)
        else:
            self._client_failed("body_timeout")
