"""A client's request head, judged: what llhttp lets through but a proxy must still refuse.

llhttp (strict mode) already refuses Content-Length with Transfer-Encoding, duplicate or malformed lengths, bad
chunk sizes, CR/LF/NUL in header values and whitespace before the colon. ``validate_head`` adds what a proxy
must refuse on top: a Transfer-Encoding other than exactly ``chunked``, Transfer-Encoding on HTTP/1.0, several
or (HTTP/1.1) no Host headers, ``CONNECT``, and request targets other than origin-form — absolute-form is
reduced to its path, so only the listener ever picks the destination.

Pure: bytes in, a ``Request`` or a ``RequestRejected`` out. The socket protocol (``proxy.http.listener``)
feeds it and turns a rejection into a 4xx answer and a closed connection.
"""

from __future__ import annotations

import httptools

from proxy.http import wire
from proxy.http.body import RequestBody


class RequestRejected(Exception):
    """A request the sidecar answers itself with a 4xx and closes the connection on."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class Request:
    __slots__ = (
        "body",
        "chunked",
        "client_ip",
        "connection_tokens",
        "content_length",
        "expect_continue",
        "headers",
        "host",
        "http11",
        "keep_alive",
        "method",
        "method_bytes",
        "path",
        "upgrade",
    )

    def __init__(
        self,
        method_bytes: bytes,
        path: bytes,
        headers: wire.Headers,
        client_ip: bytes,
        http11: bool = True,
        keep_alive: bool = True,
    ) -> None:
        self.method_bytes = method_bytes
        self.method = method_bytes.decode("ascii")
        self.path = path
        self.headers = headers
        self.client_ip = client_ip
        self.http11 = http11
        self.keep_alive = keep_alive  # what the client asked for; the answer may still close
        self.body: RequestBody | None = None
        self.host: bytes | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.connection_tokens: frozenset[bytes] = frozenset()
        self.upgrade: bytes | None = None  # the protocols an upgrade request forwards (see ``upgrade_protocols``)

    @property
    def has_body(self) -> bool:
        return self.chunked or (self.content_length or 0) > 0


CONNECT_REFUSED = "CONNECT is not served: a listener only forwards to its own targets"


def origin_form(url: bytes) -> bytes:
    """The request target as a path: absolute-form never chooses the destination, only its path is kept."""
    if url[:1] == b"/" or url == b"*":
        return url
    if url[:8].lower().startswith((b"http://", b"https://")):
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError as exc:
            raise RequestRejected(400, "malformed request target") from exc
        if parsed.userinfo:
            raise RequestRejected(400, "userinfo in the request target")
        path = parsed.path or b"/"
        return path + (b"?" + parsed.query if parsed.query else b"")
    raise RequestRejected(400, "request target must be a path")


def is_http09(data: bytes, parser: httptools.HttpRequestParser) -> bool:
    """A head left waiting after a request line with no version (``GET /``): llhttp would wait for headers that
    HTTP/0.9 never sends; HAProxy answers 400 at once. Looked at only when a head is left incomplete."""
    if not data.endswith(b"\n") or parser.get_http_version() != "0.0":
        return False
    start = data.rfind(b"\n", 0, len(data) - 1) + 1
    return data.count(b" ", start) == 1


def validate_head(
    method: bytes, url: bytes, headers: wire.Headers, http11: bool, keep_alive: bool, client_ip: bytes
) -> Request:
    """The request this head describes, or ``RequestRejected`` saying why it must not be forwarded."""
    if method == b"CONNECT":
        raise RequestRejected(405, CONNECT_REFUSED)
    req = Request(method, origin_form(url), headers, client_ip, http11, keep_alive)
    hosts = 0
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"host":
            hosts += 1
            req.host = value
        elif lowered == b"content-length":
            req.content_length = int(value)  # llhttp has validated it is digits, and the only one
        elif lowered == b"transfer-encoding":
            if value.strip().lower() != b"chunked" or req.chunked:
                raise RequestRejected(400, "Transfer-Encoding other than a single 'chunked'")
            if not http11:
                raise RequestRejected(400, "Transfer-Encoding in an HTTP/1.0 request")
            req.chunked = True
        elif lowered == b"connection":
            req.connection_tokens = wire.connection_tokens([(name, value)]) | req.connection_tokens
        elif lowered == b"expect" and value.strip().lower() == b"100-continue":
            req.expect_continue = http11
    if hosts > 1:
        raise RequestRejected(400, "several Host headers")
    if hosts == 0 and http11:
        raise RequestRejected(400, "missing Host header")
    return req


def mark_upgrade(req: Request) -> bool:
    """A request llhttp takes for an upgrade (``Connection: upgrade`` and ``Upgrade``): True if it is forwarded as
    one (``req.upgrade``: the protocols to ask for), False to serve it as the plain HTTP/1.1 request it also is,
    with Upgrade dropped, as nginx does.

    Only a bodiless HTTP/1.1 GET is upgraded (RFC 6455 §4.1; RFC 9110 §7.8: Upgrade is ignored in HTTP/1.0), and
    never to ``h2c``. A body cannot be read at all: llhttp stops at the end of the head of an upgrade request, so
    the body would be taken for the next request — refused instead, never forwarded. An upgrade request is the
    last one read on its connection: after a 101 the connection is a relay, after any other answer it closes
    (bytes sent past the head are relayed, or dropped, never parsed as a request).
    """
    if req.has_body:
        raise RequestRejected(400, "a request with both Upgrade and a body is not served")
    if not req.http11 or req.method != "GET":
        return False
    tokens = [
        token
        for name, value in req.headers
        if name.lower() == b"upgrade"
        for token in (t.strip() for t in value.split(b","))
        if token and token.lower() != b"h2c"
    ]
    if not tokens:
        return False
    req.upgrade = b", ".join(tokens)
    req.keep_alive = False
    return True
