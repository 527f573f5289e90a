"""The chunked transfer coding (RFC 9112 §7.1), written in one place for both directions.

    a chunk        ``<size hex>\\r\\n<data>\\r\\n``  (an empty chunk is never written: it would end the body)
    the end        ``0\\r\\n`` + trailer fields + ``\\r\\n``

The client's request bodies go upstream through ``frames`` (vectored: the data buffers are not copied); answers
go to clients through ``chunk`` (a streamed piece), ``whole`` (an answer already in hand, in one write) and
``end`` (the last chunk, with the upstream's trailer fields that may be relayed). Parsing stays with httptools.
"""

from __future__ import annotations

from proxy.http.wire import HOP_BY_HOP, Headers

LAST_CHUNK = b"0\r\n\r\n"

# Fields a trailer section must not carry (RFC 9110 §6.5.1: framing, routing, payload processing): a client might
# act on them as if they were in the head, so they are dropped rather than relayed.
NOT_IN_TRAILERS = HOP_BY_HOP | frozenset(
    {b"content-length", b"host", b"content-encoding", b"content-type", b"content-range", b"set-cookie"}
)


def chunk(data: bytes) -> bytes:
    """One chunk, framed in a single buffer (``data`` must not be empty)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def frames(chunks: list[bytes], last: bool) -> list[bytes]:
    """Chunks framed for a vectored write, the data buffers kept as they are; ``last``: the body ends here (no
    trailers). Empty chunks are skipped."""
    out: list[bytes] = []
    for data in chunks:
        if data:
            out += (b"%x\r\n" % len(data), data, b"\r\n")
    if last:
        out.append(LAST_CHUNK)
    return out


def end(trailers: Headers | None) -> bytes:
    """The end of a chunked body: the last chunk with the upstream's trailer fields that may be relayed."""
    if not trailers:
        return LAST_CHUNK
    parts = [b"0\r\n"]
    for name, value in trailers:
        if name.lower() not in NOT_IN_TRAILERS:
            parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def whole(head: bytes, chunks: list[bytes], trailers: Headers | None) -> bytes:
    """A whole answer in hand, chunk-framed for the client (its length was not known), with its trailers."""
    return b"".join((head, *frames(chunks, last=False), end(trailers)))
