"""Socket set-up shared by every connection the sidecar makes or accepts."""

from __future__ import annotations

import asyncio
import socket


def set_no_delay(transport: asyncio.BaseTransport) -> None:
    """Send small writes at once (no Nagle): a proxy's answers are often one small write, waited for."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
