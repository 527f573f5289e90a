"""Admin-plane latency while a proxy listener is saturated: real subprocesses, bounded load.

A real ``sidecar run`` in front of an nginx upstream, ``wrk`` (or a bounded Python load loop where wrk is missing)
keeping 64 keep-alive connections busy on its listener, and /health and /metrics requested meanwhile on fresh
connections, as a probe or a scraper makes them. Used by the suite (tests/admin/test_saturation.py: the admin
plane answers while saturated, a generous bound) and by the benchmark (tests/benchmarks/admin_saturation.py:
the p95 figure against its 50 ms budget).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.servers import nginx_upstream
from tests.support.sidecar import free_port, sidecar_process, write_policy

CONNECTIONS = 64

# A bounded keep-alive load loop for machines without wrk: CONNECTIONS clients, for LOAD_SECONDS, then exit.
PY_LOAD = r"""
import asyncio, sys, time
host, port, conns, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
REQ = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"
async def client(stop, counts):
    reader, writer = await asyncio.open_connection(host, port)
    while time.monotonic() < stop:
        writer.write(REQ)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        counts[0] += 1
    writer.close()
async def main():
    counts = [0]
    stop = time.monotonic() + seconds
    await asyncio.gather(*(client(stop, counts) for _ in range(conns)), return_exceptions=True)
    print(f"Requests/sec: {counts[0] / seconds:.0f}")
asyncio.run(main())
"""


def timed_get(host: str, port: int, path: str, timeout: float = 2.0) -> tuple[float, bytes]:
    """One admin request on a fresh connection, as a probe or scraper makes it; milliseconds to the last byte."""
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: {host}:{port}\r\nconnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return (time.perf_counter() - started) * 1000, b"".join(chunks)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Saturation:
    """What one run saw: admin latencies (ms) per path, the answers' status lines, the load's throughput."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {"/health": [], "/metrics": []})
    statuses: list[bytes] = field(default_factory=list)
    cached: int = 0
    rps: float = 0.0
    cpu_share: float = 0.0
    load_output: str = ""
    load_outlasted_sampling: bool = False

    def p(self, path: str, quantile: float) -> float:
        samples = sorted(self.latencies[path])
        return samples[max(0, int(len(samples) * quantile) - 1)]

    def report(self) -> str:
        return (
            f"admin latency under load ({self.rps:.0f} rps through the listener, sidecar CPU {self.cpu_share:.0%}, "
            f"{self.cached} cached reports): "
            + ", ".join(
                f"{path} max {max(v):.1f} ms p50 {self.p(path, 0.5):.1f} ms p95 {self.p(path, 0.95):.1f} ms"
                for path, v in self.latencies.items()
            )
        )


def saturate(tmp: Path, samples: int = 20, load_seconds: float = 6.0, admin_timeout: float = 2.0) -> Saturation:
    """Saturate a sidecar's listener for ``load_seconds`` and take up to ``samples`` admin requests of each path
    while it lasts (``load_outlasted_sampling`` says whether all of them were taken under load)."""
    admin_port, listen_port = free_port(), free_port()
    result = Saturation()
    with nginx_upstream(tmp) as upstream:
        policy = write_policy(
            tmp / "p.yaml",
            {
                "fast": {
                    "listen": f"127.0.0.1:{listen_port}",
                    "targets": [upstream],
                    "health": {"path": "/", "interval": "1s", "timeout": "1s"},
                },
            },
            admin_port=admin_port,
        )
        with sidecar_process(policy) as sidecar:
            wrk = shutil.which("wrk")
            command = (
                [wrk, "-t1", f"-c{CONNECTIONS}", f"-d{load_seconds:g}s", f"http://127.0.0.1:{listen_port}/"]
                if wrk
                else [sys.executable, "-c", PY_LOAD, "127.0.0.1", str(listen_port), str(CONNECTIONS), str(load_seconds)]
            )
            load = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                time.sleep(1.0)  # let the load ramp up before sampling (bounded: the load runs for load_seconds)
                cpu_before, wall_before = cpu_seconds(sidecar.proc.pid), time.monotonic()
                for _ in range(samples):
                    if load.poll() is not None:
                        break  # the load is over: what comes after would not be "while saturated"
                    for path, latencies in result.latencies.items():
                        ms, answer = timed_get("127.0.0.1", admin_port, path, admin_timeout)
                        result.statuses.append(answer.split(b"\r\n", 1)[0])
                        result.cached += b"x-seawall-report: cached" in answer.lower()
                        latencies.append(ms)
                    time.sleep(0.1)
                result.cpu_share = (cpu_seconds(sidecar.proc.pid) - cpu_before) / (time.monotonic() - wall_before)
                result.load_outlasted_sampling = load.poll() is None and len(result.statuses) == 2 * samples
            finally:
                result.load_output = load.communicate(timeout=load_seconds + 10)[0].decode(errors="replace")
    result.rps = float(result.load_output.split("Requests/sec:")[1].split()[0])
    return result
