"""The client side: one asyncio protocol per accepted connection on an upstream's listener.

Requests are parsed by llhttp (httptools) in strict mode and judged by ``validate_head``
(``proxy.http.request``); a refused request is answered 4xx and the connection closed, with nothing of it
forwarded. Pipelined requests are answered in order, one at a time, each through its own ``Response``
(``proxy.http.response``): the connection keeps no state of any one answer.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import typing
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import httptools

from proxy.http.answers import OwnAnswer, count, encode, log_answer
from proxy.http.body import RequestBody
from proxy.http.forwarder import forward
from proxy.http.h2_refusal import refuse_http2
from proxy.http.request import CONNECT_REFUSED, Request, RequestRejected, is_http09, mark_upgrade, validate_head
from proxy.http.response import Response
from proxy.policy.model import HttpServerPolicy
from proxy.sockets import Drainable, set_no_delay

if TYPE_CHECKING:
    from proxy.http.sink import InFlight, Serve
    from proxy.resilience.clock import Clock, Timer
    from proxy.runtime import UpstreamRuntime

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Takes an HTTP/2 connection over: its transport, the bytes read so far (the preface first), the listener's set.
Http2Handoff = Callable[[asyncio.Transport, bytes, set[Drainable]], None]

_CLOSED_PARSER = httptools.HttpRequestParser(object())  # a closed connection's: bound to nothing, never fed
log = logging.getLogger("seawall.listener")

# After an answer that ends the connection, unread client bytes are read and dropped for a while before the
# socket is closed: closing with unread input makes the kernel send a reset, and a reset can destroy the answer
# in the client's receive buffer before it is read (nginx's lingering close).
LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20


class _Phase(enum.Enum):
    """What a connection is doing, for its one timer: waiting for a request, reading a head, or serving one."""

    NEW = "new"  # accepted, nothing received yet: held for header_timeout, not keepalive_timeout
    IDLE = "idle"
    HEAD = "head"
    BUSY = "busy"


# Members bound once: reading an attribute of an Enum class costs ~60 ns in CPython 3.11, several per request.
_NEW, _IDLE, _HEAD, _BUSY = _Phase.NEW, _Phase.IDLE, _Phase.HEAD, _Phase.BUSY


class ClientConnection(asyncio.Protocol):
    """Serves one client connection: parse, hand each request to the forwarder, write answers in order."""

    def __init__(
        self,
        get_runtime: Callable[[], UpstreamRuntime],
        http: HttpServerPolicy,
        connections: set[Drainable],
        log_requests: bool,
        clock: Clock,
        serve: Serve = forward,
        http2: Http2Handoff | None = None,
    ) -> None:
        self._get_runtime = get_runtime
        self._http2 = http2 if http2 is not None else refuse_http2
        self._http = http
        self._connections = connections
        self.log_requests = log_requests
        self._clock = clock
        self._serve_one = serve
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._client_ip = b"unknown"
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._parsing: Request | None = None
        self._queue: deque[Request] = deque()
        self._active: InFlight | None = None  # the request being served; None between requests
        self._timer: Timer | None = None
        self._closing = False
        self._answer: Response | None = None  # the answer to the request being served (or held back)
        # A request whose small body is still being parsed from the same read: served once it is whole (the
        # exchange then runs on callbacks, with no task), or at the end of the read if it is not whole by then.
        self._unstarted: Request | None = None
        self._reading_paused = False
        self._phase = _NEW
        self._phase_since = 0.0
        self._deferred_reject: tuple[int, str] | None = None
        self._rejection: RequestRejected | None = None  # raised inside a parser callback, for data_received
        self._lingered = 0  # bytes dropped after the connection's last answer
        self._write_paused = False  # the transport's buffer is above its high-water mark: the client lags
        self._write_paused_since = 0.0
        self._held: Request | None = None  # served, but the next request waits for the client to read
        self._upgrading: list[bytes] | None = None  # an upgrade request is forwarded: the bytes read past it
        self._preface = b""  # the first bytes, held while they could still be the start of HTTP/2's preface

    # -- asyncio.Protocol ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        self._connections.add(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self._client_ip = str(peer[0]).encode()
        set_no_delay(transport)
        clock = self._clock
        self._phase_since = clock.monotonic()
        self._timer = clock.call_later(min(self._http.keepalive_timeout, self._http.header_timeout), self._on_timer)

    def data_received(self, data: bytes) -> None:
        if self._phase is _NEW:
            data = self._sniff_http2(data)  # the connection's first bytes: HTTP/1.1, or HTTP/2's preface?
            if not data:
                return
        if self._closing or self._deferred_reject is not None:
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES and self.transport is not None:
                self.transport.abort()  # a client that keeps sending after its answer: stop draining it
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade_parsed(data, upgrade)
        except httptools.HttpParserCallbackError:
            # llhttp wraps what a callback raised; the callback left the rejection here for us.
            rejection, self._rejection = self._rejection, None
            if rejection is None:
                log.exception("request parsing failed")
                self._reject(400, "malformed request")
            else:
                self._reject(rejection.status, str(rejection))
        except httptools.HttpParserError as exc:
            self._reject(400, f"malformed request: {exc}")
        else:
            if self._phase is _HEAD and is_http09(data, self._parser):
                self._reject(400, "HTTP/0.9 requests are not served")
            elif self._unstarted is not None:
                self._serve(self._unstarted)  # its body did not all come in this read: serve it as it comes

    def _sniff_http2(self, data: bytes) -> bytes:
        """What to parse as HTTP/1.1: everything, unless the connection opened with HTTP/2's client preface (h2c
        prior knowledge, what gRPC clients send), also when it comes split across reads. Then the connection is
        handed over whole, and nothing is left to parse here."""
        seen = self._preface + data if self._preface else data
        if seen[: len(H2_PREFACE)] != H2_PREFACE[: len(seen)]:
            self._preface = b""
            return seen
        if len(seen) < len(H2_PREFACE):
            self._preface = seen  # so far, so like the preface: wait for the rest
            return b""
        transport, self.transport = self.transport, None
        self._closing = True
        self._cancel_timer()
        self._connections.discard(self)
        self._parser = _CLOSED_PARSER
        if transport is not None:
            self._http2(transport, seen, self._connections)
        return b""

    def _upgrade_parsed(self, data: bytes, upgrade: httptools.HttpParserUpgrade) -> None:
        """llhttp stopped after a request asking to upgrade (or CONNECT): relay what follows, or parse on."""
        if self._parser.get_method() == b"CONNECT":
            self._reject(405, CONNECT_REFUSED)
            return
        consumed = upgrade.args[0] if upgrade.args and isinstance(upgrade.args[0], int) else len(data)
        if self._upgrading is not None:  # forwarded as an upgrade: nothing after it is parsed (see mark_upgrade)
            self._upgrading.append(data[consumed:])
            self._pause_reading()
            return
        # Not upgraded (h2c, not a GET, HTTP/1.0): served as plain HTTP/1.1 like nginx; the next request follows.
        self._parser = httptools.HttpRequestParser(self)
        if consumed < len(data):
            self.data_received(data[consumed:])

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._connections.discard(self)
        self._cancel_timer()
        if self._parsing is not None and self._parsing.body is not None:
            self._parsing.body.fail(ConnectionError("client disconnected"))
        active, self._active = self._active, None
        if active is not None:
            active.cancel()  # the forwarder drops its upstream attempt at once
        # The parser's callbacks are this connection's bound methods: a cycle that would keep the closed
        # connection and its transport until the cyclic GC runs (as upstream connections did, issue 19).
        self._parser = _CLOSED_PARSER

    def pause_writing(self) -> None:
        self._write_paused = True
        self._write_paused_since = self._clock.monotonic()
        upstream = self._answer.upstream if self._answer is not None else None
        if upstream is not None:
            upstream.pause_reading()  # the client lags: stop reading what we would have to buffer for it

    def resume_writing(self) -> None:
        self._write_paused = False
        upstream = self._answer.upstream if self._answer is not None else None
        if upstream is not None:
            upstream.resume_reading()
        req, self._held = self._held, None
        if req is not None and self._active is None:
            self._after_response(req)  # the client reads again: serve what it asked next

    # -- httptools callbacks ---------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        if self._active is None:
            self._phase = _HEAD
            self._phase_since = self._clock.monotonic()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._http.max_url_bytes:
            self._refuse(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._parsing is not None:
            # A chunked body's trailer section: bounded like a head, never merged into the forwarded head.
            if self._header_bytes > self._http.max_header_bytes:
                self._refuse(431, "request trailer fields too large")
            return
        self._headers.append((name, value))
        if len(self._headers) > self._http.max_headers or self._header_bytes > self._http.max_header_bytes:
            self._refuse(431, "request header fields too large")

    def on_headers_complete(self) -> None:
        if self._closing:
            return  # an earlier request in the same read closed the connection: serve nothing more
        parser = self._parser
        version = parser.get_http_version()
        if version == "0.9":
            self._refuse(400, "HTTP/0.9 requests are not served")
        try:
            req = validate_head(
                parser.get_method(),
                self._url,
                self._headers,
                version == "1.1",
                bool(parser.should_keep_alive()),
                self._client_ip,
            )
            if req.connection_tokens and b"upgrade" in req.connection_tokens and parser.should_upgrade():
                self._upgrading = [] if mark_upgrade(req) else None
        except RequestRejected as exc:
            self._refuse(exc.status, str(exc))
        if req.has_body:
            req.body = RequestBody(
                None if req.chunked else req.content_length,
                self._http.replay_buffer_bytes,
                self._pause_reading,
                self._resume_reading,
                self._clock,
            )
        self._parsing = req
        if self._active is None:
            if req.body is not None and req.body.replayable and req.content_length and not req.expect_continue:
                self._unstarted = req  # a small body, most likely in this very read: serve it whole
            else:
                self._serve(req)
        else:
            # Pipelined: answer in order; stop reading until the one in flight is done.
            self._queue.append(req)
            self._pause_reading()

    def on_body(self, body: bytes) -> None:
        req = self._parsing
        if req is not None and req.body is not None:
            req.body.feed(body)

    def on_message_complete(self) -> None:
        req = self._parsing
        if req is not None and req.body is not None:
            req.body.finish()
        self._parsing = None
        if req is not None and req is self._unstarted:
            self._serve(req)

    def _serve(self, req: Request) -> None:
        """Serve a request now, nothing being in flight; go on at once if it was answered on the spot."""
        self._unstarted = None
        if self._start(req):
            self._after_response(req)

    # -- serving ---------------------------------------------------------------------------------------------

    def _start(self, req: Request) -> bool:
        """Serve a request; True if it was answered on the spot (a refusal), False if it is in flight (``served``
        follows)."""
        self._phase = _BUSY
        if req.body is not None and not req.body.complete:
            self._resume_reading()  # a pipelined request's body may still be on its way: let it in
        response = self._answer = Response(self, req, self.log_requests)
        self._active = self._serve_one(self._get_runtime(), req, response)
        return self._active is None

    # -- what a Response needs of its connection (``proxy.http.response.Codec``) ----------------------------

    def writable(self) -> asyncio.Transport | None:
        return None if self._closing else self.transport

    def finished(self, response: Response) -> None:
        self._active = None
        self._after_response(response.req)

    def failed(self, response: Response) -> None:
        if not response.started:
            # Where the request (its body) stands is unknown: close, and say so.
            self._answer_own(OwnAnswer(500, "internal_error", "see the sidecar's log", rejected="internal_error"))
        else:
            self.cut()

    def hand_over(self) -> tuple[asyncio.Transport, asyncio.BaseProtocol, list[bytes]] | None:
        """A 101: the relay takes the transport over (its timer is harmless), with the bytes read past the head."""
        transport, tail, self._upgrading = self.transport, self._upgrading or [], None
        if transport is None or self._closing or transport.is_closing():
            return None
        return transport, self, tail

    def cut(self) -> None:
        if self.transport is not None:
            self._closing = True
            self.transport.abort()

    def _after_response(self, req: Request) -> None:
        while True:  # a loop, not recursion: a pipelined burst may be answered on the spot one after another
            if self._closing or self.transport is None or self.transport.is_closing():
                return
            keep_alive = self._answer is not None and self._answer.keep_alive
            if keep_alive and req.body is not None and not req.body.complete:
                # Answered before its body was all in, the connection kept: drop the rest (bounded, see body.py).
                req.body.discard(partial(self._after_response, req), self._close_after_answer)
                return
            if not keep_alive:
                self._close_after_answer()
                return
            if self._write_paused:
                # The client is not reading its answers: take no more requests until it does (back-pressure),
                # or the client buffers every answer it pipelined.
                self._pause_reading()
                self._held = req
                self._phase = _BUSY
                return
            if not self._queue:
                break
            req = self._queue.popleft()
            if not self._start(req):
                return
        self._answer = None  # between requests: a bad next request must still get its answer
        if self._deferred_reject is not None:
            # Every request before the malformed one has had its answer: now it gets its own.
            self._reject(*self._deferred_reject)
            return
        self._resume_reading()
        self._phase = _IDLE
        self._phase_since = self._clock.monotonic()

    # -- internals -------------------------------------------------------------------------------------------

    def _reject(self, status: int, detail: str) -> None:
        self._unstarted = None  # refused before it was served: nothing of it is forwarded
        if self._parsing is not None and self._parsing.body is not None:
            self._parsing.body.fail(ValueError(detail))
        if self._active is not None and (self._parsing is None or self._parsing in self._queue):
            # Pipelined behind a request still in flight: answering now would hand the client this 400 as the
            # answer to that earlier request (which the upstream is processing). Answer in order instead.
            if self._parsing is not None:
                self._queue.remove(self._parsing)
            self._parsing = None
            self._deferred_reject = (status, detail)
            self._pause_reading()
            return
        if self._answer is None or not self._answer.started:
            self._answer_own(OwnAnswer(status, "bad_request", detail, rejected="bad_request"), self._parsing)
        self._close_after_answer()

    def _answer_own(self, answer: OwnAnswer, req: Request | None = None) -> None:
        """An answer the listener makes itself (a malformed request, an internal error), after which the
        connection closes: written, counted and logged like every other answer of the sidecar's own
        (``proxy.http.answers``), as the answer to the request being served if there is one."""
        response = self._answer
        if response is not None:
            req = response.req
            response.keep_alive = False
        rt = self._get_runtime()
        count(rt.stats, answer, 0.0)
        if self.log_requests:
            method, path = (req.method, req.path) if req is not None else ("-", b"-")
            log_answer(rt.name, method, path, None, answer.status, answer.reason, 0, 0.0)
        encoded = encode(answer, None, False, response.http11 if response is not None else True)
        if response is not None:
            response.send_raw(encoded)
        elif (transport := self.writable()) is not None:
            transport.write(encoded)

    def _refuse(self, status: int, detail: str) -> typing.NoReturn:
        """Inside a parser callback: stop parsing; ``data_received`` answers with this status."""
        self._rejection = RequestRejected(status, detail)
        raise self._rejection

    def _on_timer(self) -> None:
        # One lazy timer per connection instead of arming and cancelling one per request: it wakes at the
        # earliest deadline the connection could have and looks at what phase it is actually in.
        self._timer = None
        if self._closing:
            return
        now = self._clock.monotonic()
        if self._phase is _HEAD:
            limit = self._http.header_timeout
            if now - self._phase_since >= limit:
                self._reject(408, "request head not received in time")
                return
        elif self._phase is _IDLE or self._phase is _NEW:
            limit = self._http.keepalive_timeout if self._phase is _IDLE else self._http.header_timeout
            if now - self._phase_since >= limit:
                self._close()  # nothing was asked: nothing to answer
                return
        elif self._write_paused and now - self._write_paused_since >= self._http.keepalive_timeout:
            self.close()  # a client that has not read for keepalive_timeout is not coming back
            return
        else:
            self._phase_since = now
            limit = min(self._http.keepalive_timeout, self._http.header_timeout)
        self._timer = self._clock.call_later(max(0.01, self._phase_since + limit - now), self._on_timer)

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self._closing:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self._closing:
            self._reading_paused = False
            self.transport.resume_reading()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close(self, abort: bool = False) -> None:
        self._closing = True
        self._cancel_timer()
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    def _close_after_answer(self) -> None:
        """Close once the last answer is out, without letting a reset destroy it (see LINGER_SECONDS): send
        FIN after the answer, drop what the client still sends, close when it closes or the time is up."""
        transport = self.transport
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            self._close()
            return
        self._closing = True
        self._cancel_timer()
        transport.write_eof()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        self._timer = self._clock.call_later(LINGER_SECONDS, transport.close)

    def close(self) -> None:
        """Drop the connection now, whatever it is doing (a drain that ran out of time)."""
        self._close(abort=True)

    def shutdown_when_idle(self) -> None:
        """For draining: close now if idle, else after the answer in flight."""
        if self._answer is not None:
            self._answer.keep_alive = False
        if self._active is None:
            self._close()
