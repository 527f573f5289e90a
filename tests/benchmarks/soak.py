"""Soak: a real sidecar for a bounded time at ~70% of its measured max throughput, with faults injected.

    python tests/benchmarks/soak.py                 # 10 minutes
    python tests/benchmarks/soak.py --minutes 2.5   # a shorter run

Layout (all on 127.0.0.1): load generator → sidecar (``python -m proxy run``, a subprocess) → fault proxy
(``tests/support/faults.py``) → a small keep-alive upstream. The generator, fault proxy and upstream share this
process's event loop.

1. Calibrate: closed loop, no faults, for a few seconds → max requests/s through the whole chain.
2. Soak: open loop at ``--load`` (0.7) of that rate, with faults on the upstream side: latency with jitter,
   slicing, and rare resets before the answer and in the middle of the body; every 2 s all upstream-side
   connections are reset, so pooled connections go stale and fresh ones roll the toxics' dice again.
3. Every ``--sample`` seconds: the sidecar's RSS and open file descriptors (``/proc/PID``) and its in-flight
   gauge. The asyncio task count is not exposed by the sidecar (no endpoint), so it is not measured: RSS and FDs
   stand in for leaks of tasks and connections.
4. At the end: every request the generator got an answer to must be counted in ``sidecar_requests_total``.

Prints a table of samples and a verdict; exits non-zero if RSS grows by more than ``--rss-slack`` MiB after
warm-up, FDs do not return to their idle count, or the request counts differ.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import httptools

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.support.faults import FaultProxy, Latency, ResetPeer, Slicer  # noqa: E402
from tests.support.sidecar import free_port, policy_listen, sidecar_process, write_policy  # noqa: E402

BODY = b"x" * 2048
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\ncontent-type: text/plain\r\n\r\n%b" % (len(BODY), BODY)


class Upstream(asyncio.Protocol):
    """Answers every request with a fixed 2 KiB body, keep-alive."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()  # type: ignore[attr-defined]

    def on_message_complete(self) -> None:
        self.transport.write(RESPONSE)  # type: ignore[attr-defined]


class Client:
    """One keep-alive connection of the generator; reconnects after the sidecar closes or cuts a response."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.busy = False
        self._status = 0
        self._done = False
        self._keep = True

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._keep = bool(self._parser.should_keep_alive())

    def on_message_complete(self) -> None:
        self._done = True

    async def request(self) -> tuple[int, bool]:
        """(status or 0 if no answer came, whether the body was complete)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self._parser = httptools.HttpResponseParser(self)
        self._status, self._done, self._keep = 0, False, True
        self.writer.write(b"GET /soak HTTP/1.1\r\nHost: soak\r\n\r\n")
        try:
            async with asyncio.timeout(30):
                while not self._done:
                    data = await self.reader.read(65536)
                    if not data:
                        break
                    self._parser.feed_data(data)
        except (OSError, httptools.HttpParserError, TimeoutError):
            pass
        if not (self._done and self._keep):
            self.writer.close()
            self.writer = self.reader = None
        return self._status, self._done


def proc_sample(pid: int) -> tuple[float, int]:
    rss_kib = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def scrape(admin: str) -> str:
    with urllib.request.urlopen(admin + "/metrics", timeout=5) as response:
        return response.read().decode()


def metric_sum(text: str, name: str) -> float:
    return sum(
        float(m.group(1))
        for m in re.finditer(rf"^{name}\{{[^}}]*upstream=\"soak\"[^}}]*\}} (\S+)$", text, re.MULTILINE)
    )


async def closed_loop(port: int, connections: int, seconds: float) -> float:
    clients = [Client(port) for _ in range(connections)]
    done = 0
    until = time.monotonic() + seconds

    async def run(client: Client) -> None:
        nonlocal done
        while time.monotonic() < until:
            await client.request()
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(run(c) for c in clients))
    return done / (time.monotonic() - started)


async def open_loop(port: int, rate: float, seconds: float, connections: int, counts: dict[str, int]) -> None:
    """Issue ``rate`` requests/s on free connections; when none is free, the send is counted as skipped."""
    clients = [Client(port) for _ in range(connections)]
    tasks: set[asyncio.Task[None]] = set()

    async def one(client: Client) -> None:
        client.busy = True
        try:
            status, complete = await client.request()
        finally:
            client.busy = False
        key = "no_answer" if status == 0 else ("truncated" if not complete else str(status))
        counts[key] = counts.get(key, 0) + 1

    tick = 0.005
    started = time.monotonic()
    issued = 0
    while (elapsed := time.monotonic() - started) < seconds:
        due = int(elapsed * rate) - issued
        free = [c for c in clients if not c.busy]
        for client in free[:due]:
            task = asyncio.create_task(one(client))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        counts["skipped"] = counts.get("skipped", 0) + max(0, due - len(free))
        issued += due
        await asyncio.sleep(tick)
    if tasks:
        await asyncio.wait(tasks, timeout=60)


async def main(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    upstream_port = free_port()
    server = await loop.create_server(Upstream, "127.0.0.1", upstream_port)
    faults = FaultProxy("127.0.0.1", upstream_port, seed=1)
    await faults.enable()
    tmp = Path(tempfile.mkdtemp(prefix="seawall-soak-"))
    policy = write_policy(
        tmp / "soak.yaml",
        {"soak": {"targets": [faults.url]}},
        defaults={
            "timeouts": {"connect": "1s", "per_try": "2s", "total": "5s"},
            "breaker": {"failure_threshold": 1000, "window": "10s", "open_duration": "1s"},
            "retry": {"max_retries": 1, "base_delay": "10ms", "max_delay": "50ms", "jitter": True},
            "limits": {"max_concurrent": 1024, "max_pending": 1024},
        },
    )
    _, port = policy_listen(policy, "soak")
    try:
        with sidecar_process(policy) as sidecar:
            pid = sidecar.proc.pid
            max_rps = await closed_loop(port, args.connections, args.calibrate)
            rate = max_rps * args.load
            print(
                f"calibration: max {max_rps:.0f} req/s through the chain; soaking at {rate:.0f} req/s "
                f"({args.load:.0%}) for {args.minutes:g} min with faults",
                flush=True,
            )
            before = metric_sum(scrape(sidecar.admin), "sidecar_requests_total")
            for toxic in (
                Latency(latency=0.002, jitter=0.002, probability=0.2),
                Slicer(average_size=512, size_variation=256, probability=0.05),
                ResetPeer(probability=0.002),  # before the status line
                ResetPeer(after=1024, probability=0.002),
            ):  # in the middle of the (first) body
                faults.add(toxic)
            counts: dict[str, int] = {}
            samples: list[tuple[float, float, int, float]] = []
            soak = asyncio.create_task(open_loop(port, rate, args.minutes * 60, 2 * args.connections, counts))
            started = time.monotonic()
            print(f"{'t (s)':>7} {'RSS MiB':>8} {'FDs':>5} {'inflight':>8} {'answered':>9}", flush=True)
            next_sample = started + args.sample
            while not soak.done():
                # Toxics are rolled per connection and the sidecar pools its connections: reset them all every
                # couple of seconds so fresh connections roll again (the resets are faults in their own right).
                await asyncio.wait({soak}, timeout=2.0)
                faults.reset_all()
                if time.monotonic() < next_sample and not soak.done():
                    continue
                next_sample += args.sample
                text = await asyncio.to_thread(scrape, sidecar.admin)
                rss, fds = proc_sample(pid)
                inflight = metric_sum(text, "sidecar_inflight_requests")
                samples.append((time.monotonic() - started, rss, fds, inflight))
                answered = sum(v for k, v in counts.items() if k not in ("skipped", "no_answer"))
                print(f"{samples[-1][0]:7.0f} {rss:8.1f} {fds:5d} {inflight:8.0f} {answered:9d}", flush=True)
            faults.clear()
            await asyncio.sleep(1.0)  # let cut connections close
            text = await asyncio.to_thread(scrape, sidecar.admin)
            idle_rss, idle_fds = proc_sample(pid)
            counted = metric_sum(text, "sidecar_requests_total") - before
    finally:
        await faults.stop()
        server.close()

    answered = sum(v for k, v in counts.items() if k not in ("skipped", "no_answer"))
    warm = [s for s in samples if s[0] >= min(60.0, samples[-1][0] / 3)] or samples
    rss_growth = max(s[1] for s in warm) - warm[0][1]
    fds_start = samples[0][2]
    print(f"\nrequests answered: {answered} ({counts}); counted in sidecar_requests_total: {counted:.0f}")
    print(
        f"RSS after warm-up {warm[0][1]:.1f} MiB, max {max(s[1] for s in warm):.1f}, idle end {idle_rss:.1f} "
        f"(growth {rss_growth:+.1f} MiB); FDs first sample {fds_start}, max {max(s[2] for s in samples)}, "
        f"idle end {idle_fds}; inflight at end {metric_sum(text, 'sidecar_inflight_requests'):.0f}"
    )
    print("asyncio task count: not measured (the sidecar exposes no endpoint for it)")
    ok = True
    if counted != answered:
        print("FAIL: requests answered and requests counted differ")
        ok = False
    if rss_growth > args.rss_slack:
        print(f"FAIL: RSS grew {rss_growth:.1f} MiB after warm-up (slack {args.rss_slack} MiB)")
        ok = False
    if idle_fds > fds_start + 5:
        print(f"FAIL: {idle_fds} FDs open at idle vs {fds_start} at the first sample")
        ok = False
    print("verdict:", "flat and fully accounted" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.7, help="share of the calibrated max rate")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--calibrate", type=float, default=5.0, help="seconds of closed-loop calibration")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--rss-slack", type=float, default=8.0, help="MiB of RSS growth tolerated after warm-up")
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    sys.exit(asyncio.run(main(parser.parse_args())))
