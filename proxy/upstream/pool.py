"""Keep-alive connections to one target, reused most-recently-idle first."""

from __future__ import annotations

import asyncio

from proxy.policy.values import Target
from proxy.sockets import set_no_delay
from proxy.upstream.connection import UpstreamConnection
from proxy.upstream.errors import UpstreamError, map_connect_error

MAX_IDLE_PER_TARGET = 512


DEFAULT_MAX_HEAD_BYTES = 64 * 1024


class TargetPool:
    def __init__(self, target: Target, idle_timeout: float, max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES) -> None:
        self.target = target
        self.idle_timeout = idle_timeout
        self.max_head_bytes = max_head_bytes  # a response head larger than this is a bad response
        self._idle: list[UpstreamConnection] = []
        self._all: set[UpstreamConnection] = set()
        self.closing = False

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
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self, self.max_head_bytes), target.host, target.port
                )
        except (OSError, TimeoutError) as exc:
            raise map_connect_error(exc, f"{target.host}:{target.port}") from None
        except UpstreamError:
            raise
        if conn.transport is not None:
            set_no_delay(conn.transport)
        self._all.add(conn)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if self.closing or len(self._idle) >= MAX_IDLE_PER_TARGET:
            conn.close()
            return
        conn.idle_since = conn.loop.time()
        self._idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
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
