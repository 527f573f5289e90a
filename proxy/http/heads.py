"""The heads the sidecar writes: a request head for the upstream, a response head for the client.

Both drop hop-by-hop headers (RFC 9110 §7.6.1) and any header a ``Connection`` header names; the request side
appends the client to ``X-Forwarded-For`` and sets Host and the framing the sidecar chose for the body.

Trailers: a client's ``TE: trailers`` is forwarded (as ``TE: trailers`` only, with the ``TE`` connection option
RFC 9110 §10.1.4 asks for), and an upstream's chunked trailer section is relayed to a client that is answered
chunked (``proxy.http.chunked.end``), with the ``Trailer`` header that announces it. A client answered without chunking
(HTTP/1.0, or a HEAD) cannot receive trailers: they are dropped there, as RFC 9112 §7.1.2 allows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.http import wire
from proxy.http.request import Request
from proxy.upstream.connection import ResponseHead

if TYPE_CHECKING:
    from proxy.runtime import UpstreamRuntime


def request_head(rt: UpstreamRuntime, req: Request, authority: bytes, framing: bytes) -> bytes:
    parts = [
        req.method_bytes,
        b" ",
        req.path,
        b" HTTP/1.1\r\nhost: ",
        req.host if rt.policy.preserve_host and req.host else authority,
        b"\r\n",
    ]
    forwarded_for = None
    te_trailers = False
    dropped = req.connection_tokens
    for name, value in req.headers:
        lowered = name.lower()
        if lowered in _NOT_FORWARDED or (dropped and lowered in dropped):
            if lowered == b"x-forwarded-for":
                forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
            elif lowered == b"te" and not te_trailers and _accepts_trailers(value):
                te_trailers = True
                parts.append(b"te: trailers\r\nconnection: te\r\n")  # other codings are the client's own hop's
            continue
        parts += [name, b": ", value, b"\r\n"]
    parts += [
        b"x-forwarded-for: ",
        req.client_ip if forwarded_for is None else forwarded_for + b", " + req.client_ip,
        b"\r\n",
        framing,
        b"\r\n",
    ]
    return b"".join(parts)


def _accepts_trailers(te: bytes) -> bool:
    return any(token.split(b";", 1)[0].strip() == b"trailers" for token in te.lower().split(b","))


_SET_BY_SIDECAR = frozenset({b"host", b"content-length", b"expect", b"x-forwarded-for"})
_NOT_FORWARDED = wire.HOP_BY_HOP | _SET_BY_SIDECAR


def response_head(
    head: ResponseHead, client_chunked: bool, attempts: int, keep_alive: bool, http11: bool = True
) -> bytes:
    parts = [wire.status_line(head.status, head.reason)]
    listed = None  # a Connection header's value: the headers it names are hop-by-hop too
    for name, value in head.headers:
        lowered = name.lower()
        if lowered in wire.HOP_BY_HOP:
            if lowered == b"connection":
                listed = value if listed is None else listed + b"," + value
            elif lowered == b"trailer" and client_chunked:
                parts += (name, b": ", value, b"\r\n")  # announces trailers this client will get
            continue
        parts += (name, b": ", value, b"\r\n")
    if listed is not None and listed.lower() not in _CONNECTION_OPTIONS:
        named = wire.connection_tokens([(b"connection", listed)]) - _CONNECTION_OPTIONS
        if named:  # rare: go again without them
            parts = [parts[0]]
            for name, value in head.headers:
                lowered = name.lower()
                if lowered not in named and (
                    lowered not in wire.HOP_BY_HOP or (lowered == b"trailer" and client_chunked)
                ):
                    parts += (name, b": ", value, b"\r\n")
    if client_chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    if attempts > 1:
        parts.append(b"x-sidecar-attempts: %d\r\n" % attempts)
    if not keep_alive or not http11:
        parts.append(wire.connection_line(keep_alive, http11))
    parts.append(b"\r\n")
    return b"".join(parts)


_CONNECTION_OPTIONS = frozenset({b"keep-alive", b"close"})
