"""A byte relay between two connected sockets that keeps bulk bytes in the kernel: Linux ``splice(2)`` through
one pipe per direction, driven by the event loop's readiness callbacks (``add_reader`` / ``add_writer``, which
asyncio's loop and uvloop both offer).

    a ──splice──▶ pipe ──splice──▶ b        b ──splice──▶ pipe ──splice──▶ a

Small reads (request/response traffic) are copied through Python instead, where that is cheaper (see
``COPY_SIZE``); a direction makes its pipe at its first large read, and without one (out of file descriptors)
it keeps copying. A direction reads only when everything it read before has been sent, so at most one pipe's
worth of bytes (``PIPE_SIZE``) is held per direction: while the receiver is slow its socket stays full, the
pipe stays full, the sender's socket is not read, and the back-pressure reaches the sender through its own TCP
window. EOF from one side becomes ``shutdown(SHUT_WR)`` on the other once everything read is sent (half-close);
when both directions have finished, or either side fails (a reset, a broken pipe), both sockets are closed.

Bytes the caller already read from a side (before it handed the socket over) are sent first.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import sys
from collections.abc import Callable

# Python >= 3.10 on Linux; anything else uses the protocol-based relay.
AVAILABLE = sys.platform == "linux" and hasattr(os, "splice")

# Bytes held per direction: large enough that a bulk stream needs few system calls per MiB, small enough that
# thousands of relays stay cheap (the kernel allocates pipe pages only as they fill). 1 MiB is the default
# ``fs.pipe-max-size``; a smaller limit (or the per-user pipe budget) just leaves the pipe smaller.
PIPE_SIZE = 1 << 20

_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

# Splicing costs more than copying for small reads (page references, the pipe; about 0.5 µs of 10 for a 64-byte
# message on loopback) and less from about 16 KiB up. So a direction copies while its reads are small and
# splices once a read fills the copy buffer; a spliced read below COPY_BELOW makes the next one a copy again.
COPY_SIZE = 64 * 1024
COPY_BELOW = 16 * 1024


class _Direction:
    """src → pipe → dst, one way."""

    def __init__(self, relay: SpliceRelay, src: socket.socket, dst: socket.socket, early: bytes, eof: bool) -> None:
        self.relay = relay
        self.src, self.dst = src.fileno(), dst.fileno()
        self.src_sock, self.dst_sock = src, dst
        self.pending: bytes | memoryview = early  # read (before the hand-over, or copied), not yet sent
        self.copying = True  # how the next read goes: small reads are copied, large ones spliced
        self.src_eof = eof
        self.in_pipe = 0
        self.spliced = 0  # bytes moved by splice (the rest were copied)
        self.reading = False
        self.waiting = False  # for dst to become writable
        self.done = False
        # The pipe is made at the first large read: request/response traffic never needs one.
        self.pipe_r = self.pipe_w = -1
        self.size = 0
        self.can_splice = True

    def _pipe(self) -> bool:
        """Whether this direction has its pipe (made now if need be); without one it keeps copying."""
        if self.pipe_w >= 0 or not self.can_splice:
            return self.can_splice
        try:
            self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # out of file descriptors: copying still works
            self.can_splice = False
            return False
        with contextlib.suppress(OSError):  # over the (per-user) limit: the pipe keeps its default size
            fcntl.fcntl(self.pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.size = fcntl.fcntl(self.pipe_w, fcntl.F_GETPIPE_SZ)
        if self.size < COPY_SIZE:
            # Past the per-user pipe budget (fs.pipe-user-pages-soft) new pipes get two pages: copying is better.
            self._close_pipe()
            self.can_splice = False
        return self.can_splice

    def start(self) -> None:
        self._drain()

    def buffered(self) -> int:
        return self.in_pipe + len(self.pending)

    def on_readable(self) -> None:
        if self.copying:
            self._copy()
            return
        try:
            n = os.splice(self.src, self.pipe_w, self.size, flags=_FLAGS)
        except BlockingIOError:
            return  # a wake-up with nothing to read
        except OSError as exc:
            self.relay.fail(exc)
            return
        self.in_pipe += n
        self.spliced += n
        self.copying = n < COPY_BELOW
        if n == 0:
            self.src_eof = True
            self._stop_reading()
        self._drain()

    def _copy(self) -> None:
        """One read through Python; most often (request/response traffic) sent on at once, whole."""
        try:
            data = self.src_sock.recv(COPY_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self.relay.fail(exc)
            return
        n = len(data)
        if 0 < n < COPY_SIZE:
            try:
                sent = self.dst_sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.relay.fail(exc)
                return
            if sent == n:
                return
            self.pending = memoryview(data)[sent:]
        else:
            self.pending = data
            self.copying = n < COPY_SIZE or not self._pipe()  # a full buffer: a bulk flow, splice it
            if n == 0:
                self.src_eof = True
                self._stop_reading()
        self._drain()

    def on_writable(self) -> None:
        self._drain()

    def _drain(self) -> None:
        """Send what is held; then read again, or pass the EOF on."""
        try:
            while self.pending:
                sent = self.dst_sock.send(self.pending)
                self.pending = memoryview(self.pending)[sent:] if sent < len(self.pending) else b""
            while self.in_pipe:
                self.in_pipe -= os.splice(self.pipe_r, self.dst, self.in_pipe, flags=_FLAGS)
        except BlockingIOError:
            # dst is full: hold src (its bytes stay in its socket) until dst takes more.
            self._stop_reading()
            if not self.waiting:
                self.waiting = True
                self.relay.loop.add_writer(self.dst, self.on_writable)
            return
        except OSError as exc:
            self.relay.fail(exc)
            return
        if self.waiting:
            self.waiting = False
            self.relay.loop.remove_writer(self.dst)
        if self.src_eof:
            self._finish()
        elif not self.reading:
            self.reading = True
            self.relay.loop.add_reader(self.src, self.on_readable)

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.relay.loop.remove_reader(self.src)

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            self.dst_sock.shutdown(socket.SHUT_WR)
        except OSError as exc:  # dst is gone already
            self.relay.fail(exc)
            return
        self.relay.direction_done()

    def flush_once(self) -> None:
        """A last, non-blocking attempt to deliver what is held (the other side failed)."""
        with contextlib.suppress(OSError):
            if self.pending:
                self.dst_sock.send(self.pending)
            elif self.in_pipe:
                os.splice(self.pipe_r, self.dst, self.in_pipe, flags=_FLAGS)

    def stop(self) -> None:
        self._stop_reading()
        if self.waiting:
            self.waiting = False
            self.relay.loop.remove_writer(self.dst)
        self._close_pipe()

    def _close_pipe(self) -> None:
        if self.pipe_w >= 0:
            os.close(self.pipe_r)
            os.close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1


class SpliceRelay:
    """Relays between ``a`` and ``b`` until both directions end or one side fails; owns both sockets from
    ``start`` on, and calls ``on_close`` once, after closing them."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        a: socket.socket,
        b: socket.socket,
        on_close: Callable[[], None],
        early_a: bytes = b"",
        a_eof: bool = False,
    ) -> None:
        self.loop = loop
        self.a, self.b = a, b
        self._on_close = on_close
        self.closed = False
        self.error: OSError | None = None
        self._directions = (_Direction(self, a, b, early_a, a_eof), _Direction(self, b, a, b"", False))

    def start(self) -> None:
        for direction in self._directions:
            if not self.closed:
                direction.start()

    def buffered(self) -> int:
        """Bytes read from one side and not yet sent to the other."""
        return sum(d.buffered() for d in self._directions)

    def spliced(self) -> int:
        """Bytes moved by splice so far, both ways (small reads are copied)."""
        return sum(d.spliced for d in self._directions)

    def direction_done(self) -> None:
        if all(d.done for d in self._directions):
            self.close()

    def fail(self, exc: OSError) -> None:
        if self.closed:
            return
        self.error = exc
        for direction in self._directions:
            direction.flush_once()
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for direction in self._directions:
            direction.stop()
        self.a.close()
        self.b.close()
        self._on_close()
