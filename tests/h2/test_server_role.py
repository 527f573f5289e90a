"""The server role of ``H2Endpoint``: an echo served to a real grpc.aio client, and abusive clients written
frame by frame (Rapid Reset, CONTINUATION flood, oversized header list, too many streams)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
)

from proxy.h2.engine import H2Endpoint, H2Stream, StreamReset
from proxy.h2.limits import AbuseLimits
from tests.h2.support import read_all

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ENHANCE_YOUR_CALM = 11
REFUSED_STREAM = 7


class EchoServer:
    """Answers each call with its own request body; remembers every stream and every endpoint."""

    def __init__(self) -> None:
        self.endpoints: list[H2Endpoint] = []
        self.streams: list[H2Stream] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.hold = False  # accept streams but never answer

    def protocol(self, limits: AbuseLimits) -> Callable[[], H2Endpoint]:
        def make() -> H2Endpoint:
            endpoint = H2Endpoint.server(self.on_stream, limits)
            self.endpoints.append(endpoint)
            return endpoint

        return make

    def on_stream(self, stream: H2Stream) -> None:
        self.streams.append(stream)
        if not self.hold:
            task = asyncio.ensure_future(self.echo(stream))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def echo(self, stream: H2Stream) -> None:
        try:
            body = await read_all(stream)
            await stream.send_headers([(b":status", b"200"), (b"content-type", b"application/grpc")])
            await stream.send_data(body)
            await stream.send_trailers([(b"grpc-status", b"0")])
        except StreamReset:
            pass


@pytest.fixture
async def echo() -> AsyncIterator[tuple[EchoServer, int]]:
    server = EchoServer()
    limits = AbuseLimits(max_concurrent_streams=5, max_resets=50, max_continuation_frames=8)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server.protocol(limits), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    yield server, port
    listener.close()
    for endpoint in server.endpoints:
        endpoint.abort()


async def grpc_call(port: int, message: bytes, timeout: float = 5) -> bytes:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/x/y", request_serializer=None, response_deserializer=None)
        answer: bytes = await call(message, timeout=timeout)
        return answer


async def test_grpc_client_unary_and_concurrent_calls(echo: tuple[EchoServer, int]) -> None:
    _, port = echo
    assert await grpc_call(port, b"hello") == b"hello"
    big = bytes(range(256)) * (3 << 12)  # 3 MiB: several windows' worth of flow control both ways
    assert await grpc_call(port, big, timeout=20) == big
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/x/y", request_serializer=None, response_deserializer=None)
        answers = await asyncio.gather(*(call(str(i).encode(), timeout=10) for i in range(50)))
    assert answers == [str(i).encode() for i in range(50)]


async def test_a_client_cancel_resets_the_stream(echo: tuple[EchoServer, int]) -> None:
    server, port = echo
    server.hold = True
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await grpc_call(port, b"never answered", timeout=0.3)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stream = server.streams[-1]
    await asyncio.wait_for(stream.closed, 5)
    with pytest.raises(StreamReset):
        await stream.read()


class RawClient:
    """An HTTP/2 client that writes whatever frames it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = Encoder()

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(PREFACE + SettingsFrame(0).serialize())
        return cls(reader, writer)

    def block(self, path: bytes = b"/x/y", extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
        headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path), (b":authority", b"t")]
        return bytes(self.encoder.encode(headers + (extra or [])))

    def headers(self, stream_id: int, block: bytes, end_headers: bool = True) -> None:
        frame = HeadersFrame(stream_id, block)
        if end_headers:
            frame.flags.add("END_HEADERS")
        self.writer.write(frame.serialize())

    async def frames(self, timeout: float = 5) -> list[Frame]:
        """Frames read until a GOAWAY or the end of the connection."""
        frames: list[Frame] = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    head = await self.reader.readexactly(9)
                except asyncio.IncompleteReadError:
                    return frames
                frame, length = Frame.parse_frame_header(memoryview(head))
                frame.parse_body(memoryview(await self.reader.readexactly(length)))
                frames.append(frame)
                if isinstance(frame, GoAwayFrame):
                    return frames

    def close(self) -> None:
        self.writer.close()


def goaway_code(frames: list[Frame]) -> int | None:
    codes = [f.error_code for f in frames if isinstance(f, GoAwayFrame)]
    return codes[-1] if codes else None


async def test_rapid_reset_gets_goaway_enhance_your_calm(echo: tuple[EchoServer, int]) -> None:
    server, port = echo
    server.hold = True
    client = await RawClient.connect(port)
    for i in range(100):
        stream_id = 2 * i + 1
        client.headers(stream_id, client.block())
        reset = RstStreamFrame(stream_id)
        reset.error_code = 8
        client.writer.write(reset.serialize())
    frames = await client.frames()
    assert goaway_code(frames) == ENHANCE_YOUR_CALM
    assert server.endpoints[0].abuse == {"rapid_reset": 1}
    assert server.endpoints[0].lost.done() or await asyncio.wait_for(server.endpoints[0].lost, 5) is None
    client.close()
    server.hold = False
    assert await grpc_call(port, b"still serving") == b"still serving"


async def test_continuation_flood_gets_goaway(echo: tuple[EchoServer, int]) -> None:
    server, port = echo
    client = await RawClient.connect(port)
    client.headers(1, client.block(), end_headers=False)
    for _ in range(20):  # never END_HEADERS; the limit is 8 frames
        client.writer.write(ContinuationFrame(1, b"\x40\x01a\x01b").serialize())
    frames = await client.frames()
    assert goaway_code(frames) == ENHANCE_YOUR_CALM
    assert server.endpoints[0].abuse == {"continuation_flood": 1}
    client.close()
    assert await grpc_call(port, b"still serving") == b"still serving"


async def test_oversized_header_list_gets_goaway(echo: tuple[EchoServer, int]) -> None:
    server, port = echo
    client = await RawClient.connect(port)
    # One 4000-byte header indexed once and referenced 20 times: ~4 KB on the wire, ~80 KB decoded.
    client.headers(1, client.block(extra=[(b"x-big", b"a" * 4000)] * 20))
    frames = await client.frames()
    assert goaway_code(frames) == ENHANCE_YOUR_CALM
    assert server.endpoints[0].abuse == {"header_list_too_large": 1}
    client.close()
    assert await grpc_call(port, b"still serving") == b"still serving"


async def test_streams_over_the_limit_are_refused(echo: tuple[EchoServer, int]) -> None:
    server, port = echo
    server.hold = True
    client = await RawClient.connect(port)
    for i in range(7):  # the limit is 5
        client.headers(2 * i + 1, client.block())
    refused: list[int] = []
    async with asyncio.timeout(5):
        while len(refused) < 2:
            head = await client.reader.readexactly(9)
            frame, length = Frame.parse_frame_header(memoryview(head))
            frame.parse_body(memoryview(await client.reader.readexactly(length)))
            if isinstance(frame, RstStreamFrame):
                assert frame.error_code == REFUSED_STREAM
                refused.append(frame.stream_id)
    assert refused == [11, 13]
    assert len(server.streams) == 5
    assert server.endpoints[0].abuse == {"refused_stream": 2}
    client.close()
    server.hold = False
    assert await grpc_call(port, b"still serving") == b"still serving"


async def test_graceful_close_finishes_streams_in_flight(echo: tuple[EchoServer, int]) -> None:
    server, port = echo
    server.hold = True
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/x/y", request_serializer=None, response_deserializer=None)(b"late", timeout=5)
        for _ in range(100):
            if server.streams:
                break
            await asyncio.sleep(0.02)
        endpoint = server.endpoints[0]
        endpoint.close()
        assert not endpoint.accepting
        await server.echo(server.streams[0])
        assert await call == b"late"
        await asyncio.wait_for(endpoint.lost, 5)
