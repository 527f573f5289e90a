"""HTTP/2 connections to one target, shared by streams: one connection while it has room, another when the
peer's MAX_CONCURRENT_STREAMS is reached. A connection that got a GOAWAY takes no new streams, finishes the
ones it has and is replaced; one left without streams for ``idle_timeout`` is closed.

A new connection is used once the server's SETTINGS arrived, so that its stream limit is known; callers that
arrive while one is being opened wait for that one instead of opening their own.
"""

from __future__ import annotations

import asyncio
import ssl

from proxy.h2.engine import CONNECTION_WINDOW, STREAM_WINDOW, H2Endpoint, H2Stream, Headers, StreamReset
from proxy.policy.values import Target
from proxy.upstream.errors import TlsFailed, UpstreamError, map_connect_error, tls_failure
from proxy.upstream.tls import ClientContext

_ATTEMPTS = 3  # connections tried for one stream before its refusal is the caller's


class _Buffering(asyncio.Protocol):
    """Holds what arrives between the TLS handshake and the endpoint taking the transport (the server's
    SETTINGS may come at once)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def data_received(self, data: bytes) -> None:
        self.data += data


class H2Pool:
    def __init__(
        self,
        target: Target,
        tls: ClientContext | None,
        connect_timeout: float,
        idle_timeout: float = 60.0,
        stream_window: int = STREAM_WINDOW,
        connection_window: int = CONNECTION_WINDOW,
    ) -> None:
        self.target = target
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.tls: ClientContext | None = None
        self.server_hostname = ""  # SNI and the name verified
        self.set_tls(tls)
        self.connections: list[H2Endpoint] = []
        self.closing = False
        self._stream_window = stream_window
        self._connection_window = connection_window
        self._opening: asyncio.Task[H2Endpoint] | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    def set_tls(self, tls: ClientContext | None) -> None:
        """The context new connections use (a reload built a new one); open connections finish their streams."""
        self.tls = tls
        self.server_hostname = (tls.server_name or self.target.host) if tls is not None else ""

    async def open_stream(
        self, headers: Headers, end_stream: bool = False, connect_timeout: float | None = None
    ) -> H2Stream:
        """A stream with its headers queued. Connect failures raise ``ConnectFailed``/``TlsFailed``; a stream no
        connection would take raises ``StreamReset`` (never processed)."""
        refused: StreamReset | None = None
        for _ in range(_ATTEMPTS):
            endpoint = self._usable() or await self._connection(connect_timeout or self.connect_timeout)
            try:
                return await endpoint.open_stream(headers, end_stream)
            except StreamReset as exc:  # (raised only before anything was sent)
                refused = exc
        assert refused is not None
        raise refused

    def _usable(self) -> H2Endpoint | None:
        for endpoint in self.connections:
            if endpoint.available_streams > 0:
                return endpoint
        return None

    async def _connection(self, timeout: float) -> H2Endpoint:
        if self.closing:
            raise StreamReset(7, True, "pool closed")
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._connect(timeout))
            self._opening.add_done_callback(self._opened)
        return await asyncio.shield(self._opening)

    def _opened(self, task: asyncio.Task[H2Endpoint]) -> None:
        self._opening = None
        if not task.cancelled() and task.exception() is None:
            self.connections.append(task.result())
            self._schedule_sweep()

    async def _connect(self, timeout: float) -> H2Endpoint:
        loop = asyncio.get_running_loop()
        target = self.target
        where = f"{target.host}:{target.port}"
        endpoint = H2Endpoint.client(self._stream_window, self._connection_window)
        try:
            async with asyncio.timeout(timeout):
                if self.tls is None:
                    await loop.create_connection(lambda: endpoint, target.host, target.port)
                else:
                    await self._connect_tls(endpoint, timeout)
                await endpoint.ready
        except (OSError, TimeoutError) as exc:
            endpoint.abort()
            raise map_connect_error(exc, where) from None
        except UpstreamError:
            endpoint.abort()
            raise
        if endpoint.transport is None:
            raise map_connect_error(ConnectionResetError("closed before its SETTINGS"), where)
        return endpoint

    async def _connect_tls(self, endpoint: H2Endpoint, timeout: float) -> None:
        """The handshake as its own step (whatever fails in it is a TLS failure), then ALPN must say h2."""
        assert self.tls is not None
        loop = asyncio.get_running_loop()
        target = self.target
        transport, buffering = await loop.create_connection(_Buffering, target.host, target.port)
        try:
            secure = await loop.start_tls(transport, buffering, self.tls, server_hostname=self.server_hostname)
        except OSError as exc:
            transport.abort()
            raise tls_failure(exc, f"{target.host}:{target.port}") from None
        if secure is None:
            raise TlsFailed(f"TLS to {target} failed: connection closed", sent_nothing=True)
        ssl_object = secure.get_extra_info("ssl_object")
        selected = ssl_object.selected_alpn_protocol() if isinstance(ssl_object, ssl.SSLObject) else None
        if selected != "h2":
            secure.abort()
            raise TlsFailed(
                f"TLS to {target}: the server did not select HTTP/2 by ALPN (got {selected})", sent_nothing=True
            )
        secure.set_protocol(endpoint)
        endpoint.connection_made(secure)
        if buffering.data:  # the server's first frames, read during the handshake
            endpoint.data_received(bytes(buffering.data))
        self.tls.save_session(self.server_hostname, ssl_object, loop.time())

    def _schedule_sweep(self) -> None:
        if self._sweeper is None and self.connections:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(self.idle_timeout / 2, self._sweep)

    def _sweep(self) -> None:
        """Forget connections that are gone; close those idle for ``idle_timeout``."""
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        kept: list[H2Endpoint] = []
        for endpoint in self.connections:
            if endpoint.transport is None:
                continue
            if not endpoint.streams and now - endpoint.idle_since >= self.idle_timeout:
                endpoint.close()
                continue
            kept.append(endpoint)
        self.connections = kept
        self._schedule_sweep()

    def close(self) -> None:
        """Every connection: GOAWAY now, closed once its streams are done."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for endpoint in self.connections:
            endpoint.close()

    async def aclose(self) -> None:
        self.close()
        connections, self.connections = self.connections, []
        await asyncio.gather(*(endpoint.lost for endpoint in connections))
