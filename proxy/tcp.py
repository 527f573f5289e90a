"""L4: a byte relay for dependencies that do not speak HTTP (PostgreSQL, Redis, Kafka).

    client connects ─▶ limits (max_concurrent)        ── over → closed at once, reason=overload
                    ─▶ breaker.try_acquire(now)        ── open → closed at once, reason=breaker_open
                    ─▶ pick target ─▶ connect (timeouts.connect)
                          │ failed? → breaker + outlier record it; another target if one is left
                          └ connected → breaker + outlier record a success; relay until both sides are done

The breaker works at connection level: a failed or timed-out connect counts against it, a connect that
succeeds counts for it. While it is open, a new client connection is closed at once, with no upstream attempt;
connections already established are left alone (a database session in the middle of a transaction must not be
cut because *other* connects failed). Bytes flow both ways with back-pressure (each side pauses reading while
the other's send buffer is full) and half-close is passed on (EOF from one side becomes ``write_eof`` on the
other), so "send the request, shut down writing, read the reply" clients work.

How the bytes move, once connected: on Linux the relay takes both sockets off the event loop's transports and
hands them to ``proxy.splice`` (bulk streams move by ``splice(2)`` and never enter Python; small reads are
copied; the same back-pressure and half-close). Elsewhere, with ``SEAWALL_TCP_SPLICE=0``, or when the client's
socket cannot be taken over, the two ``_Side`` protocols relay through their transports. The upstream is dialled
as a bare socket either way, so nothing is read from it before the relay is chosen.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.runtime import Outcome
from proxy.sockets import Drainable, dial, set_no_delay, take_socket
from proxy.splice import AVAILABLE, SpliceRelay
from proxy.upstream.errors import OutOfResources, UpstreamError, map_connect_error

if TYPE_CHECKING:
    from proxy.resilience.breaker import Permit
    from proxy.runtime import UpstreamRuntime
    from proxy.upstream.balancer import TargetState

log = logging.getLogger("seawall.tcp")

EARLY_BUFFER_LIMIT = 256 * 1024  # client bytes held while the upstream connect is in progress

# Relay by splice (Linux: the bytes never enter Python) unless SEAWALL_TCP_SPLICE=0; the protocol-based relay is
# the fallback everywhere else, and for a connection whose splice relay cannot be set up.
SPLICE = AVAILABLE and os.environ.get("SEAWALL_TCP_SPLICE", "1") != "0"


class _Side(asyncio.Protocol):
    """One end of a relay; ``peer`` is the other end."""

    def __init__(self, peer: _Side | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer = peer
        self.closed = False
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        set_no_delay(transport)

    def _live_peer(self) -> asyncio.Transport | None:
        peer = self.peer
        if peer is None or peer.transport is None or peer.closed:
            return None
        return peer.transport

    def data_received(self, data: bytes) -> None:
        out = self._live_peer()
        if out is not None:
            out.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        out = self._live_peer()
        if out is not None and self.peer is not None:
            if out.can_write_eof():
                out.write_eof()
            if self.peer.eof:  # both directions are finished: nothing more can flow
                self.close()
                self.peer.close()
        return True  # keep our write side open: the other direction may still be talking

    def pause_writing(self) -> None:
        # Our send buffer is full: stop reading from the side that fills it.
        out = self._live_peer()
        if out is not None:
            out.pause_reading()

    def resume_writing(self) -> None:
        out = self._live_peer()
        if out is not None:
            out.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.peer is not None:
            self.peer.close()  # ``close`` flushes what is buffered for the peer first

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()


class TcpClient(_Side):
    """The client end: decides admission, opens the upstream end."""

    def __init__(self, get_runtime: Callable[[], UpstreamRuntime], connections: set[Drainable]) -> None:
        super().__init__()
        self._get_runtime = get_runtime
        self._connections = connections
        self._task: asyncio.Task[None] | None = None
        self._rt: UpstreamRuntime | None = None
        self._admitted = False
        self._target: TargetState | None = None
        # Bytes the client sent before the upstream end existed. ``pause_reading`` in ``connection_made`` is
        # not enough: uvloop starts reading only after ``connection_made`` returns and ignores a pause before.
        self._early: list[bytes] = []
        self._early_size = 0
        self.relay: SpliceRelay | None = None  # set once the bytes move by splice (see ``_splice``)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._connections.add(self)
        rt = self._rt = self._get_runtime()
        # Limits first, then the breaker, as on the HTTP path: an overload is never a breaker event.
        if not rt.bulkhead.try_enter():
            rt.stats.reject("overload")
            rt.stats.answered(503, 0.0)
            self.close()
            return
        self._admitted = True
        permit = rt.breaker.try_acquire(rt.clock.monotonic())
        if permit is None and rt.enforce:
            rt.stats.reject("breaker_open")
            rt.stats.answered(503, 0.0)
            self.close()
            return
        if permit is None:
            rt.stats.reject("breaker_open_shadow")
        assert self.transport is not None
        self.transport.pause_reading()  # hold the client's bytes until the upstream end exists
        self._task = asyncio.get_running_loop().create_task(self._open(rt, permit))

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self._early.append(data)
            self._early_size += len(data)
            if self._early_size > EARLY_BUFFER_LIMIT and self.transport is not None:
                self.transport.pause_reading()  # reading has started by now, so this pause holds
            return
        super().data_received(data)

    def eof_received(self) -> bool:
        if self.peer is None:
            self.eof = True  # passed on by ``_link`` once the upstream end exists
            return True
        return super().eof_received()

    async def _open(self, rt: UpstreamRuntime, permit: Permit | None) -> None:
        """Connect to a target; on failure try another (nothing was sent yet, so it is always safe)."""
        started = rt.clock.monotonic()
        # Bounded: at most one try per target, and no more than the retry policy allows.
        tries = min(len(rt.balancer.states), rt.policy.retry.max_retries + 1)
        previous: TargetState | None = None
        try:
            for attempt in range(1, tries + 1):
                state = rt.balancer.pick(rt.clock.monotonic(), previous)
                upstream = await self._connect(rt, state, permit, started)
                if upstream is not None:
                    permit = None  # ``_connect`` recorded the success
                    await self._link(rt, state, upstream, started)
                    return
                previous = state
                permit = None
                if attempt == tries or self.closed:
                    break
                permit = rt.breaker.try_acquire(rt.clock.monotonic())
                if permit is None and rt.enforce:
                    break  # that failure opened the breaker: stop here
            rt.stats.answered(502, rt.clock.monotonic() - started)
            self.close()
        except OutOfResources:
            rt.stats.answered(503, rt.clock.monotonic() - started)
            self.close()
        except asyncio.CancelledError:
            rt.settle(permit, None, Outcome.IGNORED, rt.clock.monotonic())
            raise

    async def _connect(
        self, rt: UpstreamRuntime, state: TargetState, permit: Permit | None, started: float
    ) -> socket.socket | None:
        target = state.target
        try:
            async with asyncio.timeout(rt.policy.timeouts.connect):
                # A bare socket, not a transport: nothing is read from it until ``_link`` decides how to relay,
                # so a server that speaks first (a MySQL greeting, an SMTP banner) loses nothing.
                upstream = await dial(target.host, target.port)
        except (OSError, TimeoutError) as exc:
            try:
                error: UpstreamError = map_connect_error(exc, f"{target.host}:{target.port}")
            except OutOfResources as local:
                rt.out_of_resources(permit, local)  # closed like an overload, nothing held against the breaker
                raise
            log.info(
                "tcp connect to %s failed: %s",
                target,
                error,
                extra={"event": "tcp_connect_failed", "upstream": rt.name, "target": str(target)},
            )
            now = rt.clock.monotonic()
            rt.settle(permit, state, Outcome.FAILURE, now, now - started, error.kind, logger=log)
            return None
        now = rt.clock.monotonic()
        rt.settle(permit, state, Outcome.SUCCESS, now, now - started, logger=log)
        return upstream

    async def _link(self, rt: UpstreamRuntime, state: TargetState, upstream: socket.socket, started: float) -> None:
        rt.stats.answered(200, rt.clock.monotonic() - started)
        if self.closed:  # the client left while we connected
            upstream.close()
            return
        state.outstanding += 1  # least_request counts open relays per target
        self._target = state
        if SPLICE and self._splice(upstream):
            return
        loop = asyncio.get_running_loop()
        try:
            # The upstream end knows its peer from the first byte it reads.
            _, side = await loop.connect_accepted_socket(lambda: _Side(peer=self), upstream)
        except OSError:
            upstream.close()
            self.close()
            return
        except BaseException:
            upstream.close()
            raise
        self._relay_with(side)

    def _relay_with(self, upstream: _Side) -> None:
        """Relay through the two protocols (the fallback: no splice here, or it could not be set up)."""
        if self.closed:  # the client left while the upstream transport was made
            upstream.close()
            return
        self.peer = upstream
        assert upstream.transport is not None and self.transport is not None
        early, self._early, self._early_size = self._early, [], 0
        if early:
            upstream.transport.writelines(early)
        if self.eof:
            upstream.transport.write_eof()
            if upstream.eof:
                self.close()
                upstream.close()
                return
        self.transport.resume_reading()

    def _splice(self, upstream: socket.socket) -> bool:
        """Hand both sockets to a splice relay; False (nothing changed) when it cannot be set up."""
        assert self.transport is not None
        self.transport.pause_reading()  # from here on the client's bytes stay in its socket
        try:
            client = take_socket(self.transport)
        except OSError as exc:  # out of file descriptors
            log.warning(
                "tcp splice relay unavailable, relaying through the event loop: %s",
                exc,
                extra={"event": "tcp_splice_unavailable"},
            )
            return False
        loop = asyncio.get_running_loop()
        relay = SpliceRelay(loop, client, upstream, self._relay_closed, early_a=b"".join(self._early), a_eof=self.eof)
        self._early, self._early_size = [], 0
        self.relay = relay
        # The transport lets go of its descriptor; the relay holds a duplicate of it, so the connection lives on.
        # ``connection_lost`` sees ``relay`` set and leaves the accounting to ``_relay_closed``.
        self.transport.abort()
        relay.start()
        return True

    def _relay_closed(self) -> None:
        self.closed = True
        self._release()

    def buffered(self) -> int:
        """Bytes the sidecar holds for this relay (read from one side, not yet sent to the other)."""
        if self.relay is not None:
            return self.relay.buffered()
        return sum(s.transport.get_write_buffer_size() for s in (self, self.peer) if s and s.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.relay is not None:  # the transport let go of a socket the splice relay still uses
            return
        super().connection_lost(exc)
        self._release()

    def _release(self) -> None:
        self._connections.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._target is not None:
            self._target.outstanding -= 1
            self._target = None
        if self._admitted and self._rt is not None:
            self._admitted = False
            self._rt.bulkhead.leave()

    def close(self) -> None:
        if self.relay is not None:
            self.relay.close()
            return
        super().close()

    def shutdown_when_idle(self) -> None:
        """Nothing to do: a byte stream has no idle point the sidecar could recognise, so a relay runs on
        until either side ends it or the server closes it at the end of its drain."""
