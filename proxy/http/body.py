"""A request body on its way through: kept whole while small (so a retry can replay it), streamed when large,
dropped when nobody wants the rest of it (``discard``: the answer went out before the body was all in)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.resilience.clock import Clock, Timer

# Pause reading the client while this much of its body waits for the upstream to take it.
_HIGH_WATER = 1 << 20

# After an answer that came before the request body was all in, the rest of the body is read and dropped so the
# client's connection can carry its next request — within these bounds, after nginx's discarding of a body it
# does not need (``lingering_timeout`` 5 s; nginx has no byte bound, a sidecar in front of one upstream should):
# at most DISCARD_BYTES more of the body, for at most DISCARD_SECONDS. An answer whose body is known not to end
# within them (a Content-Length beyond, or chunked and not yet ended while a streamed answer starts) says
# ``Connection: close`` instead, so a client is never closed on without being told.
DISCARD_BYTES = 4 << 20
DISCARD_SECONDS = 5.0


class BodyAborted(Exception):
    """The client's body ended badly (malformed chunking, disconnect): the upstream request must be dropped."""


class RequestBody:
    __slots__ = (
        "_clock",
        "_consumed",
        "_discard_limit",
        "_discard_over",
        "_discard_timer",
        "_ended",
        "_error",
        "_pause",
        "_paused",
        "_replay_limit",
        "_resume",
        "_taken",
        "_waiter",
        "chunks",
        "complete",
        "discarding",
        "length",
        "on_ready",
        "replayable",
        "size",
        "streamed",
    )

    def __init__(
        self,
        length: int | None,
        replay_limit: int,
        pause: Callable[[], None],
        resume: Callable[[], None],
        clock: Clock,
    ) -> None:
        self.length = length  # from Content-Length; None when chunked
        self.chunks: list[bytes] = []
        self.size = 0  # bytes received so far (kept, sent on or dropped)
        self.complete = False
        self.replayable = length is None or length <= replay_limit
        self.streamed = False  # a non-replayable body has started flowing to an upstream
        self.discarding = False  # nobody wants the rest: what arrives is dropped
        # Called (in the listener's data_received) when there is news: data, the end, an error. The body pump
        # (``proxy.http.pump``) hangs itself here instead of a task waiting on a future per chunk.
        self.on_ready: Callable[[], None] | None = None
        self._replay_limit = replay_limit
        self._consumed = 0
        self._taken = 0  # index in ``chunks`` of the first chunk not taken yet (a replayable body keeps them)
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._pause = pause
        self._resume = resume
        self._clock = clock
        self._paused = False
        self._discard_limit = 0
        self._discard_timer: Timer | None = None
        self._ended: Callable[[], None] | None = None  # discarding: the body is over
        self._discard_over: Callable[[], None] | None = None  # discarding: past the bounds

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        if self.discarding:
            if self.on_ready is not None:
                self.on_ready()  # the pump counts what it drops against its bound
            elif self.size > self._discard_limit:
                self._discard_failed()
            return
        self.chunks.append(data)
        if self.size > self._replay_limit:
            self.replayable = False
        if not self._paused and self.size - self._consumed > _HIGH_WATER:
            self._paused = True
            self._pause()
        self._wake()

    def finish(self) -> None:
        self.complete = True
        ended = self._ended
        if ended is not None:
            self._stop_discarding()
            ended()
        self._wake()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._stop_discarding()
        self._wake()

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def remaining(self) -> int | None:
        """Bytes still to come, if known (a Content-Length); None for a chunked body still arriving."""
        if self.complete:
            return 0
        return None if self.length is None else self.length - self.size

    async def wait_ready(self, idle: float) -> None:
        """Until the body is complete, or too large to keep (then it streams), or broken (BodyAborted).
        TimeoutError when the client sends nothing for ``idle`` (a silence, however long the body takes)."""
        while not self.complete and self.replayable and self._error is None:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            timer = self._clock.call_later(idle, partial(_time_out, waiter))
            try:
                await waiter
            finally:
                timer.cancel()
        if self._error is not None:
            raise BodyAborted(str(self._error))

    @property
    def whole(self) -> bytes | None:
        """The entire body, if it has all arrived and was kept."""
        if self.complete and self.replayable:
            return b"".join(self.chunks)
        return None

    def take(self) -> list[bytes]:
        """The chunks arrived since the last ``take`` (from the start for the first). A body that can no longer be
        replayed lets them go; reading the client resumes once what waits falls below half the high-water mark."""
        if self.replayable:
            taken = self.chunks[self._taken :]
            self._taken = len(self.chunks)
        else:
            taken = self.chunks[self._taken :] if self._taken else self.chunks
            self.chunks, self._taken = [], 0
            self.streamed = True
        for chunk in taken:
            self._consumed += len(chunk)
        if self._paused and self.size - self._consumed <= _HIGH_WATER // 2:
            self._paused = False
            self._resume()
        return taken

    def discard(self, ended: Callable[[], None] | None = None, over: Callable[[], None] | None = None) -> None:
        """Drop what waits and all that still comes; the client is read at full speed until its body ends. With
        callbacks, bounded by itself: ``ended`` when the body is over, or ``over`` past DISCARD_BYTES more or
        DISCARD_SECONDS (an answer has kept the connection for a body known to fit: only a stall gets there)."""
        self.discarding = True
        self.chunks, self._taken = [], 0
        self._consumed = self.size
        self.replayable = False
        self._paused = False
        self._resume()
        if ended is not None and over is not None:
            self._ended, self._discard_over = ended, over
            self._discard_limit = self.size + DISCARD_BYTES
            self._discard_timer = self._clock.call_later(DISCARD_SECONDS, self._discard_failed)

    def _discard_failed(self) -> None:
        over = self._discard_over
        self._stop_discarding()
        if over is not None:
            over()

    def _stop_discarding(self) -> None:
        if self._discard_timer is not None:
            self._discard_timer.cancel()
            self._discard_timer = None
        self._discard_over = self._ended = None

    def _wake(self) -> None:
        ready = self.on_ready
        if ready is not None:
            ready()
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
