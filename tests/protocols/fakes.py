"""A transport without a socket, for driving asyncio protocols from tests."""

from __future__ import annotations

import asyncio
from typing import cast


class FakeTransport:
    """What an asyncio transport offers the protocol, recorded. Writes pile up in a send buffer until the test
    plays the client reading them (``client_reads``); above ``high_water`` the protocol is told to pause."""

    def __init__(self, high_water: int = 1 << 16) -> None:
        self.protocol: asyncio.BaseProtocol | None = None
        self.written = bytearray()  # everything written, in order
        self.buffered = 0  # written and not yet read by the client
        self.high_water = high_water
        self.writing_paused = False
        self.reading = True
        self.closed = self.aborted = self.eof = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("10.1.2.3", 40000) if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.is_closing(), "written after close"
        self.written += data
        self.buffered += len(data)
        if not self.writing_paused and self.buffered > self.high_water:
            self.writing_paused = True
            cast(asyncio.Protocol, self.protocol).pause_writing()

    def writelines(self, chunks: list[bytes] | tuple[bytes, ...]) -> None:
        for data in chunks:
            self.write(data)

    def client_reads(self) -> None:
        """The client reads all it was sent: the buffer empties and the protocol may write again."""
        self.buffered = 0
        if self.writing_paused:
            self.writing_paused = False
            cast(asyncio.Protocol, self.protocol).resume_writing()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol | None:
        return self.protocol
