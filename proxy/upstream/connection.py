"""One keep-alive HTTP/1.1 connection to a target, as an asyncio protocol.

The response is parsed with llhttp (httptools) in strict mode: bad framing, CR/LF/NUL inside header values and
similar tricks from a broken or malicious upstream end the exchange as ``BadResponse``. Body chunks go straight
from ``data_received`` to the client's transport once the forwarder has decided to deliver the answer, so the
body is never buffered whole, and back-pressure flows both ways through pause/resume_reading.

The exchange hears of its response head by a callback, called at the end of the read that completed it (so an
answer that came whole in that read is complete by then), or, for a failure, from the loop soon after — never
from inside a call the exchange made. One lazy timer per connection bounds the wait for the head and the body's
silences: it is armed for the earliest deadline and, when it wakes, looks at where the exchange is now, so a
busy keep-alive connection arms a timer once per timeout, not once per request.
"""

from __future__ import annotations

import asyncio
import enum
import ssl
import typing
from collections.abc import Callable
from typing import Protocol, TypeAlias

import httptools

from proxy.resilience.clock import Clock, SystemClock, Timer
from proxy.upstream.errors import (
    BadResponse,
    ConnectionReset,
    TlsFailed,
    UpstreamError,
    UpstreamTimedOut,
    tls_detail,
)
from proxy.upstream.tls import refused_tls13

_NO_BODY_STATUSES = frozenset({204, 304})
_CLOSED_PARSER = httptools.HttpResponseParser(object())  # a closed connection's: bound to nothing, never fed


class _OutOfStep(Exception):
    """The upstream sent more than the one answer asked for (a second response, a body to a HEAD)."""


class _Refused(Exception):
    """A callback judged the answer unrelayable; the reason is on the connection (``_bad``)."""


class ResponseHead:
    __slots__ = ("content_length", "framing", "headers", "keep_alive", "reason", "status")

    def __init__(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        framing: str,
        content_length: int | None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.keep_alive = keep_alive
        self.framing = framing  # "length" | "chunked" | "eof" | "none"
        self.content_length = content_length

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class Phase(enum.Enum):
    """Where the connection's one exchange is. Whether the socket is still open is ``closed``, apart."""

    IDLE = "idle"  # no exchange: fresh, or back in the pool
    AWAITING_HEAD = "awaiting_head"  # the request is (being) sent; no final response head yet
    RECEIVING_BODY = "receiving_body"
    COMPLETE = "complete"  # the whole response is in; the forwarder has yet to finish the exchange


# Members bound once: reading an attribute of an Enum class costs ~60 ns in CPython 3.11, several per request.
_IDLE, _AWAITING_HEAD, _RECEIVING_BODY, _COMPLETE = (
    Phase.IDLE,
    Phase.AWAITING_HEAD,
    Phase.RECEIVING_BODY,
    Phase.COMPLETE,
)


_SYSTEM_CLOCK = SystemClock()

# Hears once how a request went: the response head, or the failure that came first (with the head, if one came).
HeadReceiver: TypeAlias = Callable[["ResponseHead | None", "UpstreamError | None"], None]


class Home(Protocol):
    """Where a connection goes back to (its pool), without the connection knowing the pool."""

    def release(self, conn: UpstreamConnection) -> None: ...

    def forget(self, conn: UpstreamConnection) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """Carries one exchange at a time; returns itself to its pool when the exchange ends cleanly."""

    def __init__(self, home: Home, max_head_bytes: int = 64 * 1024, clock: Clock | None = None) -> None:
        self.pool = home
        self._clock: Clock = clock if clock is not None else _SYSTEM_CLOCK
        self._max_head_bytes = max_head_bytes
        self._head_bytes = 0  # of the trailer section: a peer must not grow it forever
        self.trailers: list[tuple[bytes, bytes]] | None = None  # a chunked answer's trailer section, if it had one
        self._head_bytes_read = 0  # raw bytes received before the head was complete
        self._bad = ""  # why a parser callback refused the answer
        self.failure: UpstreamError | None = None  # how the exchange broke, if it did
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.phase = _IDLE
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._receiver: HeadReceiver | None = None  # the exchange, until it has heard of the head or a failure
        self._done_waiter: asyncio.Future[None] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._head: ResponseHead | None = None
        self._pending_body: list[bytes] = []
        self._sink: Callable[[bytes], None] | None = None
        self._received_any = False
        self._head_only = False
        self._timer: Timer | None = None
        self._timer_due = 0.0  # when the armed timer wakes
        self._head_due = 0.0  # the response head is late after this
        self._idle_limit = 0.0
        self._last_activity = 0.0
        self.write_paused = False  # the socket buffer is full (a large upload to a slow reader)
        # The request body's pump (``proxy.http.pump``): told when the upstream takes data again or is gone.
        self.on_writable: Callable[[], None] | None = None
        self._on_pause: Callable[[bool], None] | None = None
        self.request_complete = True
        self._head_timeout = 0.0
        self._held_by_client = False  # reading paused because the client's buffer is full
        self._out_of_step = False
        self.upgrade_asked = False  # the request asks to Upgrade: a 101 is an answer, and the connection not reused
        self.upgraded_tail = b""  # after a 101: what the upstream sent past its head, for the relay
        self.tls = False  # over TLS (set by the pool once the handshake is done)

    # -- asyncio.Protocol ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self._read(data)
        if self._receiver is not None:
            self._notify()  # last: the exchange may finish, and even begin anew, on this connection

    def _read(self, data: bytes) -> None:
        self._received_any = True
        if self.phase is _IDLE:
            # Bytes nobody asked for: the connection is out of step and must not be reused.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self._head is None or self._head.status != 101:
                self._fail(BadResponse("upstream switched protocols unasked (101)"))
                return
            # Switched (a 101 to an upgrade request): stop reading until the relay takes the connection over.
            offset = upgrade.args[0] if upgrade.args and isinstance(upgrade.args[0], int) else len(data)
            self.upgraded_tail = data[offset:]
            if self.transport is not None:
                self.transport.pause_reading()
            return
        except httptools.HttpParserError as exc:
            if self._bad:
                self._fail(BadResponse(self._bad))
                return
            if not self._out_of_step:
                self._fail(BadResponse(f"upstream sent malformed HTTP: {exc}"))
                return
            # Extra bytes after the answer (the callback raised _OutOfStep) would reach the client as the start
            # of its next response: they are dropped, and the connection is never reused.
        if self._head is None:
            # Still in the head after this read: all of it was head (or interim answers). httptools holds a
            # header line whole until it ends, so the head is bounded here, by the bytes read for it.
            self._head_bytes_read += len(data)
            if self._head_bytes_read > self._max_head_bytes and not self.closed:
                self._fail(BadResponse(f"upstream response head larger than {self._max_head_bytes} bytes"))
                return
        if self._head_only and self._head is not None:
            # llhttp cannot be told a HEAD answer has no body; start afresh for the next exchange.
            self._parser = httptools.HttpResponseParser(self)
            self._on_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        self.pool.forget(self)
        self._settle_lost(exc)
        # The parser's callbacks are bound to this connection: a cycle that kept it and its transport (over TLS
        # an SSL object and uvloop's 256 KiB buffer) until the cyclic GC, growing the heap (issue 19).
        self._parser = _CLOSED_PARSER

    def _settle_lost(self, exc: Exception | None) -> None:
        if self.phase is _IDLE:
            return
        head = self._head
        complete = self.phase is _COMPLETE
        if head is not None and head.framing == "eof" and exc is None and not complete:
            self._on_complete()  # a close-delimited body ends with the connection
            return
        if not complete:
            detail = "before the response head" if head is None else "in the middle of the body"
            if head is None and self.tls and not self.reused and (isinstance(exc, ssl.SSLError) or self._refused_tls()):
                # In TLS 1.3 a server judges the client's certificate after the handshake: its refusal (an
                # alert, or a reset that overtook it) comes as the first answer. A TLS failure, not a reset.
                why = tls_detail(exc) if isinstance(exc, ssl.SSLError) else "closed before its first answer"
                self._fail(TlsFailed(f"upstream refused the TLS session: {why}"))
            else:
                self._fail(ConnectionReset(f"upstream closed the connection {detail}", sent_nothing=False))
        writable = self.on_writable
        if writable is not None:
            writable()  # the pump stops sending (or, the answer in, drops the rest of the body)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        writable = self.on_writable
        if writable is not None:
            writable()

    # -- httptools callbacks ---------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._head is not None:
            self._out_of_step = True
            raise _OutOfStep  # a second response to one request

    def on_status(self, reason: bytes) -> None:
        self._reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # The head's size is bounded in data_received, by bytes read before it completed.
        if self._head is None:
            self._headers.append((name, value))
            return
        # A chunked answer's trailer section: kept for the client (see ``relayable_trailers``), bounded like a head.
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._max_head_bytes:
            self._refuse(f"upstream trailer section larger than {self._max_head_bytes} bytes")
        if self.trailers is None:
            self.trailers = []
        self.trailers.append((name, value))

    def _refuse(self, why: str) -> typing.NoReturn:
        self._bad = why
        raise _Refused(why)

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200 or status > 599:  # one test on the common path; the rare cases sorted out inside
            if status < 100 or status > 599:
                self._refuse(f"upstream sent status {status:03d}")
            if status == 101:
                if not self.upgrade_asked:
                    self._refuse("upstream switched protocols unasked (101)")
                if not self._parser.should_upgrade():
                    self._refuse("upstream answered 101 without Connection: upgrade and Upgrade")
                # The final answer: a head without a body (framing "eof", not kept alive); the relay follows.
            else:
                # Interim answers (100 Continue, 103 Early Hints) are not forwarded; the real one follows.
                self._headers = []
                return
        headers = self._headers
        framing, length = "eof", None
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"transfer-encoding":
                if framing == "chunked" or value.strip().lower() != b"chunked":
                    # Any other coding would reach the client re-chunked and undeclared: refuse, like HAProxy.
                    self._refuse(f"upstream sent Transfer-Encoding {value.decode('latin-1')!r}")
                framing = "chunked"
            elif lowered == b"content-length" and framing != "chunked":
                framing, length = "length", int(value)
        if self._head_only or status in _NO_BODY_STATUSES or (framing == "length" and length == 0):
            framing = "none" if not (framing == "length" and length == 0) else "length"
        keep_alive = self._parser.should_keep_alive() and framing != "eof"
        self._head = ResponseHead(status, self._reason, headers, keep_alive, framing, length)
        self.phase = _RECEIVING_BODY
        self._headers = []

    def on_body(self, body: bytes) -> None:
        if self._head_only:
            self._out_of_step = True
            raise _OutOfStep  # a body to a HEAD request
        sink = self._sink
        if sink is not None:
            self._last_activity = self._clock.monotonic()
            sink(body)
        else:
            self._pending_body.append(body)

    def on_message_complete(self) -> None:
        if self._head is None:
            return  # the end of an interim 1xx answer
        if not self._head_only:
            self._on_complete()

    # -- the exchange ----------------------------------------------------------------------------------------

    def begin(
        self, head: bytes, body: bytes | None, head_only: bool, head_timeout: float, receiver: HeadReceiver
    ) -> None:
        """Send a request head (and a body already in hand); ``receiver`` hears of the response head, or of the
        failure that came first, once, never from inside this call."""
        assert self.transport is not None and self.phase is _IDLE
        self.phase = _AWAITING_HEAD
        self._head = None
        self._headers = []
        self._pending_body = []
        self._sink = None
        self._received_any = False
        self._head_bytes = self._head_bytes_read = 0
        self.trailers = None
        self.failure = None
        self._head_only = head_only
        self._done_waiter = None
        self._receiver = receiver
        if self.closed or self.transport.is_closing():
            self.failure = ConnectionReset("pooled connection was already closed", sent_nothing=True)
            self.loop.call_soon(self._notify)
            return
        self.transport.write(head + body if body else head)
        self._head_timeout = head_timeout
        if self.request_complete:
            self._start_head_clock()
        # else: the clock for the response head starts when the last body byte is sent (``request_sent``)

    def request_sent(self) -> None:
        """The streamed request body is all sent: now the upstream has ``head_timeout`` to answer."""
        self.request_complete = True
        if self.phase is _AWAITING_HEAD and not self.closed:
            self._start_head_clock()

    def stalled(self, detail: str) -> None:
        """The upstream stopped taking the request body: a timeout of the upstream's."""
        self._fail(UpstreamTimedOut(detail))

    def _start_head_clock(self) -> None:
        self._head_due = self._clock.monotonic() + self._head_timeout
        self._arm(self._head_due)

    @property
    def received_any(self) -> bool:
        return self._received_any

    @property
    def busy(self) -> bool:
        """In an exchange (from ``begin`` until ``finish``, ``close`` or ``abort``)."""
        return self.phase is not _IDLE

    @property
    def response_complete(self) -> bool:
        return self.phase is _COMPLETE

    def write_body(self, frames: list[bytes]) -> None:
        """Request body bytes, framed by the caller; handed over as they are (one writev, no join)."""
        if self.transport is not None and not self.closed and frames:
            self.transport.writelines(frames)

    def complete_body(self) -> list[bytes] | None:
        """The whole body, if the response has already arrived complete (or has none)."""
        if self.phase is _COMPLETE or (self._head is not None and self._head.framing == "none"):
            chunks, self._pending_body = self._pending_body, []
            return chunks
        return None

    def deliver(self, sink: Callable[[bytes], None], idle_timeout: float) -> asyncio.Future[None]:
        """Stream the body into ``sink``; the future resolves when the response is complete."""
        waiter = self.loop.create_future()
        self._done_waiter = waiter
        for chunk in self._pending_body:
            sink(chunk)
        self._pending_body = []
        if self.phase is _COMPLETE:
            waiter.set_result(None)
            return waiter
        if self.closed:
            waiter.set_exception(ConnectionReset("upstream closed the connection in the middle of the body"))
            return waiter
        self._sink = sink
        self._idle_limit = idle_timeout
        self._last_activity = self._clock.monotonic()
        self._arm(self._last_activity + idle_timeout)
        return waiter

    def pause_reading(self) -> None:
        """The client is not keeping up: stop reading; its slowness is not the upstream's silence."""
        self._held_by_client = True
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        self._held_by_client = False
        self._last_activity = self._clock.monotonic()
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def finish(self) -> None:
        """The exchange is over: back to the pool if the connection is clean, else closed."""
        transport, head = self.transport, self._head
        # Reusable: the exchange ended cleanly on an open connection both sides want to keep.
        reusable = (
            self.phase is _COMPLETE
            and head is not None
            and head.keep_alive
            and self.request_complete
            and not self._out_of_step
            and not self.upgrade_asked
            and not self.closed
            and transport is not None
            and not transport.is_closing()
        )
        self.phase = _IDLE
        self._held_by_client = False
        self._sink = None
        self._receiver = None
        self.on_writable = None
        if reusable:
            assert transport is not None
            if transport.is_reading() is False:
                transport.resume_reading()
            self.reused = True
            self.pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        self.phase = _IDLE
        self._sink = None
        self._receiver = None
        self._cancel_timer()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
            self.pool.forget(self)

    def abort(self) -> None:
        """Drop the connection at once (client went away, timeout): nothing more is read or sent on it."""
        self.phase = _IDLE
        self._sink = None
        self._cancel_timer()
        if self._receiver is not None:  # aborted from under a waiting exchange (its body pump): it hears so
            self.failure = self.failure or ConnectionReset("exchange abandoned")
            self.loop.call_soon(self._notify)
        waiter = self._done_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionReset("exchange abandoned"))
            waiter.exception()  # retrieved: nobody may be waiting any more
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()
            self.pool.forget(self)

    # -- internals -------------------------------------------------------------------------------------------

    def _refused_tls(self) -> bool:
        """The new TLS connection closed before a byte of answer, and the server had refused it."""
        transport = None if self._received_any else self.transport
        return transport is not None and refused_tls13(transport.get_extra_info("ssl_object"))

    def _on_complete(self) -> None:
        self.phase = _COMPLETE
        waiter = self._done_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.failure is None:
            self.failure = error
        self._cancel_timer()
        if self._receiver is not None:
            self.loop.call_soon(self._notify)
        else:
            waiter = self._done_waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()
            self.pool.forget(self)

    def _notify(self) -> None:
        """Tell the exchange how its request went, once: the response head, or the failure that came first."""
        receiver = self._receiver
        if receiver is not None and (self._head is not None or self.failure is not None):
            self._receiver = None
            receiver(self._head, self.failure)

    def _deadline(self) -> float | None:
        """When the exchange's present wait runs out, if it is bounded: the response head's, or the body's
        silence. While the client holds us (we stopped reading for it), nothing is silent: the listener bounds a
        client that never reads."""
        phase = self.phase
        if phase is _AWAITING_HEAD:
            return self._head_due if self.request_complete else None
        if phase is _RECEIVING_BODY and self._sink is not None:
            since = self._clock.monotonic() if self._held_by_client else self._last_activity
            return since + self._idle_limit
        return None

    def _arm(self, due: float) -> None:
        """Have the timer wake by ``due``: a timer already set to wake sooner stays (it finds the deadline moved
        on and sleeps again), so requests on a busy connection do not each arm and cancel one."""
        timer = self._timer
        if timer is not None:
            if self._timer_due <= due:
                return
            timer.cancel()
        self._timer_due = due
        self._timer = self._clock.call_later(due - self._clock.monotonic(), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        due = self._deadline()
        if due is None or self.closed:
            return
        if self._clock.monotonic() < due:
            self._arm(due)
        elif self.phase is _AWAITING_HEAD:
            self._fail(UpstreamTimedOut(f"no response head within {self._head_timeout:g}s"))
        else:
            self._fail(UpstreamTimedOut(f"response body stalled for {self._idle_limit:g}s"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
