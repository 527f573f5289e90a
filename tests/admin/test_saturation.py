"""/health and /metrics stay fast while the proxy listeners are saturated (real subprocesses, bounded load)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.support.servers import nginx_upstream
from tests.support.sidecar import free_port, sidecar_process, write_policy

LOAD_SECONDS = 6
CONNECTIONS = 64
SAMPLES = 20  # of each path
BUDGET_MS = 50.0

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


def timed_get(host: str, port: int, path: str) -> tuple[float, bytes]:
    """One admin request on a fresh connection, as a probe or scraper makes it; milliseconds to the last byte."""
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=2) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: {host}:{port}\r\nconnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return (time.perf_counter() - started) * 1000, b"".join(chunks)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_admin_answers_within_50ms_while_listeners_are_saturated(tmp_path: Path) -> None:
    admin_port, listen_port = free_port(), free_port()
    with nginx_upstream(tmp_path) as upstream:
        policy = write_policy(
            tmp_path / "p.yaml",
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
                [wrk, "-t1", f"-c{CONNECTIONS}", f"-d{LOAD_SECONDS}s", f"http://127.0.0.1:{listen_port}/"]
                if wrk
                else [sys.executable, "-c", PY_LOAD, "127.0.0.1", str(listen_port), str(CONNECTIONS), str(LOAD_SECONDS)]
            )
            load = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                time.sleep(1.0)  # let the load ramp up before sampling
                cpu_before, wall_before = cpu_seconds(sidecar.proc.pid), time.monotonic()
                latencies: dict[str, list[float]] = {"/health": [], "/metrics": []}
                cached = 0
                for _ in range(SAMPLES):
                    for path, samples in latencies.items():
                        ms, answer = timed_get("127.0.0.1", admin_port, path)
                        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
                        cached += b"x-seawall-report: cached" in answer.lower()
                        samples.append(ms)
                    time.sleep(0.1)
                cpu_share = (cpu_seconds(sidecar.proc.pid) - cpu_before) / (time.monotonic() - wall_before)
                assert load.poll() is None, "the load ended before sampling did"
            finally:
                output = load.communicate(timeout=LOAD_SECONDS + 10)[0].decode(errors="replace")
        rps = float(output.split("Requests/sec:")[1].split()[0])
        report = (
            f"admin latency under load ({rps:.0f} rps through the listener, sidecar CPU {cpu_share:.0%}, "
            f"{cached} cached reports): "
            + ", ".join(
                f"{path} max {max(v):.1f} ms p50 {sorted(v)[len(v) // 2]:.1f} ms" for path, v in latencies.items()
            )
        )
        print(report)
        (tmp_path.parent / "admin-latency.txt").write_text(report + "\n")
        assert rps > 1000, output  # the listener really was busy
        # CPU share is reported, not asserted: on a shared machine neighbours decide how much of a core it gets.
        # 19 of every 20 answers within the budget: one sample can always land on a scheduler stall of the
        # shared 2-core machine (the load generator, the upstream and the sidecar compete for both cores).
        for path, samples in latencies.items():
            p95 = sorted(samples)[int(len(samples) * 0.95) - 1]
            assert p95 < BUDGET_MS, f"{path}: {report}"
