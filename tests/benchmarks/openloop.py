"""Open-loop HTTP/1.1 load sender: requests go out on a fixed schedule, whatever the server does.

Latency is counted from each request's *scheduled* send time, so a slow server cannot slow the sender down and
hide its own queueing (coordinated omission). Requests that find every connection busy wait in a backlog, and
that wait counts too. Results go into an HdrHistogram (microseconds); one JSON object is printed on stdout.

Why threads and not asyncio: asyncio timers (epoll and libuv alike) have millisecond resolution, which would
add up to 1 ms of send jitter, and busy-polling the loop instead makes the sender a CPU hog that the kernel
deschedules on a shared machine. A sender thread sleeping with ``time.sleep`` (clock_nanosleep, timer slack set
to 1 µs) wakes on time, and a receiver thread blocked in epoll records each answer as it lands.

    python tests/benchmarks/openloop.py --port 8080 --rate 1000 --duration 10
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import select
import socket
import sys
import threading
import time
from collections import deque

import httptools
from hdrh.histogram import HdrHistogram

PR_SET_TIMERSLACK = 29


def tighten_timer_slack() -> None:
    # Linux lets a sleeping thread oversleep by its timer slack (50 µs by default); 1 ns keeps wakeups exact.
    name = ctypes.util.find_library("c")
    if name and sys.platform.startswith("linux"):
        ctypes.CDLL(name, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)


class Conn:
    """One keep-alive connection with at most one request in flight (no pipelining)."""

    def __init__(self, sender: Sender) -> None:
        self.sender = sender
        self.sock = socket.create_connection((sender.host, sender.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.parser = httptools.HttpResponseParser(self)
        self.scheduled = 0.0  # scheduled time of the request in flight
        self.busy = False

    def send(self, scheduled: float) -> None:
        self.scheduled = scheduled
        self.busy = True
        self.sock.sendall(self.sender.request)

    def on_message_complete(self) -> None:
        self.busy = False
        self.sender.done(self, time.perf_counter() - self.scheduled, self.parser.get_status_code())


class Sender:
    def __init__(
        self, host: str, port: int, path: str, rate: float, duration: float, conns: int, warmup: float
    ) -> None:
        self.host, self.port = host, port
        self.request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: seawall-openloop\r\n\r\n".encode()
        self.rate, self.duration, self.nconns, self.warmup = rate, duration, conns, warmup
        self.hist = HdrHistogram(1, 60_000_000, 3)  # 1 µs .. 60 s, 3 significant digits
        self.lock = threading.Lock()  # guards idle, backlog and the counters across the two threads
        self.idle: deque[Conn] = deque()
        self.backlog: deque[float] = deque()  # scheduled times of requests waiting for a free connection
        self.by_fd: dict[int, Conn] = {}
        self.epoll = select.epoll()
        self.record_after = 0.0
        self.completed = self.non_2xx = self.lost_requests = self.reconnects = 0
        self.outstanding = 0
        self.max_send_lag = 0.0
        self.stop = threading.Event()

    def add_conn(self) -> Conn:
        conn = Conn(self)
        self.by_fd[conn.sock.fileno()] = conn
        self.epoll.register(conn.sock.fileno(), select.EPOLLIN)
        return conn

    def dispatch(self, scheduled: float) -> None:
        with self.lock:
            self.outstanding += 1
            if self.idle:
                self.idle.popleft().send(scheduled)
            else:
                self.backlog.append(scheduled)

    def done(self, conn: Conn, latency: float, status: int) -> None:
        # Called from the receiver thread with the lock held (see receive()).
        self.outstanding -= 1
        if conn.scheduled >= self.record_after:
            self.completed += 1
            self.hist.record_value(max(1, round(latency * 1e6)))
            if not 200 <= status < 300:
                self.non_2xx += 1
        if self.backlog:
            conn.send(self.backlog.popleft())
        else:
            self.idle.append(conn)

    def lost(self, conn: Conn) -> None:
        self.epoll.unregister(conn.sock.fileno())
        del self.by_fd[conn.sock.fileno()]
        conn.sock.close()
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.busy:  # the server dropped a request: count it and go on with a new connection
            self.outstanding -= 1
            self.lost_requests += 1
        self.reconnects += 1
        try:
            fresh = self.add_conn()
        except OSError:
            return
        if self.backlog:
            fresh.send(self.backlog.popleft())
        else:
            self.idle.append(fresh)

    def receive(self) -> None:
        while not self.stop.is_set():
            for fd, _ in self.epoll.poll(0.05):
                conn = self.by_fd.get(fd)
                if conn is None:
                    continue
                try:
                    data = conn.sock.recv(262144)
                except OSError:
                    data = b""
                with self.lock:
                    if not data:
                        self.lost(conn)
                        continue
                    try:
                        conn.parser.feed_data(data)
                    except httptools.HttpParserError:
                        self.lost(conn)

    def run(self) -> dict[str, object]:
        tighten_timer_slack()
        for _ in range(self.nconns):
            self.idle.append(self.add_conn())
        receiver = threading.Thread(target=self.receive, daemon=True)
        receiver.start()
        interval = 1.0 / self.rate
        total = int(self.rate * (self.warmup + self.duration))
        start = time.perf_counter() + 0.01
        self.record_after = start + self.warmup
        for i in range(total):
            scheduled = start + i * interval
            wait = scheduled - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            self.max_send_lag = max(self.max_send_lag, time.perf_counter() - scheduled)
            self.dispatch(scheduled)
        # Bounded drain: whatever has not answered 5 s after the last send is counted as unanswered.
        deadline = time.perf_counter() + 5.0
        while self.outstanding > 0 and time.perf_counter() < deadline:
            time.sleep(0.001)
        elapsed = time.perf_counter() - self.record_after
        self.stop.set()
        receiver.join(timeout=2)
        h = self.hist
        return {
            "rate": self.rate,
            "achieved_rps": round(self.completed / elapsed, 1) if elapsed > 0 else 0.0,
            "count": self.completed,
            "non_2xx": self.non_2xx,
            "unanswered": self.outstanding + self.lost_requests,
            "reconnects": self.reconnects,
            "max_send_lag_us": round(self.max_send_lag * 1e6, 1),
            "p50_us": h.get_value_at_percentile(50),
            "p90_us": h.get_value_at_percentile(90),
            "p99_us": h.get_value_at_percentile(99),
            "p999_us": h.get_value_at_percentile(99.9),
            "max_us": h.get_max_value(),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="recorded seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds sent but not recorded")
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    # Hand the GIL over quickly: the sender must not wait 5 ms for the receiver thread to let go of it.
    sys.setswitchinterval(0.0001)
    sender = Sender(args.host, args.port, args.path, args.rate, args.duration, args.connections, args.warmup)
    print(json.dumps(sender.run()))


if __name__ == "__main__":
    main()
