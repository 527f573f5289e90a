"""One HTTP/2 connection, client or server role: ``H2Endpoint`` drives ``h2``'s state machine from an asyncio
transport and hands out ``H2Stream`` objects.

Flow control is acknowledged by the consumer: inbound DATA is buffered per stream and its window (the stream's and
the connection's) is given back only through ``H2Stream.consumed``. A stream's buffer therefore never holds more
than the window we advertised, and a consumer that stops reading stalls its own stream only (until the streams
it holds exhaust the connection window: ``connection_window`` / ``stream_window`` of them).

Writes are coalesced: frames queued while handling one read, or within one turn of the event loop, leave in one
``transport.write``.

``h2`` ends a connection's life on any GOAWAY (sent or received): afterwards it refuses to move a single frame
of the streams the GOAWAY let finish. ``_Connection`` keeps the connection open after one, and the endpoint
itself refuses new streams instead (``accepting``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    TrailersReceived,
    WindowUpdated,
)
from h2.events import StreamReset as StreamResetEvent
from h2.exceptions import DenialOfServiceError, ProtocolError
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes, Settings
from hyperframe.frame import ContinuationFrame, Frame, GoAwayFrame

from proxy.h2.limits import AbuseLimits, ResetBudget
from proxy.sockets import set_no_delay

log = logging.getLogger("proxy.h2")

Headers = list[tuple[bytes, bytes]]

STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 16 << 20
_DEFAULT_WINDOW = 65535
_H2_MAX_STREAMS = 2**31 - 1
_FLUSH_NOW = 64 * 1024  # queued bytes that are written at once instead of at the end of the loop's turn
_OPEN = (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN)


class StreamReset(Exception):
    """The peer reset the stream, or the connection died under it."""

    def __init__(self, code: int, never_processed: bool, message: str = "") -> None:
        super().__init__(message or f"stream reset ({_code_name(code)})")
        self.code = code
        # True when the peer cannot have acted on the stream: retrying it elsewhere is safe.
        self.never_processed = never_processed


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


class _HeaderBlockBuffer(FrameBuffer):
    """h2's frame buffer with a tighter bound on one header block: frames and bytes (CONTINUATION floods)."""

    def __init__(self, server: bool, max_frames: int, max_bytes: int) -> None:
        super().__init__(server=server)
        self.max_frames = max_frames
        self.max_bytes = max_bytes

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        held = self._headers_buffer
        if (
            held
            and isinstance(f, ContinuationFrame)
            and (len(held) >= self.max_frames or sum(len(x.data) for x in held) + len(f.data) > self.max_bytes)
        ):
            raise DenialOfServiceError("CONTINUATION flood: header block over its frame or byte limit")
        return super()._update_header_buffer(f)


class _Connection(H2Connection):
    """``H2Connection`` that stays open after a GOAWAY, so that the streams it lets finish can."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> Any:
        state = self.state_machine.state
        result = super()._receive_goaway_frame(frame)
        if state in _OPEN:
            self.state_machine.state = state
        return result

    def goaway(self, code: int, last_stream_id: int) -> None:
        state = self.state_machine.state
        self.close_connection(code, last_stream_id=last_stream_id)
        if state in _OPEN:
            self.state_machine.state = state


class H2Stream:
    """One stream, as its consumer sees it; see the module docstring for flow control."""

    def __init__(self, endpoint: H2Endpoint, stream_id: int) -> None:
        self._endpoint = endpoint
        self.stream_id = stream_id
        self.headers: Headers | None = None
        self.trailers: Headers | None = None
        self.ended = False  # the peer ended its side
        self.closed: asyncio.Future[None] = endpoint.loop.create_future()
        self._local_ended = False
        self._chunks: list[bytes] = []
        self._unacked = 0  # received and not yet consumed (flow-controlled bytes)
        self._error: StreamReset | None = None
        self._reader: asyncio.Future[None] | None = None
        self._head: asyncio.Future[None] | None = None
        self._window: asyncio.Future[None] | None = None
        self._written = False  # a frame of this stream reached the transport

    @property
    def error(self) -> StreamReset | None:
        """Why the stream died (reset by either side, or the connection lost); None while it lives or once it
        ended cleanly."""
        return self._error

    async def wait_headers(self) -> Headers:
        """(Client role) the response headers, informational ones skipped."""
        while self.headers is None:
            if self._error is not None:
                raise self._error
            if self.ended:
                raise StreamReset(ErrorCodes.PROTOCOL_ERROR, False, "stream ended without response headers")
            self._head = self._endpoint.loop.create_future()
            await self._head
        return self.headers

    async def read(self) -> bytes:
        """The next DATA chunk; b"" once the peer ended the stream."""
        while True:
            if self._error is not None:
                raise self._error
            if self._chunks:
                return self._chunks.pop(0)
            if self.ended:
                return b""
            self._reader = self._endpoint.loop.create_future()
            await self._reader

    def consumed(self, n: int) -> None:
        """Give ``n`` bytes of window back to the peer (stream and connection)."""
        n = min(n, self._unacked)
        if n > 0:
            self._unacked -= n
            self._endpoint.acknowledge(self.stream_id, n)

    async def send_headers(self, headers: Headers, end_stream: bool = False) -> None:
        self._check_alive()
        self._endpoint.conn.send_headers(self.stream_id, headers, end_stream=end_stream)
        self._queued(end_stream)

    async def send_data(self, data: bytes, end_stream: bool = False) -> None:
        """Waits for the stream's and connection's window and for the transport's buffer; splits into frames."""
        endpoint = self._endpoint
        conn = endpoint.conn
        view = memoryview(data)
        while True:
            self._check_alive()
            if endpoint.paused is not None:
                await asyncio.shield(endpoint.paused)
                continue
            window = conn.local_flow_control_window(self.stream_id)
            if window <= 0 and view:
                self._window = endpoint.loop.create_future()
                endpoint.blocked.add(self)
                await self._window
                continue
            size = min(window, len(view))
            frame = conn.max_outbound_frame_size
            for start in range(0, size, frame) if size else (0,):
                chunk = view[start : start + frame]
                whole = len(chunk) == len(data)  # (the common case: no copy)
                last = end_stream and start + frame >= len(view)
                conn.send_data(self.stream_id, data if whole else bytes(chunk), end_stream=last)
            view = view[size:]
            self._queued(end_stream and not view, flush_now=size >= _FLUSH_NOW)
            if not view:
                return

    async def send_trailers(self, trailers: Headers) -> None:
        await self.send_headers(trailers, end_stream=True)

    def reset(self, code: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM; idempotent, nothing on a closed stream."""
        if self.closed.done():
            return
        self._endpoint.conn.reset_stream(self.stream_id, code)
        self._endpoint.flush_soon()
        self.fail(StreamReset(code, False, f"stream reset by us ({_code_name(code)})"))

    def _check_alive(self) -> None:
        if self._error is not None:
            raise self._error
        if self._local_ended:
            raise StreamReset(ErrorCodes.STREAM_CLOSED, False, "stream already ended by us")

    def _queued(self, end_stream: bool, flush_now: bool = False) -> None:
        endpoint = self._endpoint
        if not self._written:
            endpoint.unwritten.append(self)
        if end_stream:
            self._local_ended = True
            if self.ended:
                endpoint.finish(self)
        if flush_now:
            endpoint.flush()
        else:
            endpoint.flush_soon()

    # Called by the endpoint.

    def received(self, data: bytes, flow_controlled: int) -> None:
        self._unacked += len(data)
        if flow_controlled > len(data):  # padding: nothing for the consumer to acknowledge
            self._endpoint.acknowledge(self.stream_id, flow_controlled - len(data))
        if data:
            self._chunks.append(data)
            self._wake_reader()

    def peer_ended(self) -> None:
        self.ended = True
        self._wake_reader()
        if self._head is not None and not self._head.done():
            self._head.set_result(None)
        if self._local_ended:
            self._endpoint.finish(self)

    def got_headers(self, headers: Headers) -> None:
        self.headers = headers
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def window_opened(self) -> None:
        if self._window is not None and not self._window.done():
            self._window.set_result(None)

    def fail(self, error: StreamReset) -> None:
        """The stream is dead: every waiter wakes to ``error``; its unconsumed window goes back."""
        if self._error is not None or self.closed.done():
            return
        self._error = error
        self._chunks.clear()
        if self._unacked:
            self._endpoint.acknowledge(self.stream_id, self._unacked)
            self._unacked = 0
        for waiter in (self._reader, self._head, self._window):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        self._endpoint.finish(self)

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)


class H2Endpoint(asyncio.Protocol):
    """One HTTP/2 connection. Make one with ``H2Endpoint.server(...)`` or ``H2Endpoint.client()``."""

    def __init__(
        self,
        client_side: bool,
        on_stream: Callable[[H2Stream], None] | None = None,
        limits: AbuseLimits | None = None,
        initial_data: bytes = b"",
        stream_window: int = STREAM_WINDOW,
        connection_window: int = CONNECTION_WINDOW,
        validate_inbound: bool = True,
    ) -> None:
        self.client_side = client_side
        self.limits = limits or AbuseLimits()
        self.loop = asyncio.get_event_loop()
        config = H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=validate_inbound,  # ~50 µs a call; the trust boundary
            normalize_inbound_headers=False,
        )
        self.conn = _Connection(config)
        self.conn.incoming_buffer = _HeaderBlockBuffer(
            not client_side, self.limits.max_continuation_frames, self.limits.max_header_list_size
        )
        self.streams: dict[int, H2Stream] = {}
        self.abuse: dict[str, int] = {}  # violation -> count, for the caller's metrics
        self.accepting = True  # new streams may be opened (no GOAWAY either way, not closing)
        self.transport: asyncio.Transport | None = None
        self.paused: asyncio.Future[None] | None = None  # the transport's buffer is full until this resolves
        self.blocked: set[H2Stream] = set()  # senders waiting for window
        self.unwritten: list[H2Stream] = []  # streams with frames queued and none written yet
        self.idle_since = self.loop.time()
        self.lost: asyncio.Future[None] = self.loop.create_future()  # done once the connection is gone
        self.ready: asyncio.Future[None] = self.loop.create_future()  # the peer's SETTINGS arrived (or it is gone)
        self.streams_served = 0
        self._on_stream = on_stream
        self._initial_data = initial_data
        self._stream_window = stream_window
        self._connection_window = connection_window
        self._flush_pending = False
        self._closing = False
        self._resets = ResetBudget(self.limits.max_resets, self.limits.reset_window)
        self._dispatch: dict[type, Callable[[Any], None]] = {
            RequestReceived: self._on_request,
            ResponseReceived: self._on_response,
            TrailersReceived: self._on_trailers,
            DataReceived: self._on_data,
            StreamEnded: self._on_ended,
            StreamResetEvent: self._on_reset,
            WindowUpdated: self._on_window,
            RemoteSettingsChanged: self._on_settings,
            ConnectionTerminated: self._on_goaway,
        }

    @classmethod
    def server(
        cls, on_stream: Callable[[H2Stream], None], limits: AbuseLimits | None = None, initial_data: bytes = b""
    ) -> H2Endpoint:
        """The server role. ``on_stream`` gets each stream once its request headers are complete. Bytes read
        before the hand-over (the client preface included) go in ``initial_data`` or to ``data_received``."""
        return cls(False, on_stream, limits, initial_data)

    @classmethod
    def client(
        cls,
        stream_window: int = STREAM_WINDOW,
        connection_window: int = CONNECTION_WINDOW,
        validate_inbound: bool = True,
    ) -> H2Endpoint:
        """The client role. ``validate_inbound=False`` skips h2's checks of response headers (for a trusted
        upstream whose headers are not relayed unchecked)."""
        return cls(
            True, stream_window=stream_window, connection_window=connection_window, validate_inbound=validate_inbound
        )

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's are not asyncio.Transport subclasses)
        set_no_delay(transport)
        conn = self.conn
        limits = self.limits
        advertised = {
            SettingCodes.INITIAL_WINDOW_SIZE: self._stream_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            SettingCodes.ENABLE_PUSH: 0,
        }
        if not self.client_side:
            advertised[SettingCodes.MAX_CONCURRENT_STREAMS] = limits.max_concurrent_streams
        conn.local_settings = Settings(client=self.client_side, initial_values=advertised)
        conn.initiate_connection()
        # h2 would end the whole connection for one stream over the limit; the endpoint refuses just that
        # stream (RFC 9113 5.1.2), so h2's own limit is lifted once the SETTINGS frame is written.
        conn.local_settings = Settings(
            client=self.client_side, initial_values={**advertised, SettingCodes.MAX_CONCURRENT_STREAMS: _H2_MAX_STREAMS}
        )
        conn.decoder.max_header_list_size = limits.max_header_list_size
        conn.increment_flow_control_window(self._connection_window - _DEFAULT_WINDOW)
        if self._initial_data:
            self.data_received(self._initial_data)
            self._initial_data = b""
        else:
            self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        dispatch = self._dispatch
        for event in events:
            handler = dispatch.get(type(event))
            if handler is not None:
                handler(event)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.accepting = False
        self.transport = None
        for stream in list(self.streams.values()):
            stream.fail(StreamReset(ErrorCodes.INTERNAL_ERROR, not stream._written, "connection lost"))
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)
        for future in (self.lost, self.ready):
            if not future.done():
                future.set_result(None)

    def pause_writing(self) -> None:
        if self.paused is None:
            self.paused = self.loop.create_future()

    def resume_writing(self) -> None:
        paused, self.paused = self.paused, None
        if paused is not None and not paused.done():
            paused.set_result(None)

    # Client role

    @property
    def available_streams(self) -> int:
        """Streams this connection can open now (the peer's MAX_CONCURRENT_STREAMS minus those open)."""
        if not self.accepting or self.transport is None:
            return 0
        return self.conn.remote_settings.max_concurrent_streams - len(self.streams)

    async def open_stream(self, headers: Headers, end_stream: bool = False) -> H2Stream:
        """A new stream with its request headers queued; StreamReset(never_processed) if it cannot be opened."""
        if self.available_streams <= 0:
            raise StreamReset(ErrorCodes.REFUSED_STREAM, True, "connection takes no more streams")
        stream_id = self.conn.get_next_available_stream_id()
        stream = H2Stream(self, stream_id)
        self.streams[stream_id] = stream
        self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        stream._queued(end_stream)
        return stream

    # Both roles

    def close(self) -> None:
        """Graceful: GOAWAY, no new streams, close once the open ones are done."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        self.accepting = False
        self.conn.goaway(ErrorCodes.NO_ERROR, self.conn.highest_inbound_stream_id)
        self.flush()
        self._close_if_done()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def acknowledge(self, stream_id: int, n: int) -> None:
        self.conn.acknowledge_received_data(n, stream_id)
        self.flush_soon()

    def flush_soon(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_pending = False
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)
            for stream in self.unwritten:
                stream._written = True
            self.unwritten.clear()

    def finish(self, stream: H2Stream) -> None:
        """A stream is closed both ways or reset."""
        if not stream.closed.done():
            stream.closed.set_result(None)
        self.blocked.discard(stream)
        if self.streams.pop(stream.stream_id, None) is not None and not self.streams:
            self.idle_since = self.loop.time()
            self._close_if_done()

    # Events

    def _on_request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        limits = self.limits
        if not self.accepting or len(self.streams) >= limits.max_concurrent_streams:
            self.conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            self._count("refused_stream")
            if self.accepting:
                self._spend_reset()
            return
        self.streams_served += 1
        if limits.max_streams_per_connection and self.streams_served >= limits.max_streams_per_connection:
            self._count("max_streams_per_connection")
            self.close()
        stream = H2Stream(self, stream_id)
        stream.headers = event.headers
        self.streams[stream_id] = stream
        if self._on_stream is not None:
            self._on_stream(stream)

    def _on_response(self, event: ResponseReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.got_headers(event.headers)

    def _on_trailers(self, event: TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.trailers = event.headers

    def _on_data(self, event: DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:  # (reset by us meanwhile): the connection window is still ours to give back
            self.conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
            return
        stream.received(event.data or b"", event.flow_controlled_length or 0)

    def _on_ended(self, event: StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.peer_ended()

    def _on_reset(self, event: StreamResetEvent) -> None:
        stream = self.streams.get(event.stream_id)
        code = int(event.error_code or 0)
        if stream is not None:
            stream.fail(
                StreamReset(code, code == ErrorCodes.REFUSED_STREAM, f"stream reset by peer ({_code_name(code)})")
            )
        if not self.client_side and event.remote_reset:
            self._spend_reset()

    def _on_window(self, event: WindowUpdated) -> None:
        if event.stream_id:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self.blocked.discard(stream)
                stream.window_opened()
            return
        self._wake_senders()

    def _on_settings(self, event: RemoteSettingsChanged) -> None:
        if not self.ready.done():
            self.ready.set_result(None)
        if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            self._wake_senders()

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        """The peer's GOAWAY: streams above its last_stream_id were never processed; the others may finish."""
        self.accepting = False
        last = event.last_stream_id if event.last_stream_id is not None else _H2_MAX_STREAMS
        code = int(event.error_code or 0)
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last and (stream_id % 2 == 1) == self.client_side:
                stream.fail(StreamReset(code or ErrorCodes.REFUSED_STREAM, True, "GOAWAY: stream not processed"))
        log.debug("h2 GOAWAY received", extra={"code": _code_name(code), "last_stream_id": last})
        self._close_if_done()

    # Helpers

    def _wake_senders(self) -> None:
        blocked, self.blocked = self.blocked, set()
        for stream in blocked:
            stream.window_opened()

    def _spend_reset(self) -> None:
        if self._resets.spend(self.loop.time()):
            self._abuse("rapid_reset", ErrorCodes.ENHANCE_YOUR_CALM)

    def _count(self, what: str) -> None:
        self.abuse[what] = self.abuse.get(what, 0) + 1

    def _abuse(self, what: str, code: int) -> None:
        """GOAWAY with ``code`` and close: the client broke a limit."""
        self._count(what)
        log.warning("h2 client broke a limit: %s", what, extra={"event": "h2_abuse", "abuse": what})
        self.accepting = False
        self._closing = True
        self.conn.goaway(code, self.conn.highest_inbound_stream_id)
        self._hang_up()

    def _protocol_error(self, exc: ProtocolError) -> None:
        """h2 queued the GOAWAY already (ENHANCE_YOUR_CALM for floods and oversized header lists)."""
        if isinstance(exc, DenialOfServiceError):
            what = "continuation_flood" if "CONTINUATION" in str(exc) else "header_list_too_large"
            self._count(what)
            log.warning("h2 client broke a limit: %s", what, extra={"event": "h2_abuse", "abuse": what})
        else:
            self._count("protocol_error")
            log.info("h2 protocol error: %s", exc, extra={"event": "h2_protocol_error"})
        self.accepting = False
        self._hang_up()

    def _hang_up(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()  # (after the GOAWAY in its buffer)

    def _close_if_done(self) -> None:
        if not self.streams and not self.accepting and self.transport is not None:
            self.flush()
            self.transport.close()
