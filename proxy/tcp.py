"""L4: a byte relay for dependencies that do not speak HTTP (PostgreSQL, Redis, Kafka).

The breaker works at connection level: a failed or timed-out connect counts against it, a connect that
succeeds counts for it. While it is open, a new client connection is closed at once, with no upstream attempt;
connections already established are left alone. Bytes flow both ways with back-pressure (each side pauses
reading while the other's send buffer is full) and half-close is passed on (EOF from one side becomes
``write_eof`` on the other).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.errors import UpstreamError, map_connect_error

if TYPE_CHECKING:
    from proxy.runtime import UpstreamRuntime
    from proxy.upstream.balancer import TargetState

log = logging.getLogger("seawall.tcp")


class _Side(asyncio.Protocol):
    """One end of a relay; ``peer`` is the other end's transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.closed = False
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
            if peer.eof:
                self.close()
                peer.close()
        return True  # keep our write side open: the other direction may still be talking

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.closed:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.closed:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.peer is not None:
            self.peer.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()


class TcpClient(_Side):
    """The client end: decides admission, opens the upstream end."""

    def __init__(self, get_runtime: Callable[[], UpstreamRuntime], connections: set[TcpClient]) -> None:
        super().__init__()
        self._get_runtime = get_runtime
        self._connections = connections
        self._task: asyncio.Task[None] | None = None
        self._rt: UpstreamRuntime | None = None
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._connections.add(self)
        rt = self._rt = self._get_runtime()
        now = rt.clock.monotonic()
        permit = rt.breaker.try_acquire(now)
        if permit is None and rt.enforce:
            rt.stats.reject("breaker_open")
            rt.stats.answered(503, 0.0)
            self.close()
            return
        if permit is None:
            rt.stats.reject("breaker_open_shadow")
        if not rt.bulkhead.try_enter():
            rt.stats.reject("overload")
            rt.stats.answered(503, 0.0)
            if permit is not None:
                rt.breaker.record_ignored(permit)
            self.close()
            return
        self._admitted = True
        assert self.transport is not None
        self.transport.pause_reading()  # hold the client's bytes until the upstream end exists
        self._task = asyncio.get_running_loop().create_task(self._open(rt, permit))

    async def _open(self, rt: UpstreamRuntime, permit: object) -> None:
        from proxy.breaker import Permit

        assert permit is None or isinstance(permit, Permit)
        started = rt.clock.monotonic()
        tried: TargetState | None = None
        try:
            state = rt.balancer.pick(started, tried)
            target = state.target
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(rt.policy.timeouts.connect):
                    _, upstream = await loop.create_connection(_Side, target.host, target.port)
            except (OSError, TimeoutError) as exc:
                error: UpstreamError = map_connect_error(exc, f"{target.host}:{target.port}")
                now = rt.clock.monotonic()
                rt.stats.failed(error.kind)
                if permit is not None:
                    rt.breaker.record_failure(permit, now, now - started)
                rt.balancer.report(state, ok=False, now=now, kind=error.kind)
                rt.stats.answered(502, now - started)
                log.info("tcp connect to %s failed: %s", target, error,
                         extra={"event": "tcp_connect_failed", "upstream": rt.name})
                self.close()
                return
            now = rt.clock.monotonic()
            if permit is not None:
                rt.breaker.record_success(permit, now, now - started)
            rt.balancer.report(state, ok=True, now=now)
            rt.stats.answered(200, now - started)
            if self.closed:
                upstream.close()
                return
            upstream.peer = self
            self.peer = upstream
            assert self.transport is not None
            self.transport.resume_reading()
        except asyncio.CancelledError:
            if permit is not None:
                rt.breaker.record_ignored(permit)
            raise

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._connections.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._admitted and self._rt is not None:
            self._admitted = False
            self._rt.bulkhead.leave()

    def shutdown_when_idle(self) -> None:
        """Draining leaves established relays alone until the drain deadline."""
