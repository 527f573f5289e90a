"""A call's request messages, pumped from the client's stream to an attempt's upstream stream.

What has been read is kept while it fits ``replay_bytes``, so a retry can send it again (a unary request, a short
client stream); a longer request stops being replayable, and its call is then never retried. The client's DATA
is acknowledged (its flow-control window given back) only once the upstream stream took it: a slow upstream
slows the client down instead of filling the sidecar's memory.
"""

from __future__ import annotations

import asyncio
import contextlib

from proxy.h2.engine import H2Stream, StreamReset


class RequestPump:
    __slots__ = ("_task", "client", "ended", "kept", "kept_bytes", "limit", "replayable")

    def __init__(self, client: H2Stream, limit: int) -> None:
        self.client = client
        self.limit = limit
        self.kept: list[bytes] = []
        self.kept_bytes = 0
        self.replayable = True
        self.ended = client.ended  # the client has sent its whole request (END_STREAM)
        self._task: asyncio.Task[None] | None = None

    async def send(self, upstream: H2Stream) -> None:
        """Send the request on ``upstream``. All in already (a unary call, the common case): now, without a task;
        else what was kept first, then the rest by a task as the client sends it."""
        self.stop()
        client = self.client
        if not client.ended:
            self._task = asyncio.get_running_loop().create_task(self._pump(upstream))
            return
        fresh: list[bytes] = []
        while chunk := await client.read():  # buffered: no wait
            self._keep(chunk)
            fresh.append(chunk)
        self.ended = True
        chunks = self.kept if self.replayable else fresh  # (not replayable: this is the first attempt)
        for chunk in chunks[:-1]:
            await upstream.send_data(chunk)
        await upstream.send_data(chunks[-1] if chunks else b"", end_stream=True)
        client.consumed(sum(map(len, fresh)))

    def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()

    async def _pump(self, upstream: H2Stream) -> None:
        client = self.client
        with contextlib.suppress(StreamReset):  # the attempt (or the call) sees a broken stream for itself
            for chunk in self.kept:
                await upstream.send_data(chunk)
            while not self.ended:
                chunk = await client.read()
                if not chunk:
                    self.ended = True
                    break
                self._keep(chunk)
                await upstream.send_data(chunk)
                client.consumed(len(chunk))
            await upstream.send_data(b"", end_stream=True)

    def _keep(self, chunk: bytes) -> None:
        if not self.replayable:
            return
        if self.kept_bytes + len(chunk) > self.limit:
            self.replayable = False  # too long to send twice: this call is not retried
            self.kept.clear()
            return
        self.kept.append(chunk)
        self.kept_bytes += len(chunk)
