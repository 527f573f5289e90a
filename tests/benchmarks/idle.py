"""What a sidecar with many upstreams costs while nobody uses it, and what one /metrics scrape costs.

    python tests/benchmarks/idle.py                       # 200 upstreams, 10 s idle, 20 scrapes
    python tests/benchmarks/idle.py --upstreams 50 --seconds 30
    python tests/benchmarks/idle.py --code ../other-checkout   # the same for another checkout's code

Prints the sidecar's CPU use while idle (percent of one core, from /proc utime+stime), and the median and
worst wall time of a /metrics and a /health answer. Everything runs on 127.0.0.1; the upstreams' targets are
never contacted (no checks, no traffic).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.support.sidecar import free_port  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_get(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as response:
        response.read()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstreams", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0, help="idle time measured")
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout whose sidecar runs")
    args = parser.parse_args(argv)

    admin = free_port()
    policy = {
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "upstreams": {
            f"svc-{i:03d}": {"listen": f"127.0.0.1:{free_port()}", "targets": ["http://127.0.0.1:9"]}
            for i in range(args.upstreams)
        },
    }
    with tempfile.TemporaryDirectory(prefix="seawall-idle-") as tmp:
        path = Path(tmp) / "idle.yaml"
        path.write_text(yaml.safe_dump(policy))
        env = {**os.environ, "PYTHONPATH": str(args.code.resolve())}
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(path), "--no-watch"],
            cwd=args.code,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    timed_get(f"http://127.0.0.1:{admin}/ready")
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        print("the sidecar did not become ready", file=sys.stderr)
                        return 1
                    time.sleep(0.1)
            time.sleep(1.0)  # let start-up work settle
            before, started = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(args.seconds)
            idle_share = (cpu_seconds(proc.pid) - before) / (time.monotonic() - started)
            metrics = [timed_get(f"http://127.0.0.1:{admin}/metrics") for _ in range(args.scrapes)]
            health = [timed_get(f"http://127.0.0.1:{admin}/health") for _ in range(args.scrapes)]
        finally:
            proc.terminate()
            proc.wait(20)
    print(f"code: {args.code.resolve().name}, {args.upstreams} upstreams")
    print(f"idle CPU: {idle_share * 100:.2f}% of one core over {args.seconds:g} s")
    print(f"/metrics: median {statistics.median(metrics) * 1000:.1f} ms, worst {max(metrics) * 1000:.1f} ms")
    print(f"/health:  median {statistics.median(health) * 1000:.1f} ms, worst {max(health) * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
