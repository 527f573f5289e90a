"""The sidecar's own Python cost per request, without sockets: a steady figure where wrk's is not.

On this machine two identical sidecar processes under wrk measure up to 7 % apart in CPU per request: about 40 %
of that CPU is the kernel's (loopback writes and reads, the wake-ups of wrk and the upstream on the other core),
and the kernel's share swings with whatever else runs. This drives the real protocol objects instead —
the listener's ``ClientConnection`` and a pooled ``UpstreamConnection``, each on a transport that only records —
through the request a wrk run makes, on the running (uv)loop, and times the process's CPU for it. What is left
is the Python the sidecar runs per request (parsing callbacks, admission, the exchange, heads, settling), with
no system call: it tells a few per cent apart, which the wrk figures cannot here.

    python tests/benchmarks/hot_path.py                       # the shipped default policy, with and without
                                                              # a local rate limit (never reached)
    python tests/benchmarks/hot_path.py --requests 50000 --rounds 9

Variants run interleaved, the order reversing each round; the report gives each one's median µs per request,
its spread, and its ratio to the first variant taken within each round.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import cast

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from proxy.http.listener import ClientConnection
from proxy.policy.loader import load_text
from proxy.resilience.clock import SystemClock
from proxy.runtime import UpstreamRuntime
from proxy.sockets import Drainable
from proxy.upstream.connection import UpstreamConnection
from tests.benchmarks.bench import RATE_LIMIT_LOCAL, sidecar_policy

UPSTREAM_PORT = 18081
# What wrk sends, and what the benchmark's nginx answers (12 bytes of body, its usual headers).
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:18080\r\n\r\n"
ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 02 Dec 2026 17:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\nhello world\n"
)
VARIANTS = {"sidecar": "", "sidecar-ratelimit": RATE_LIMIT_LOCAL}


class Recorder:
    """A transport that keeps only the last write: all a protocol needs of one, at no cost worth measuring."""

    def __init__(self) -> None:
        self.last = b""
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.last = data
        self.writes += 1

    def writelines(self, chunks: list[bytes]) -> None:
        self.write(b"".join(chunks))

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def is_reading(self) -> bool:
        return True

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...

    def get_write_buffer_size(self) -> int:
        return 0


class Pair:
    """One client connection of a variant's sidecar and the pooled upstream connection its requests go out on."""

    def __init__(self, extra: str) -> None:
        config, issues = load_text(sidecar_policy(18080, 18090, UPSTREAM_PORT, extra=extra))
        assert config is not None, issues
        self.rt = UpstreamRuntime(config.upstreams[0], SystemClock())
        self.client_side, self.upstream_side = Recorder(), Recorder()
        self.client = ClientConnection(lambda: self.rt, config.http, set[Drainable](), False, SystemClock())
        self.client.connection_made(cast(asyncio.Transport, self.client_side))
        pool = self.rt.balancer.states[0].pool
        self.upstream = UpstreamConnection(pool, pool.max_head_bytes, SystemClock())
        self.upstream.connection_made(cast(asyncio.Transport, self.upstream_side))
        pool.release(self.upstream)

    async def serve(self, count: int) -> float:
        """CPU seconds for ``count`` requests, each answered before the next is sent (as one wrk connection)."""
        client, upstream, up_side, client_side = self.client, self.upstream, self.upstream_side, self.client_side
        gc.collect()
        started = time.process_time()
        for _ in range(count):
            sent = up_side.writes
            client.data_received(REQUEST)
            while up_side.writes == sent:  # a revision that serves in a task: let it run
                await asyncio.sleep(0)
            answered = client_side.writes
            upstream.data_received(ANSWER)
            while client_side.writes == answered:
                await asyncio.sleep(0)
        spent = time.process_time() - started
        if not client_side.last.startswith(b"HTTP/1.1 200 ") or not client_side.last.endswith(b"hello world\n"):
            raise RuntimeError(f"unexpected answer: {client_side.last[:200]!r}")
        return spent


async def measure(keys: list[str], requests: int, rounds: int) -> dict[str, list[float]]:
    pairs = {key: Pair(VARIANTS[key]) for key in keys}
    for pair in pairs.values():
        await pair.serve(min(requests, 2000))  # warm: caches, the breaker's window, the allocator
    seen: dict[str, list[float]] = {key: [] for key in keys}
    for i in range(rounds):
        for key in keys if i % 2 == 0 else reversed(keys):
            seen[key].append(await pairs[key].serve(requests) / requests * 1e6)
    return seen


def report(keys: list[str], seen: dict[str, list[float]]) -> str:
    first = seen[keys[0]]
    lines = ["| variant | median µs / request | spread | ÷ first (median, spread) |", "|---|--:|--:|--:|"]
    for key in keys:
        rows = seen[key]
        ratios = [row / f for row, f in zip(rows, first, strict=True)]
        lines.append(
            f"| {key} | {statistics.median(rows):.2f} | {min(rows):.2f} – {max(rows):.2f} "
            f"| {statistics.median(ratios):.3f} ({min(ratios):.3f} – {max(ratios):.3f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="sidecar,sidecar-ratelimit", help=f"a subset of {','.join(VARIANTS)}")
    parser.add_argument("--requests", type=int, default=20000, help="requests per variant per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    if unknown := set(keys) - set(VARIANTS):
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    seen = uvloop.run(measure(keys, args.requests, args.rounds))
    print(f"\n{args.rounds} rounds × {args.requests:,} requests, no sockets (the sidecar's Python only)\n")
    print(report(keys, seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
