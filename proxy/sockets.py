"""What every connection the sidecar makes or accepts shares: socket set-up, and how a server drains it."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Protocol


def set_no_delay(transport: asyncio.BaseTransport) -> None:
    """Send small writes at once (no Nagle): a proxy's answers are often one small write, waited for."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def dial(host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket (no transport yet), trying each address ``host`` resolves to in turn,
    as ``loop.create_connection`` does."""
    loop = asyncio.get_running_loop()
    infos = _numeric(host, port) or await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError = OSError(f"{host}:{port} resolved to no address")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:  # a timeout or a cancellation: nothing may stay open
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise last


def _numeric(host: str, port: int) -> list[tuple[int, int, int, str, tuple[str, int]]]:
    """An IP address needs no resolver (asyncio's ``getaddrinfo`` would take a trip through a thread)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    return []


def take_socket(transport: asyncio.BaseTransport) -> socket.socket:
    """A socket of its own on ``transport``'s connection (a duplicate descriptor): it stays open when the
    transport closes its own. Stop the transport reading first; close it after."""
    fd = transport.get_extra_info("socket").fileno()
    return socket.socket(fileno=os.dup(fd))


class Drainable(Protocol):
    """An accepted connection, as a draining server sees it."""

    def shutdown_when_idle(self) -> None:
        """Close after the answer in flight (now, if there is none)."""

    def close(self) -> None:
        """Close now, whatever is in flight: the drain ran out of time."""
