"""Keep-alive connections to one target, reused most-recently-idle first; over TLS for an https target."""

from __future__ import annotations

import asyncio

from proxy.policy.values import Target
from proxy.resilience.clock import Clock
from proxy.sockets import set_no_delay
from proxy.upstream.connection import UpstreamConnection
from proxy.upstream.errors import TlsFailed, UpstreamError, map_connect_error, tls_failure
from proxy.upstream.tls import ClientContext

MAX_IDLE_PER_TARGET = 512


DEFAULT_MAX_HEAD_BYTES = 64 * 1024


class TargetPool:
    def __init__(
        self,
        target: Target,
        idle_timeout: float,
        max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
        tls: ClientContext | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.target = target
        self.clock = clock  # the connections' timers run on it (None: the system clock)
        self.idle_timeout = idle_timeout
        self.max_head_bytes = max_head_bytes  # a response head larger than this is a bad response
        self._idle: list[UpstreamConnection] = []
        self._all: set[UpstreamConnection] = set()
        self.closing = False
        self.tls: ClientContext | None = None
        self.server_hostname = ""  # SNI and the name verified
        self._unsaved: set[UpstreamConnection] = set()  # TLS connections whose session is not saved yet
        self.set_tls(tls)

    def set_tls(self, tls: ClientContext | None) -> None:
        """The context new connections use (a reload builds a new one when the policy or its files changed).
        Idle connections made with another one are closed: a rotated CA or certificate takes effect at once."""
        if tls is self.tls:
            return
        self.tls = tls
        self.server_hostname = (tls.server_name or self.target.host) if tls is not None else ""
        for conn in list(self._idle):
            conn.close()
        self._idle.clear()

    @property
    def counts(self) -> tuple[int, int]:
        """(idle, active) connections."""
        idle = len(self._idle)
        return idle, len(self._all) - idle

    def take_idle(self) -> UpstreamConnection | None:
        """A pooled connection, without waiting; None when a new one must be opened."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def connect(self, timeout: float) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        target = self.target
        tls = self.tls
        try:
            async with asyncio.timeout(timeout):
                # A hostname resolves here, on every connect, and each of its addresses is tried in turn.
                transport, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self, self.max_head_bytes, self.clock), target.host, target.port
                )
                set_no_delay(transport)
                if tls is not None:
                    # The handshake as its own step, so that whatever fails in it is a TLS failure (a server
                    # that drops a client without the certificate it wants may just close), never a refusal.
                    try:
                        secure = await loop.start_tls(transport, conn, tls, server_hostname=self.server_hostname)
                    except OSError as exc:
                        transport.abort()
                        raise tls_failure(exc, f"{target.host}:{target.port}") from None
                    if secure is None:  # (only when the connection was closed while it started)
                        raise TlsFailed(f"TLS to {target} failed: connection closed", sent_nothing=True)
                    conn.transport = secure
                    conn.tls = True
                    self._unsaved.add(conn)
        except (OSError, TimeoutError) as exc:
            raise map_connect_error(exc, f"{target.host}:{target.port}") from None
        except UpstreamError:
            raise
        self._all.add(conn)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if self._unsaved and conn in self._unsaved:
            self._save_session(conn)
        if self.closing or len(self._idle) >= MAX_IDLE_PER_TARGET:
            conn.close()
            return
        conn.idle_since = conn.loop.time()
        self._idle.append(conn)

    def _save_session(self, conn: UpstreamConnection) -> None:
        """After its first exchange (TLS 1.3 tickets arrive after the handshake), once per connection."""
        self._unsaved.discard(conn)
        if self.tls is not None and conn.transport is not None:
            self.tls.save_session(self.server_hostname, conn.transport.get_extra_info("ssl_object"), conn.loop.time())

    def forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        self._unsaved.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    def sweep(self, now: float) -> None:
        """Close connections idle past the timeout (upstreams drop them sooner or later anyway)."""
        stale = [c for c in self._idle if now - c.idle_since >= self.idle_timeout]
        for conn in stale:
            conn.close()

    def close(self) -> None:
        self.closing = True
        for conn in list(self._idle):
            conn.close()
        self._idle.clear()

    def abort_all(self) -> None:
        self.close()
        for conn in list(self._all):
            conn.abort()
