"""A throwaway PKI (trustme) and a real HTTPS upstream (aiohttp over TLS on 127.0.0.1) for the TLS tests."""

from __future__ import annotations

import contextlib
import datetime
import http.server
import json
import socketserver
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiohttp import web

from tests.support.sidecar import free_port


@dataclass
class Leaf:
    """A certificate and its key as files, the way an operator hands them to the sidecar."""

    cert_file: Path
    key_file: Path
    cert: trustme.LeafCert


def ca_file(ca: trustme.CA, path: Path) -> Path:
    ca.cert_pem.write_to_path(str(path))
    return path


def leaf(
    ca: trustme.CA,
    directory: Path,
    name: str,
    *identities: str,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Leaf:
    cert = ca.issue_cert(*identities, common_name=identities[0], not_before=not_before, not_after=not_after)
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    return Leaf(cert_file, key_file, cert)


def expired(ca: trustme.CA, directory: Path, *identities: str) -> Leaf:
    now = datetime.datetime.now(datetime.UTC)
    return leaf(
        ca,
        directory,
        "expired",
        *identities,
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )


def server_context(
    cert: Leaf, client_ca: trustme.CA | None = None, max_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    """What the upstream presents; with ``client_ca``, it requires a client certificate from that CA (mTLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert.cert_file), str(cert.key_file))
    ctx.set_alpn_protocols(["http/1.1"])
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        client_ca.configure_trust(ctx)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def client_context(ca: trustme.CA | None, client: Leaf | None = None) -> ssl.SSLContext:
    """The direct client the sidecar is compared with: the same trust and client certificate."""
    ctx = ssl.create_default_context()
    if ca is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # ca_file replaces the system store, as in the sidecar
        ca.configure_trust(ctx)
    if client is not None:
        ctx.load_cert_chain(str(client.cert_file), str(client.key_file))
    return ctx


@dataclass
class TlsUpstream:
    """An HTTPS server that echoes each request as JSON and records the TLS connections it accepted."""

    port: int
    connections: list[int] = field(default_factory=list)  # id of each new TLS connection, in order
    resumed: dict[int, bool] = field(default_factory=dict)  # connection id → did it resume a session
    peers: dict[int, str] = field(default_factory=dict)  # connection id → client certificate subject CN

    def url(self, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        ssl_object = transport.get_extra_info("ssl_object")
        key = id(transport)
        if key not in self.resumed:
            self.connections.append(key)
            self.resumed[key] = bool(ssl_object.session_reused)
            peer = ssl_object.getpeercert() or {}
            names = [value for rdn in peer.get("subject", ()) for (name, value) in rdn if name == "commonName"]
            self.peers[key] = names[0] if names else ""
        if request.path == "/health":
            return web.Response(text="healthy")
        body = await request.read()
        return web.Response(
            text=json.dumps(
                {
                    "method": request.method,
                    "path": request.path_qs,
                    "host": request.headers.get("Host", ""),
                    "body": body.decode("latin-1"),
                    "alpn": ssl_object.selected_alpn_protocol(),
                    "client": self.peers[key],
                }
            ),
            content_type="application/json",
        )


@contextlib.asynccontextmanager
async def tls_upstream(ctx: ssl.SSLContext, keepalive_timeout: float = 75.0) -> AsyncIterator[TlsUpstream]:
    upstream = TlsUpstream(port=free_port())
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=keepalive_timeout)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", upstream.port, ssl_context=ctx).start()
    try:
        yield upstream
    finally:
        await runner.cleanup()


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ThreadedTls

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        peer = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        names = [value for rdn in (peer or {}).get("subject", ()) for (name, value) in rdn if name == "commonName"]
        payload = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "body": body.decode("latin-1"),
                "client": names[0] if names else "",
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


class _ThreadedTls(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.refused: list[str] = []  # why each failed handshake failed, server side
        super().__init__(("127.0.0.1", port), _EchoHandler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake in the connection's own thread, by blocking OpenSSL: a refusal sends its alert, as
        # nginx, HAProxy or any OpenSSL server does (asyncio's server side just drops the connection).
        try:
            secure = self.ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.refused.append(str(exc))
            request.close()
            return
        super().finish_request(secure, client_address)


@contextlib.contextmanager
def threaded_tls_upstream(ctx: ssl.SSLContext) -> Iterator[_ThreadedTls]:
    """An HTTPS echo server on its own threads (blocking OpenSSL); ``server_port`` is its port."""
    server = _ThreadedTls(free_port(), ctx)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
