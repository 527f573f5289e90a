"""HTTP/2 on a listener that forwards HTTP/1.1 only: refused the way HTTP/2 refuses, not with an HTTP/1.1 400.

A client that opens with HTTP/2's preface (h2c prior knowledge) on an ``http`` upstream's listener gets an empty
SETTINGS frame and a GOAWAY with ``HTTP_1_1_REQUIRED`` (RFC 9113 §7), which clients report as such ("use
HTTP/1.1"), and one log line says why. ``protocol: grpc`` upstreams serve HTTP/2 instead (``proxy.grpc``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from hyperframe.frame import GoAwayFrame, SettingsFrame

if TYPE_CHECKING:
    from proxy.sockets import Drainable

log = logging.getLogger("seawall.listener")

HTTP_1_1_REQUIRED = 0xD


def goaway_http11_required() -> bytes:
    goaway = GoAwayFrame(0)
    goaway.last_stream_id = 0
    goaway.error_code = HTTP_1_1_REQUIRED
    goaway.additional_data = b"this listener forwards HTTP/1.1 (protocol: http)"
    return SettingsFrame(0).serialize() + goaway.serialize()


_REFUSAL = goaway_http11_required()


def refuse_http2(transport: asyncio.Transport, received: bytes, connections: set[Drainable]) -> None:
    """The listener's handoff for upstreams that do not speak HTTP/2: say so in HTTP/2, then close."""
    peer = transport.get_extra_info("peername")
    log.warning(
        "HTTP/2 connection refused from %s: this upstream's listener forwards HTTP/1.1 (set protocol: grpc to "
        "serve gRPC)",
        peer[0] if isinstance(peer, tuple) else "unknown",
        extra={"event": "http2_refused"},
    )
    transport.write(_REFUSAL)
    transport.close()
