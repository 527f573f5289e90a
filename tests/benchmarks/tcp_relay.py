"""The L4 relay (`protocol: tcp`) side by side: direct, HAProxy `mode tcp`, the sidecar relaying by splice, and the
sidecar's protocol-based relay (``SEAWALL_TCP_SPLICE=0``; optionally the sidecar at an earlier git revision).

    python tests/benchmarks/tcp_relay.py                       # 3 interleaved rounds, ~3 minutes
    python tests/benchmarks/tcp_relay.py --rounds 1 --gib 0.5  # a quick look
    python tests/benchmarks/tcp_relay.py --baseline ea1547c    # + the relay as it was at that revision

Two measurements per system and round, systems interleaved (a, b, c, a, b, c, ...) on a shared machine:

- bulk: one stream of ``--gib`` GiB from a sender (core 0, sendfile) through the relay to a sink (unpinned,
  MSG_TRUNC: neither copies the bytes, so the relay is what is measured) that reports the byte count after EOF; GiB/s from the first byte to that report, and the relay's CPU seconds per GiB
  (utime + stime from /proc/PID/stat over the transfer);
- redis: ``redis-benchmark -P 1 -n 100000 -t get,set -q`` (core 0, 50 connections) through the relay to a
  redis-server (unpinned), with the relay's CPU per operation;
- ping: 20,000 Redis PINGs in a row on one connection, the median round trip (steady on a busy machine).

Relays run on core 1. Medians over the rounds are printed (and written as JSON with ``--json``). Loopback only;
every transfer and run is bounded by a timeout. Also used by ``bench.py --tcp``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere in the checkout

from tests.benchmarks.bench import (  # noqa: E402
    LOADGEN_CPU,
    PROXY_CPU,
    BenchError,
    Proc,
    Tools,
    checkout,
    cpu_seconds,
    free_port,
    log,
    need,
    spawn,
)

CHUNK = 4 << 20  # bytes per receive call of the sink; the sender's file is 16 of these
SYSTEMS = ("direct", "haproxy-tcp", "sidecar-tcp", "sidecar-tcp-protocol")
LABELS = {
    "direct": "direct",
    "haproxy-tcp": "HAProxy `mode tcp`",
    "sidecar-tcp": "seawall sidecar (splice)",
    "sidecar-tcp-protocol": "seawall sidecar (protocol relay, SEAWALL_TCP_SPLICE=0)",
}


# ------------------------------------------------------------------------------- sender and sink ----


def sink(port: int) -> None:
    """Accept streams one after another; after each EOF answer with the byte count."""
    with socket.create_server(("127.0.0.1", port)) as server:
        print("ready", flush=True)
        buf = bytearray(CHUNK)
        while True:
            conn, _ = server.accept()
            with conn:
                total = 0
                # MSG_TRUNC: Linux TCP drops the bytes without copying them out, so the sink costs little CPU.
                while n := conn.recv_into(buf, CHUNK, socket.MSG_TRUNC):
                    total += n
                conn.sendall(b"%d\n" % total)


def send(port: int, total: int) -> None:
    """Stream ``total`` bytes, shut down writing, wait for the sink's count; print JSON {bytes, seconds}.

    The bytes come from a file by sendfile (no copy through user space), so the sender costs little CPU."""
    with tempfile.TemporaryFile() as source:
        source.write(os.urandom(CHUNK) * 16)
        source.flush()
        size = 16 * CHUNK
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.settimeout(None)  # blocking, for os.sendfile (the caller bounds the whole run)
            started = time.perf_counter()
            sent = 0
            while sent < total:
                sent += os.sendfile(conn.fileno(), source.fileno(), sent % size, min(total - sent, size - sent % size))
            conn.shutdown(socket.SHUT_WR)
            reply = conn.makefile("rb").readline()
            seconds = time.perf_counter() - started
    if int(reply) != total:
        raise SystemExit(f"the sink counted {reply!r}, {total} were sent")
    print(json.dumps({"bytes": total, "seconds": seconds}))


def ping(port: int, count: int) -> None:
    """``count`` Redis PINGs one after another on one connection; print JSON {p50_us, p90_us} of the round trips.

    The median of many round trips hardly moves when other jobs take the CPU now and then, unlike ops/s."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(count):
            started = time.perf_counter_ns()
            conn.sendall(b"PING\r\n")
            if conn.recv(64) != b"+PONG\r\n":
                raise SystemExit("unexpected answer to PING")
            times.append(time.perf_counter_ns() - started)
    times.sort()
    print(json.dumps({"p50_us": times[len(times) // 2] / 1000, "p90_us": times[len(times) * 9 // 10] / 1000}))


# ----------------------------------------------------------------------------------------- systems ----


@dataclass
class Relay:
    key: str
    proc: Proc | None  # None for direct
    bulk_port: int
    redis_port: int


def haproxy_tcp_conf(bulk: int, bulk_up: int, redis: int, redis_up: int) -> str:
    # HAProxy's defaults: no splice-auto (it copies through user space like most proxies).
    return f"""global
    nbthread 1
    maxconn 4000

defaults
    mode tcp
    timeout connect 1s
    timeout client 60s
    timeout server 60s

listen bulk
    bind 127.0.0.1:{bulk}
    server s 127.0.0.1:{bulk_up}

listen redis
    bind 127.0.0.1:{redis}
    server s 127.0.0.1:{redis_up}
"""


def sidecar_tcp_policy(admin: int, bulk: int, bulk_up: int, redis: int, redis_up: int) -> str:
    return f"""admin:
  listen: 127.0.0.1:{admin}
upstreams:
  bulk:
    protocol: tcp
    listen: 127.0.0.1:{bulk}
    targets: ["127.0.0.1:{bulk_up}"]
  redis:
    protocol: tcp
    listen: 127.0.0.1:{redis}
    targets: ["127.0.0.1:{redis_up}"]
"""


def wait_port(port: int, proc: Proc, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited:\n{proc.log_tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise BenchError(f"{proc.name} not listening on {port} after {timeout:.0f}s:\n{proc.log_tail()}")


def start(key: str, tools: Tools, workdir: Path, bulk_up: int, redis_up: int, code: Path) -> Relay:
    if key == "direct":
        return Relay(key, None, bulk_up, redis_up)
    bulk, redis = free_port(), free_port()
    if key == "haproxy-tcp":
        cfg = workdir / "haproxy-tcp.cfg"
        cfg.write_text(haproxy_tcp_conf(bulk, bulk_up, redis, redis_up))
        proc = spawn(key, tools.pinned([need("haproxy", "haproxy"), "-db", "-f", str(cfg)], PROXY_CPU), workdir)
    else:
        policy = workdir / f"{key}.yaml"
        policy.write_text(sidecar_tcp_policy(free_port(), bulk, bulk_up, redis, redis_up))
        cmd = [sys.executable, "-m", "proxy", "run", "--config", str(policy), "--no-watch"]
        env = {"PYTHONPATH": str(code), "SEAWALL_TCP_SPLICE": "0" if key == "sidecar-tcp-protocol" else "1"}
        proc = spawn(key, tools.pinned(cmd, PROXY_CPU), workdir, env=env, cwd=code)
    wait_port(bulk, proc)
    wait_port(redis, proc)
    return Relay(key, proc, bulk, redis)


# ----------------------------------------------------------------------------------------- measure ----


def measure_bulk(tools: Tools, relay: Relay, total: int) -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "send", str(relay.bulk_port), str(total)]
    cpu0 = cpu_seconds(relay.proc.pid) if relay.proc else 0.0
    out = subprocess.run(tools.pinned(cmd, LOADGEN_CPU), capture_output=True, text=True, timeout=300, check=False)
    cpu = (cpu_seconds(relay.proc.pid) - cpu0) if relay.proc else 0.0
    if out.returncode != 0:
        raise BenchError(f"bulk sender via {relay.key} failed: {out.stderr.strip()[-500:]}")
    result = json.loads(out.stdout)
    gib = result["bytes"] / (1 << 30)
    return {"gib_s": gib / result["seconds"], "cpu_s_per_gib": cpu / gib}


def measure_ping(tools: Tools, relay: Relay, count: int) -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "ping", str(relay.redis_port), str(count)]
    out = subprocess.run(tools.pinned(cmd, LOADGEN_CPU), capture_output=True, text=True, timeout=300, check=False)
    if out.returncode != 0:
        raise BenchError(f"ping via {relay.key} failed: {out.stderr.strip()[-500:]}")
    return {f"ping_{k}": v for k, v in json.loads(out.stdout).items()}


def measure_redis(tools: Tools, relay: Relay, requests: int) -> dict[str, float]:
    cmd = [need("redis-benchmark", "redis-tools"), "-h", "127.0.0.1", "-p", str(relay.redis_port)]
    cmd += ["-P", "1", "-n", str(requests), "-t", "get,set", "-q"]
    cpu0 = cpu_seconds(relay.proc.pid) if relay.proc else 0.0
    out = subprocess.run(tools.pinned(cmd, LOADGEN_CPU), capture_output=True, text=True, timeout=300, check=False)
    cpu = (cpu_seconds(relay.proc.pid) - cpu0) if relay.proc else 0.0
    found = dict(re.findall(r"(SET|GET): ([\d.]+) requests per second", out.stdout))
    if out.returncode != 0 or len(found) != 2:
        raise BenchError(f"redis-benchmark via {relay.key} failed: {(out.stderr or out.stdout).strip()[-500:]}")
    # CPU per operation is steadier than ops/s on a shared machine: it does not count time spent descheduled.
    return {"set": float(found["SET"]), "get": float(found["GET"]), "cpu_us_per_op": cpu / (2 * requests) * 1e6}


MEASURES = ("bulk", "redis", "ping")


def run(
    tools: Tools,
    keys: list[str],
    rounds: int,
    gib: float,
    baseline: str | None = None,
    measures: tuple[str, ...] = MEASURES,
) -> dict[str, Any]:
    """Start everything, measure ``rounds`` interleaved rounds, stop everything; the medians per system."""
    workdir = Path(tempfile.mkdtemp(prefix="seawall-tcp-bench-"))
    procs: list[Proc] = []
    baseline_dir: Path | None = None
    try:
        sink_port, redis_up = free_port(), free_port()
        sink_cmd = [sys.executable, str(Path(__file__).resolve()), "sink", str(sink_port)]
        procs.append(spawn("sink", sink_cmd, workdir))
        redis_cmd = [need("redis-server", "redis-server"), "--port", str(redis_up), "--bind", "127.0.0.1"]
        redis_cmd += ["--save", "", "--appendonly", "no"]
        procs.append(spawn("redis-server", redis_cmd, workdir))
        for proc, port in zip(procs, (sink_port, redis_up), strict=True):
            wait_port(port, proc)
        codes = {key: REPO for key in keys}
        if baseline:
            baseline_dir, rev = checkout(baseline, workdir / "baseline")
            keys = [*keys, "sidecar-tcp-baseline"]
            codes["sidecar-tcp-baseline"] = baseline_dir
            LABELS["sidecar-tcp-baseline"] = f"seawall sidecar @ {rev}"
        relays = []
        for key in keys:
            relay = start(key, tools, workdir, sink_port, redis_up, codes[key])
            procs += [relay.proc] if relay.proc else []
            relays.append(relay)
        samples: dict[str, list[dict[str, float]]] = {key: [] for key in keys}
        total = int(gib * (1 << 30))
        for relay in relays:  # warm-up, not kept
            if "bulk" in measures:
                measure_bulk(tools, relay, min(total, 256 << 20))
            if "redis" in measures:
                measure_redis(tools, relay, 10_000)
        for i in range(rounds):
            for relay in relays:
                time.sleep(1)  # let the previous system's connections close first
                row: dict[str, float] = {}
                if "bulk" in measures:
                    row |= measure_bulk(tools, relay, total)
                if "redis" in measures:
                    row |= measure_redis(tools, relay, 100_000)
                if "ping" in measures:
                    row |= measure_ping(tools, relay, 20_000)
                samples[relay.key].append(row)
                log(f"  tcp round {i + 1}: {relay.key} " + ", ".join(f"{k} {v:,.2f}" for k, v in row.items()))
        return {
            key: {
                "label": LABELS[key],
                "runs": runs,
                **{name: statistics.median(r[name] for r in runs) for name in runs[0]},
            }
            for key, runs in samples.items()
        }
    finally:
        for proc in reversed(procs):
            proc.stop()
        if baseline_dir is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline_dir)], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def render(results: dict[str, Any], rounds: int, gib: float) -> list[str]:
    lines = [
        "## TCP relay (`protocol: tcp`)",
        "",
        f"Medians of {rounds} interleaved rounds. Bulk: one {gib:g} GiB stream (sendfile from a file; the sink "
        f"drops it with MSG_TRUNC), sender on core {LOADGEN_CPU}, relay on core {PROXY_CPU}, sink unpinned; CPU is "
        "the relay process's. Redis: `redis-benchmark -P 1 "
        f"-n 100000 -t get,set -q` (50 connections, core {LOADGEN_CPU}).",
        "",
        "| system | bulk GiB/s | relay CPU s / GiB | redis SET ops/s | redis GET ops/s | relay CPU µs / redis op "
        "| PING p50 µs (1 conn) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in results.items():
        relay_only = {"cpu_s_per_gib", "cpu_us_per_op"} if key == "direct" else set()
        cells = [
            "–" if name in relay_only or name not in r else f"{r[name]:,.{digits}f}"
            for name, digits in (
                ("gib_s", 2),
                ("cpu_s_per_gib", 2),
                ("set", 0),
                ("get", 0),
                ("cpu_us_per_op", 1),
                ("ping_p50_us", 1),
            )
        ]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role")
    sub.add_parser("sink").add_argument("port", type=int)
    pinger = sub.add_parser("ping")
    pinger.add_argument("port", type=int)
    pinger.add_argument("count", type=int)
    sender = sub.add_parser("send")
    sender.add_argument("port", type=int)
    sender.add_argument("bytes", type=int)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gib", type=float, default=2.0, help="size of each bulk stream")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"a subset of {','.join(SYSTEMS)}")
    parser.add_argument("--baseline", metavar="REV", help="also the sidecar at this git revision")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--measure", default=",".join(MEASURES), help=f"a subset of {','.join(MEASURES)}")
    args = parser.parse_args(argv)
    if args.role == "sink":
        sink(args.port)
        return 0
    if args.role == "ping":
        ping(args.port, args.count)
        return 0
    if args.role == "send":
        send(args.port, args.bytes)
        return 0
    keys = [k.strip() for k in args.systems.split(",") if k.strip()]
    if unknown := set(keys) - set(SYSTEMS):
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    tools = Tools(wrk="", nginx="", haproxy="", caddy="", taskset=shutil.which("taskset"), py_spy=None)
    try:
        measures = tuple(m.strip() for m in args.measure.split(",") if m.strip())
        if unknown := set(measures) - set(MEASURES):
            parser.error(f"unknown measurements: {', '.join(sorted(unknown))}")
        results = run(tools, keys, args.rounds, args.gib, args.baseline, measures)
    except BenchError as exc:
        print(f"tcp bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print("\n".join(render(results, args.rounds, args.gib)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
