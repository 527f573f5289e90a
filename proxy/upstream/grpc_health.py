"""The gRPC health check (``grpc.health.v1.Health/Check``) as one unary call on an ``H2Pool``.

The two messages are small enough to encode by hand: ``HealthCheckRequest`` is field 1, the service name (a
string); ``HealthCheckResponse`` is field 1, the status (an enum; SERVING = 1). Each travels in gRPC's message
framing: a compressed flag byte, a 4-byte big-endian length, the message.
"""

from __future__ import annotations

import asyncio
import struct

from proxy.h2.engine import H2Stream, StreamReset
from proxy.upstream.errors import UpstreamError
from proxy.upstream.h2pool import H2Pool

CHECK_PATH = b"/grpc.health.v1.Health/Check"
STATUSES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
_MAX_BODY = 64 * 1024  # a health answer is a few bytes


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC message."""
    return struct.pack(">BI", 0, len(message)) + message


def grpc_messages(body: bytes) -> list[bytes]:
    """The uncompressed messages in ``body``; ValueError for compressed or cut-off ones."""
    messages = []
    offset = 0
    while offset < len(body):
        if len(body) - offset < 5:
            raise ValueError("cut-off gRPC message header")
        compressed, length = struct.unpack_from(">BI", body, offset)
        if compressed:
            raise ValueError("compressed gRPC message")
        offset += 5
        if len(body) - offset < length:
            raise ValueError("cut-off gRPC message")
        messages.append(body[offset : offset + length])
        offset += length
    return messages


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while offset < len(data) and shift < 64:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7
    raise ValueError("bad varint")


def check_request(service: str) -> bytes:
    name = service.encode()
    return b"\x0a" + _varint(len(name)) + name if name else b""


def response_status(message: bytes) -> int:
    """Field 1 of a HealthCheckResponse (other fields skipped; absent means 0, UNKNOWN)."""
    status = 0
    offset = 0
    while offset < len(message):
        key, offset = _read_varint(message, offset)
        kind = key & 7
        if kind == 0:
            value, offset = _read_varint(message, offset)
            if key >> 3 == 1:
                status = value
        elif kind == 2:
            length, offset = _read_varint(message, offset)
            offset += length
        elif kind in (1, 5):
            offset += 8 if kind == 1 else 4
        else:
            raise ValueError(f"unexpected protobuf wire type {kind}")
    return status


async def grpc_health_check(pool: H2Pool, service: str = "", timeout: float = 1.0) -> str | None:
    """None when the target answers SERVING for ``service``, else why not."""
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"https" if pool.target.is_tls else b"http"),
        (b":path", CHECK_PATH),
        (b":authority", pool.target.authority.encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"grpc-timeout", f"{max(1, int(timeout * 1000))}m".encode()),
    ]
    stream: H2Stream | None = None
    try:
        async with asyncio.timeout(timeout):
            stream = await pool.open_stream(headers, False, timeout)
            await stream.send_data(grpc_frame(check_request(service)), end_stream=True)
            return await _answer(stream)
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except StreamReset as exc:
        return f"stream reset: {exc}"
    except UpstreamError as exc:
        return str(exc)
    finally:
        if stream is not None:
            stream.reset()  # (nothing when it completed)


async def _answer(stream: H2Stream) -> str | None:
    head = dict(await stream.wait_headers())
    if head.get(b":status") != b"200":
        return f"HTTP status {head.get(b':status', b'?').decode(errors='replace')}"
    body = bytearray()
    while chunk := await stream.read():
        body += chunk
        stream.consumed(len(chunk))
        if len(body) > _MAX_BODY:
            return "health answer too large"
    # A trailers-only answer carries grpc-status in its headers.
    trailers = dict(stream.trailers) if stream.trailers is not None else head
    status = trailers.get(b"grpc-status")
    if status != b"0":
        message = trailers.get(b"grpc-message", b"").decode(errors="replace")
        return f"grpc-status {(status or b'missing').decode(errors='replace')}" + (f": {message}" if message else "")
    try:
        messages = grpc_messages(bytes(body))
        serving = response_status(messages[0]) if messages else 0
    except ValueError as exc:
        return f"bad health answer: {exc}"
    return None if serving == 1 else STATUSES.get(serving, f"status {serving}")
