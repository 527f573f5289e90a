"""HTTP/1.1 details shared by both sides of the proxy: hop-by-hop headers, heads, locally made answers."""

from __future__ import annotations

import json
from http import HTTPStatus

# RFC 9110 §7.6.1: meaningful only for one connection, never forwarded. Transfer-Encoding and Content-Length
# are re-derived from the framing the sidecar itself chooses; Expect is answered by the sidecar.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

Headers = list[tuple[bytes, bytes]]

_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Header names listed in Connection (they are hop-by-hop too)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def status_line(status: int, reason: bytes | None = None) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, reason or reason_phrase(status))


def connection_line(keep_alive: bool, http11: bool) -> bytes:
    """What an answer says of the connection: HTTP/1.1 persists unless told ``close``; an HTTP/1.0 client that
    asked for keep-alive must be told it was granted, or it waits for a close that never comes."""
    if not keep_alive:
        return b"connection: close\r\n"
    return b"" if http11 else b"connection: keep-alive\r\n"


def local_response(
    status: int,
    body: bytes,
    content_type: bytes,
    extra: Headers,
    keep_alive: bool,
    head_only: bool = False,
    http11: bool = True,
) -> bytes:
    """A whole answer the sidecar makes itself (fail-fast, errors, 400s)."""
    parts = [status_line(status), b"content-type: ", content_type, b"\r\ncontent-length: %d\r\n" % len(body)]
    for name, value in extra:
        parts += [name, b": ", value, b"\r\n"]
    parts.append(connection_line(keep_alive, http11))
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


def error_body(reason: str, upstream: str | None, detail: str) -> bytes:
    return json.dumps({"error": reason, "upstream": upstream, "detail": detail}).encode() + b"\n"
