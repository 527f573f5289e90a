"""Real grpc.aio servers on loopback for the HTTP/2 tests, with raw-bytes generic handlers (no stubs needed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from proxy.h2.engine import H2Stream
from proxy.upstream.grpc_health import grpc_frame, grpc_messages

SERVICE = "test.Echo"
CHUNK = 1 << 20


async def _unary(request: bytes, context: Any) -> bytes:
    return request


async def _stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    """Request: the number of 1 MiB messages to send back."""
    for i in range(int(request)):
        yield bytes([i % 256]) * CHUNK


async def _slow(request: bytes, context: Any) -> bytes:
    await asyncio.sleep(float(request))
    return request


def echo_handlers() -> Any:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "Stream": grpc.unary_stream_rpc_method_handler(_stream),
            "Slow": grpc.unary_unary_rpc_method_handler(_slow),
        },
    )


async def start_grpc_server(*options: tuple[str, Any]) -> tuple[Any, int]:
    server = grpc.aio.server(options=list(options))
    server.add_generic_rpc_handlers((echo_handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def request_headers(port: int, method: str) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", f"/{SERVICE}/{method}".encode()),
        (b":authority", f"127.0.0.1:{port}".encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]


async def read_all(stream: H2Stream) -> bytes:
    body = bytearray()
    while chunk := await stream.read():
        body += chunk
        stream.consumed(len(chunk))
    return bytes(body)


async def unary(stream: H2Stream, message: bytes) -> tuple[list[bytes], bytes | None]:
    """Send one message, read the answer: (messages, grpc-status)."""
    await stream.send_data(grpc_frame(message), end_stream=True)
    await stream.wait_headers()
    body = await read_all(stream)
    trailers = dict(stream.trailers or [])
    return grpc_messages(body), trailers.get(b"grpc-status")
