"""A fault-injecting TCP proxy for tests: Toxiproxy's fault set, in-process, on 127.0.0.1.

Toxiproxy itself cannot be installed here and netem is not available, so this reproduces the toxics the chaos
suite and the soak need. A ``FaultProxy`` listens on a loopback port and relays every connection to one target;
``Toxic`` objects added to it (before or while connections are open) act on one direction of the bytes:

    direction  "downstream" = target → client (responses), "upstream" = client → target (requests)
    after      bytes in that direction passed untouched first: 0 acts before the headers, len(head) + n mid-body
    probability  decided once per connection and toxic, from the proxy's seeded RNG (Toxiproxy's "toxicity")
    connections  act on at most this many connections, then never again (e.g. "only the first one")

The toxics: ``Latency`` (with jitter), ``Bandwidth``, ``SlowClose``, ``Timeout`` (hold everything, optionally
close after a while), ``ResetPeer`` (RST via SO_LINGER(1, 0)), ``Slicer`` and ``LimitData``.
``disable()`` closes the listener and every connection (the target is then "refusing"); ``enable()`` reopens it
on the same port. Every connection is recorded (accept time, bytes each way, how it ended) for assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field

UPSTREAM = "upstream"
DOWNSTREAM = "downstream"
_READ = 65536

Emit = Callable[[bytes], Awaitable[None]]


class _Cut(Exception):
    """Raised by a toxic to end the whole connection (FIN, or RST when ``reset``)."""

    def __init__(self, reset: bool) -> None:
        super().__init__("reset" if reset else "close")
        self.reset = reset


@dataclass(eq=False)
class Toxic:
    direction: str = DOWNSTREAM
    after: int = 0
    probability: float = 1.0
    connections: int | None = None
    applied: int = field(default=0, init=False)  # connections this toxic has acted on

    def __post_init__(self) -> None:
        if self.direction not in (UPSTREAM, DOWNSTREAM):
            raise ValueError(f"direction must be {UPSTREAM!r} or {DOWNSTREAM!r}")

    async def data(self, link: Link, chunk: bytes, emit: Emit) -> None:
        await emit(chunk)

    async def eof(self, link: Link) -> None:
        """The source closed its side; return when the destination may see the close."""


@dataclass(eq=False)
class Latency(Toxic):
    """Delay every chunk by ``latency`` ± uniform ``jitter`` seconds (order is kept)."""

    latency: float = 0.1
    jitter: float = 0.0

    async def data(self, link: Link, chunk: bytes, emit: Emit) -> None:
        delay = self.latency + (link.rng.uniform(-self.jitter, self.jitter) if self.jitter else 0.0)
        await asyncio.sleep(max(0.0, delay))
        await emit(chunk)


@dataclass(eq=False)
class Bandwidth(Toxic):
    """At most ``rate`` bytes per second, in pieces of a tenth of a second's worth."""

    rate: int = 10_000

    async def data(self, link: Link, chunk: bytes, emit: Emit) -> None:
        step = max(1, self.rate // 10)
        for start in range(0, len(chunk), step):
            piece = chunk[start : start + step]
            await asyncio.sleep(len(piece) / self.rate)
            await emit(piece)


@dataclass(eq=False)
class SlowClose(Toxic):
    """Hold the close (FIN) for ``delay`` seconds after the source closed."""

    delay: float = 0.5

    async def eof(self, link: Link) -> None:
        await asyncio.sleep(self.delay)


@dataclass(eq=False)
class Timeout(Toxic):
    """Pass nothing more; close the connection after ``timeout`` seconds (0: hold it until the proxy stops)."""

    timeout: float = 0.0

    async def data(self, link: Link, chunk: bytes, emit: Emit) -> None:
        if self.timeout <= 0:
            await asyncio.Event().wait()  # held forever; cancelled when the connection or the proxy ends
        await asyncio.sleep(self.timeout)
        raise _Cut(reset=False)

    async def eof(self, link: Link) -> None:
        if self.timeout <= 0:
            await asyncio.Event().wait()
        await asyncio.sleep(self.timeout)


@dataclass(eq=False)
class ResetPeer(Toxic):
    """Reset both sides (RST, via SO_LINGER(1, 0)) ``timeout`` seconds after the first byte it sees."""

    timeout: float = 0.0

    async def data(self, link: Link, chunk: bytes, emit: Emit) -> None:
        if self.timeout > 0:
            await asyncio.sleep(self.timeout)
        raise _Cut(reset=True)


@dataclass(eq=False)
class Slicer(Toxic):
    """Cut chunks into pieces of ``average_size`` ± ``size_variation`` bytes, ``delay`` seconds apart."""

    average_size: int = 16
    size_variation: int = 0
    delay: float = 0.0

    async def data(self, link: Link, chunk: bytes, emit: Emit) -> None:
        start = 0
        while start < len(chunk):
            size = max(1, self.average_size + link.rng.randint(-self.size_variation, self.size_variation))
            await emit(chunk[start : start + size])
            start += size
            if self.delay and start < len(chunk):
                await asyncio.sleep(self.delay)


@dataclass(eq=False)
class LimitData(Toxic):
    """Close the connection once ``bytes`` bytes (counted from ``after``) have passed."""

    bytes: int = 0

    async def data(self, link: Link, chunk: bytes, emit: Emit) -> None:
        left = self.bytes - link.limited.get(id(self), 0)
        if len(chunk) >= left:
            if left > 0:
                await emit(chunk[:left])
            raise _Cut(reset=False)
        link.limited[id(self)] = link.limited.get(id(self), 0) + len(chunk)
        await emit(chunk)


@dataclass
class ConnectionRecord:
    """What happened to one proxied connection."""

    accepted_at: float
    bytes_up: int = 0  # client → target, as forwarded
    bytes_down: int = 0  # target → client, as forwarded
    connected: bool = False  # reached the target
    ended: str = ""  # "closed", "reset", "refused", "cut"
    ended_at: float = 0.0
    client_closed_at: float = 0.0  # when the client's side first reached EOF or failed


class Link:
    """One direction of one connection, as the toxics see it."""

    def __init__(self, conn: _Connection, direction: str) -> None:
        self.conn = conn
        self.direction = direction
        self.rng = conn.proxy.rng
        self.seen = 0  # bytes read from the source so far
        self.limited: dict[int, int] = {}


class _Connection:
    def __init__(
        self, proxy: FaultProxy, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        self.proxy = proxy
        self.client_reader = client_reader
        self.client_writer = client_writer
        self.record = ConnectionRecord(accepted_at=time.monotonic())
        self.decisions: dict[int, bool] = {}  # toxic id → acts on this connection
        self.target_writer: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def active(self, toxic: Toxic) -> bool:
        decided = self.decisions.get(id(toxic))
        if decided is None:
            decided = self.proxy.rng.random() < toxic.probability
            if decided and toxic.connections is not None:
                decided = toxic.applied < toxic.connections
            if decided:
                toxic.applied += 1
            self.decisions[id(toxic)] = decided
        return decided

    async def run(self) -> None:
        proxy = self.proxy
        try:
            target_reader, self.target_writer = await asyncio.open_connection(proxy.target_host, proxy.target_port)
        except OSError:
            self.record.ended = "refused"
            self._close(reset=True)
            return
        self.record.connected = True
        up = asyncio.create_task(self._pump(self.client_reader, self.target_writer, Link(self, UPSTREAM)))
        down = asyncio.create_task(self._pump(target_reader, self.client_writer, Link(self, DOWNSTREAM)))
        self.tasks = [up, down]
        try:
            done, _ = await asyncio.wait(self.tasks, return_when=asyncio.FIRST_EXCEPTION)
            cut = _cut_of(done)
            if cut is None and not all(t.done() for t in self.tasks):
                await asyncio.wait(self.tasks)  # both directions must reach their EOF
                cut = _cut_of(self.tasks)
            if isinstance(cut, _Cut):
                self.record.ended = "reset" if cut.reset else "cut"
                self._close(reset=cut.reset)
            else:
                self.record.ended = self.record.ended or "closed"
                self._close(reset=False)
        finally:
            for task in self.tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*self.tasks, return_exceptions=True)
            self.record.ended_at = time.monotonic()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link) -> None:
        async def forward(chunk: bytes) -> None:
            writer.write(chunk)
            if link.direction == UPSTREAM:
                self.record.bytes_up += len(chunk)
            else:
                self.record.bytes_down += len(chunk)
            await writer.drain()

        try:
            while True:
                try:
                    chunk = await reader.read(_READ)
                except OSError:
                    chunk = b""
                toxics = [t for t in self.proxy.toxics if t.direction == link.direction]
                if not chunk:
                    if link.direction == UPSTREAM and not self.record.client_closed_at:
                        self.record.client_closed_at = time.monotonic()
                    for toxic in toxics:
                        if link.seen >= toxic.after and self.active(toxic):
                            await toxic.eof(link)
                    with contextlib.suppress(OSError, RuntimeError):
                        writer.write_eof()  # half-close, as TCP would pass it on
                    return
                start = link.seen
                link.seen += len(chunk)
                await self._through(toxics, link, chunk, start, forward)
        except (ConnectionError, OSError):
            if link.direction == UPSTREAM and not self.record.client_closed_at:
                self.record.client_closed_at = time.monotonic()
            raise _Cut(reset=True) from None

    async def _through(self, toxics: list[Toxic], link: Link, chunk: bytes, start: int, last: Emit) -> None:
        """Run ``chunk`` through the toxics in order; bytes before a toxic's ``after`` pass it untouched."""

        async def stage(index: int, data: bytes, offset: int) -> None:
            # ``offset``: where ``data`` starts in this direction's stream (the toxics keep bytes in order).
            if index == len(toxics):
                await last(data)
                return
            toxic = toxics[index]
            if offset < toxic.after:
                clean = toxic.after - offset
                await stage(index + 1, data[:clean], offset)
                data, offset = data[clean:], offset + min(clean, len(data))
                if not data:
                    return
            position = offset

            async def next_stage(piece: bytes) -> None:
                nonlocal position
                start, position = position, position + len(piece)
                await stage(index + 1, piece, start)

            if self.active(toxic):
                await toxic.data(link, data, next_stage)
            else:
                await next_stage(data)

        await stage(0, chunk, start)

    def _close(self, reset: bool) -> None:
        for writer in (self.client_writer, self.target_writer):
            if writer is None:
                continue
            if reset:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        # Linger on with a zero timeout: close() then sends RST instead of FIN.
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()

    def kill(self) -> None:
        for task in self.tasks:
            task.cancel()
        self._close(reset=True)


def _cut_of(tasks: Iterable[asyncio.Task[None]]) -> _Cut | None:
    for task in tasks:
        if task.done() and not task.cancelled() and isinstance(task.exception(), _Cut):
            return task.exception()  # type: ignore[return-value]
    return None


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, port: int = 0, seed: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = port
        self.rng = random.Random(seed)
        self.toxics: list[Toxic] = []
        self.records: list[ConnectionRecord] = []
        self._server: asyncio.Server | None = None
        self._live: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def enabled(self) -> bool:
        return self._server is not None

    def add(self, toxic: Toxic) -> Toxic:
        """Takes effect at once, on open connections too (from their next chunk)."""
        self.toxics.append(toxic)
        return toxic

    def remove(self, toxic: Toxic) -> None:
        self.toxics.remove(toxic)

    def clear(self) -> None:
        self.toxics.clear()

    async def enable(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def disable(self) -> None:
        """Close the listener (new connections are refused) and reset every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self.reset_all()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    def reset_all(self) -> None:
        for conn in list(self._live):
            conn.kill()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(self, reader, writer)
        self.records.append(conn.record)
        self._live.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await conn.run()
        finally:
            self._live.discard(conn)
            if task is not None:
                self._tasks.discard(task)

    async def stop(self) -> None:
        await self.disable()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)


@contextlib.asynccontextmanager
async def fault_proxy(
    target_port: int, *toxics: Toxic, target_host: str = "127.0.0.1", seed: int = 0
) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(target_host, target_port, seed=seed)
    for toxic in toxics:
        proxy.add(toxic)
    await proxy.enable()
    try:
        yield proxy
    finally:
        await proxy.stop()
