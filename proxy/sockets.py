"""What every connection the sidecar makes or accepts shares: socket set-up, and how a server drains it."""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol


def set_no_delay(transport: asyncio.BaseTransport) -> None:
    """Send small writes at once (no Nagle): a proxy's answers are often one small write, waited for."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Drainable(Protocol):
    """An accepted connection, as a draining server sees it."""

    def shutdown_when_idle(self) -> None:
        """Close after the answer in flight (now, if there is none)."""

    def close(self) -> None:
        """Close now, whatever is in flight: the drain ran out of time."""
