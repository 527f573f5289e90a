"""A request body on its way through: kept whole while small (so a retry can replay it), streamed when large."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

# Pause reading the client while this much of its body waits for the upstream to take it.
_HIGH_WATER = 1 << 20


class BodyAborted(Exception):
    """The client's body ended badly (malformed chunking, disconnect): the upstream request must be dropped."""


class RequestBody:
    __slots__ = (
        "_consumed",
        "_error",
        "_pause",
        "_paused",
        "_replay_limit",
        "_resume",
        "_waiter",
        "chunks",
        "complete",
        "length",
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
    ) -> None:
        self.length = length  # from Content-Length; None when chunked
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = False
        self.replayable = length is None or length <= replay_limit
        self.streamed = False  # a non-replayable body has started flowing to an upstream
        self._replay_limit = replay_limit
        self._consumed = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._pause = pause
        self._resume = resume
        self._paused = False

    def feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size > self._replay_limit:
            self.replayable = False
        if not self._paused and self.size - self._consumed > _HIGH_WATER:
            self._paused = True
            self._pause()
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._wake()

    async def wait_ready(self, idle: float) -> None:
        """Until the body is complete, or too large to keep (then it streams), or broken (BodyAborted).
        TimeoutError when the client sends nothing for ``idle`` (a silence, however long the body takes)."""
        while not self.complete and self.replayable and self._error is None:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            async with asyncio.timeout(idle):
                await waiter
        if self._error is not None:
            raise BodyAborted(str(self._error))

    @property
    def whole(self) -> bytes | None:
        """The entire body, if it has all arrived and was kept."""
        if self.complete and self.replayable:
            return b"".join(self.chunks)
        return None

    async def stream(self) -> AsyncIterator[bytes]:
        """The body from its start (replayable) or from where the last reader left off (streamed)."""
        index = 0
        if not self.replayable:
            self.streamed = True
        while True:
            while index < len(self.chunks):
                chunk = self.chunks[index]
                if not self.replayable:
                    self.chunks[index] = b""  # already sent on, and never replayed: let it go
                    self.streamed = True
                index += 1
                self._consumed += len(chunk)
                if self._paused and self.size - self._consumed <= _HIGH_WATER // 2:
                    self._paused = False
                    self._resume()
                yield chunk
            if self._error is not None:
                raise BodyAborted(str(self._error))
            if self.complete:
                return
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
