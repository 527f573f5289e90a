"""gRPC unary calls side by side: direct, nginx ``grpc_pass`` and the sidecar (``protocol: grpc``), issue 21's rows.

    python tests/benchmarks/grpc_bench.py --rounds 3 --seconds 5              # ~1.5 minutes
    python tests/benchmarks/grpc_bench.py --rounds 3 --seconds 5 --profile 10 # + py-spy of the sidecar under load

Layout (all on 127.0.0.1): a grpc.aio echo server (unary ``Echo/Unary`` with ~100-byte messages, and the standard
health service) in its own process, unpinned; nginx (one worker, ``listen ... http2``, ``grpc_pass`` to an
``upstream`` block with ``keepalive``) and the sidecar (``python -m proxy run --no-watch``, one ``protocol: grpc``
upstream) pinned to core 1; the load generator, a grpc.aio client process keeping ``--inflight`` calls in flight
for ``--seconds`` on one channel, pinned to core 0. Rounds are interleaved (a, b, c, c, b, a, ...) after a warm-up
run per system; each row is the median over the rounds with the spread (min–max). CPU per call is the proxy's
whole process tree (utime + stime from /proc) over its run, divided by the calls completed; for every system the
upstream server's CPU per call is shown too. Every call must succeed: errors are counted by status and reported.
Also used by ``bench.py --grpc``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
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
    cpu_seconds,
    free_port,
    log,
    need,
    nginx_common,
    raw_stacks,
    spawn,
    summarise_profile,
    wait_ready,
)
from tests.benchmarks.tcp_relay import wait_port  # noqa: E402

SYSTEMS = ("direct", "nginx-grpc", "sidecar-grpc")
LABELS = {
    "direct": "direct (grpc.aio server)",
    "nginx-grpc": "nginx `grpc_pass`",
    "sidecar-grpc": "seawall sidecar (`protocol: grpc`)",
}
PAYLOAD = b"x" * 100  # the request's bytes field; the echo answers with the same message
CALL_TIMEOUT = 5.0  # seconds per call: a stuck call is an error, never a hang
WARMUP_SECONDS = 2.0
TARGET_RATIO = 0.6  # issue 21: ≥ 0.6× direct calls/s ...
TARGET_CPU_US = 300.0  # ... and ≤ 300 µs of the sidecar's CPU per unary call


# ---------------------------------------------------------------------------- server and load generator ----


def import_stubs(directory: Path) -> tuple[ModuleType, ModuleType]:
    """The echo stubs the parent generated into ``directory`` (generated once, so two processes never race)."""
    sys.path.insert(0, str(directory))
    return importlib.import_module("echo_pb2"), importlib.import_module("echo_pb2_grpc")


async def serve(port: int, stubs: Path) -> None:
    """The upstream: Echo/Unary answering with the request's bytes, plus grpc.health.v1 (SERVING)."""
    import grpc  # type: ignore[import-untyped]
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

    pb2, pb2_grpc = import_stubs(stubs)

    class Echo(pb2_grpc.EchoServicer):  # type: ignore[misc,name-defined]
        async def Unary(self, msg: Any, context: Any) -> Any:
            return pb2.Msg(data=msg.data)

    server = grpc.aio.server()
    server.add_insecure_port(f"127.0.0.1:{port}")
    pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def load(port: int, seconds: float, inflight: int, stubs: Path) -> dict[str, Any]:
    """``inflight`` workers on one channel, each calling Unary back to back until ``seconds`` have passed."""
    import grpc

    pb2, pb2_grpc = import_stubs(stubs)
    ok = 0
    wrong = 0
    errors: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=10)
        stub = pb2_grpc.EchoStub(channel)
        request = pb2.Msg(data=PAYLOAD)
        started = time.perf_counter()
        end = started + seconds

        async def worker() -> None:
            nonlocal ok, wrong
            while time.perf_counter() < end:
                try:
                    reply = await stub.Unary(request, timeout=CALL_TIMEOUT)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    continue
                if reply.data == PAYLOAD:
                    ok += 1
                else:
                    wrong += 1

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(inflight))), seconds + CALL_TIMEOUT + 5)
        elapsed = time.perf_counter() - started
    if wrong:
        errors["WRONG_ANSWER"] += wrong
    return {"calls": ok, "seconds": elapsed, "errors": dict(errors)}


# ----------------------------------------------------------------------------------------------- systems ----


@dataclass
class System:
    key: str
    proc: Proc | None  # None for direct
    port: int


def nginx_grpc_conf(prefix: Path, port: int, upstream_port: int) -> str:
    # keepalive: without it nginx opens a new upstream connection per call (it never multiplexes upstream);
    # keepalive_requests in both places: nginx 1.22's default of 1000 would GOAWAY/close mid-run.
    return (
        nginx_common(prefix)
        + f"""    upstream echo {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{ grpc_pass grpc://echo; }}
    }}
}}
"""
    )


def sidecar_grpc_policy(port: int, admin: int, upstream_port: int) -> str:
    # Like config/examples/grpc-model-server.yaml: breaker, retries of UNAVAILABLE, the grpc health probe.
    return f"""admin:
  listen: 127.0.0.1:{admin}
defaults:
  timeouts: {{connect: 1s, per_try: 10s, total: 30s}}
  breaker: {{failure_threshold: 5, window: 30s, open_duration: 15s}}
  retry: {{max_retries: 2, base_delay: 100ms, max_delay: 1s}}
upstreams:
  echo:
    protocol: grpc
    listen: 127.0.0.1:{port}
    targets: ["http://127.0.0.1:{upstream_port}"]
    health: {{probe: grpc, interval: 5s, timeout: 1s}}
"""


def start(key: str, tools: Tools, workdir: Path, upstream_port: int) -> System:
    if key == "direct":
        return System(key, None, upstream_port)
    port = free_port()
    if key == "nginx-grpc":
        prefix = workdir / "nginx-grpc"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / kind).mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_grpc_conf(prefix, port, upstream_port))
        cmd = [need("nginx", "nginx-light"), "-p", str(prefix), "-c", str(conf)]
        proc = spawn(key, tools.pinned(cmd, PROXY_CPU), workdir)
        wait_port(port, proc)
        return System(key, proc, port)
    admin = free_port()
    policy = workdir / f"{key}.yaml"
    policy.write_text(sidecar_grpc_policy(port, admin, upstream_port))
    cmd = [sys.executable, "-m", "proxy", "run", "--config", str(policy), "--no-watch"]
    # cwd and PYTHONPATH name this checkout, so `-m proxy` runs its code whatever is installed.
    proc = spawn(key, tools.pinned(cmd, PROXY_CPU), workdir, env={"PYTHONPATH": str(REPO)}, cwd=REPO)
    wait_ready(proc, f"http://127.0.0.1:{admin}/ready")
    return System(key, proc, port)


# ---------------------------------------------------------------------------------------------- measure ----


def run_load(tools: Tools, port: int, seconds: float, inflight: int, stubs: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "load", str(port), str(seconds), str(inflight), str(stubs)]
    out = subprocess.run(
        tools.pinned(cmd, LOADGEN_CPU), capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    if out.returncode != 0:
        raise BenchError(f"gRPC load generator on port {port} failed: {out.stderr.strip()[-800:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def measure(tools: Tools, system: System, upstream: Proc, seconds: float, inflight: int, stubs: Path) -> dict[str, Any]:
    proxy0 = cpu_seconds(system.proc.pid) if system.proc else 0.0
    upstream0 = cpu_seconds(upstream.pid)
    result = run_load(tools, system.port, seconds, inflight, stubs)
    proxy_cpu = (cpu_seconds(system.proc.pid) - proxy0) if system.proc else 0.0
    upstream_cpu = cpu_seconds(upstream.pid) - upstream0
    calls = max(result["calls"], 1)
    return {
        "calls": result["calls"],
        "calls_s": result["calls"] / result["seconds"],
        "proxy_cpu_us_per_call": proxy_cpu / calls * 1e6,
        "upstream_cpu_us_per_call": upstream_cpu / calls * 1e6,
        "errors": result["errors"],
    }


def interleaved(keys: list[str], rounds: int) -> list[tuple[int, str]]:
    """a, b, c, c, b, a, a, b, c, ...: every system runs as often early as late within the run."""
    order = []
    for i in range(rounds):
        order += [(i, key) for key in (keys if i % 2 == 0 else reversed(keys))]
    return order


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    errors: Counter[str] = Counter()
    for r in runs:
        errors.update(r["errors"])
    out: dict[str, Any] = {"runs": runs, "errors": dict(errors)}
    for name in ("calls_s", "proxy_cpu_us_per_call", "upstream_cpu_us_per_call"):
        values = [r[name] for r in runs]
        out[name] = statistics.median(values)
        out[f"{name}_min"], out[f"{name}_max"] = min(values), max(values)
    return out


def profile(tools: Tools, system: System, seconds: int, inflight: int, stubs: Path, out: Path) -> dict[str, Any]:
    """py-spy (raw, --nonblocking) of the sidecar while the load generator runs; own time by package."""
    py_spy = need("py-spy", "py-spy (pip install py-spy)")
    assert system.proc is not None
    cmd = [py_spy, "record", "--nonblocking", "--full-filenames", "--rate", "250", "-d", str(seconds)]
    cmd += ["--format", "raw"]
    cmd += ["-o", str(out), "--pid", str(system.proc.pid)]
    load_cmd = [sys.executable, str(Path(__file__).resolve()), "load", str(system.port), str(seconds + 4)]
    load_cmd += [str(inflight), str(stubs)]
    with subprocess.Popen(tools.pinned(load_cmd, LOADGEN_CPU), stdout=subprocess.DEVNULL) as loader:
        try:
            time.sleep(2)  # the client is connected and the load steady
            done = subprocess.run(
                tools.pinned(cmd, LOADGEN_CPU), capture_output=True, text=True, timeout=seconds + 60, check=False
            )
        finally:
            loader.wait(timeout=seconds + 60)
    if done.returncode != 0:
        raise BenchError(f"py-spy failed: {done.stderr.strip()[-500:]}")
    summary = summarise_profile(out, top=25)
    summary["by_package"] = time_by_package(out)
    return summary


LIBRARY_GROUPS = (  # (marker in a frame's full file name, group)
    ("/site-packages/h2/", "h2"),
    ("/site-packages/hpack/", "hpack"),
    ("/site-packages/hyperframe/", "hyperframe"),
    (str(REPO / "proxy") + "/", "seawall (proxy/)"),
)
EVENT_LOOP = "event loop (uvloop's C: epoll, socket I/O, callbacks)"  # Runner.run's own time under uvloop


def _group(frame: str) -> str | None:
    if frame.startswith("Runner.run ("):
        return EVENT_LOOP
    return next((name for marker, name in LIBRARY_GROUPS if marker in frame), None)


def time_by_package(raw: Path) -> list[tuple[str, float, float]]:
    """Per group: (group, % own time of its frames, % with the stdlib it calls counted as its own).

    py-spy's raw stacks run root → leaf; the second figure walks from the leaf to the first frame of a known
    group, so ``logging``, ``enum`` or ``collections`` called by h2 count as h2, asyncio called by proxy/ as ours.
    """
    own: Counter[str] = Counter()
    attributed: Counter[str] = Counter()
    total = 0
    for frames, count in raw_stacks(raw):
        own[_group(frames[-1]) or "other (stdlib, ...)"] += count
        attributed[next(filter(None, map(_group, reversed(frames))), "other (stdlib, ...)")] += count
        total += count
    if not total:
        return []
    return [
        (group, round(100 * own[group] / total, 1), round(100 * attributed[group] / total, 1))
        for group, _ in (own + attributed).most_common()
    ]


def run(
    tools: Tools,
    keys: list[str],
    rounds: int,
    seconds: float,
    inflight: int = 50,
    profile_seconds: int = 0,
    profile_out: Path | None = None,
) -> dict[str, Any]:
    """Start everything, measure ``rounds`` interleaved rounds, stop everything; per system the medians."""
    from tests.support.grpc_echo import generate_stubs

    workdir = Path(tempfile.mkdtemp(prefix="seawall-grpc-bench-"))
    procs: list[Proc] = []
    try:
        stubs = workdir / "stubs"
        generate_stubs(stubs)
        upstream_port = free_port()
        serve_cmd = [sys.executable, str(Path(__file__).resolve()), "serve", str(upstream_port), str(stubs)]
        upstream = spawn("grpc-echo", serve_cmd, workdir)
        procs.append(upstream)
        wait_port(upstream_port, upstream)
        systems = []
        for key in keys:
            system = start(key, tools, workdir, upstream_port)
            procs += [system.proc] if system.proc else []
            systems.append(system)
        by_key = {s.key: s for s in systems}
        for system in systems:  # warm-up, not kept (the sidecar's first upstream connection, caches)
            measure(tools, system, upstream, WARMUP_SECONDS, inflight, stubs)
        samples: dict[str, list[dict[str, Any]]] = {key: [] for key in keys}
        for i, key in interleaved(keys, rounds):
            time.sleep(1)  # let the previous system's calls and connections settle
            row = measure(tools, by_key[key], upstream, seconds, inflight, stubs)
            samples[key].append(row)
            log(
                f"  grpc round {i + 1}: {key} {row['calls_s']:,.0f} calls/s, proxy "
                f"{row['proxy_cpu_us_per_call']:.0f} µs/call, upstream {row['upstream_cpu_us_per_call']:.0f} µs/call"
                + (f", errors {row['errors']}" if row["errors"] else "")
            )
        results: dict[str, Any] = {key: {"label": LABELS[key], **summarise(runs)} for key, runs in samples.items()}
        if profile_seconds and "sidecar-grpc" in by_key:
            raw = profile_out or workdir / "grpc-profile.txt"
            log(f"  grpc: py-spy of the sidecar for {profile_seconds}s under {inflight} calls in flight")
            results["sidecar-grpc"]["profile"] = profile(
                tools, by_key["sidecar-grpc"], profile_seconds, inflight, stubs, raw
            )
        return results
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- render ----


def checks(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """Issue 21's two targets for the sidecar: (name, measured, met)."""
    side, direct = results.get("sidecar-grpc"), results.get("direct")
    out = []
    if side and direct:
        x = side["calls_s"] / direct["calls_s"]
        out.append((f"gRPC: sidecar ≥ {TARGET_RATIO}× direct calls/s", f"{x:.2f}×", x >= TARGET_RATIO))
    if side:
        cpu = side["proxy_cpu_us_per_call"]
        out.append(
            (f"gRPC: sidecar ≤ {TARGET_CPU_US:.0f} µs CPU per unary call", f"{cpu:.0f} µs", cpu <= TARGET_CPU_US)
        )
    return out


def _spread(r: dict[str, Any], name: str, digits: int = 0) -> str:
    return f"{r[name]:,.{digits}f} ({r[name + '_min']:,.{digits}f}–{r[name + '_max']:,.{digits}f})"


def render(results: dict[str, Any], rounds: int, seconds: float, inflight: int = 50) -> list[str]:
    direct = results.get("direct")
    lines = [
        "## gRPC unary calls (issue 21)",
        "",
        f"Medians of {rounds} interleaved rounds of {seconds:g} s (min–max in brackets): a grpc.aio client process "
        f"with {inflight} calls in flight on one channel (core {LOADGEN_CPU}), ~100-byte messages, to a grpc.aio echo "
        f"server (unpinned) directly or through the proxy (core {PROXY_CPU}). CPU per call: the proxy's process "
        "tree, and the upstream server's.",
        "",
        "| system | calls/s | ÷ direct | proxy CPU µs / call | upstream CPU µs / call | errors |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for key, r in results.items():
        x = f"{r['calls_s'] / direct['calls_s']:.2f}×" if direct else "–"
        proxy = "–" if key == "direct" else _spread(r, "proxy_cpu_us_per_call")
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "none"
        lines.append(
            f"| {r['label']} | {_spread(r, 'calls_s')} | {x} | {proxy} | {_spread(r, 'upstream_cpu_us_per_call')} "
            f"| {errors} |"
        )
    lines += ["", "| target (issue 21) | measured | |", "|---|---|---|"]
    lines += [f"| {name} | {measured} | {'met' if ok else '**missed**'} |" for name, measured, ok in checks(results)]
    if prof := results.get("sidecar-grpc", {}).get("profile"):
        lines += [
            "",
            f"### Sidecar profile under gRPC load (py-spy, {prof['samples']} samples)",
            "",
            "Time by package: own (the innermost frame is the package's; C calls count where they are made) and "
            "with the standard library it calls (logging, enum, asyncio, ... counted as the caller's).",
            "",
            "| package | % own | % with the stdlib it calls |",
            "|---|---:|---:|",
        ]
        lines += [f"| {group} | {own} | {attributed} |" for group, own, attributed in prof["by_package"]]
        lines += ["", "| self time (function, line) | % |", "|---|---:|"]
        lines += [f"| `{f}` | {p} |" for f, p in prof["self"]]
        lines += ["", "| inclusive time | % |", "|---|---:|"]
        lines += [f"| `{f}` | {p} |" for f, p in prof["inclusive"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role")
    server = sub.add_parser("serve")
    server.add_argument("port", type=int)
    server.add_argument("stubs", type=Path)
    loader = sub.add_parser("load")
    loader.add_argument("port", type=int)
    loader.add_argument("seconds", type=float)
    loader.add_argument("inflight", type=int)
    loader.add_argument("stubs", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measured run")
    parser.add_argument("--inflight", type=int, default=50, help="calls in flight")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"a subset of {','.join(SYSTEMS)}")
    parser.add_argument("--profile", type=int, default=0, metavar="SECONDS", help="py-spy the sidecar this long")
    parser.add_argument("--profile-out", type=Path, help="keep py-spy's raw stacks here")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.role == "serve":
        asyncio.run(serve(args.port, args.stubs))
        return 0
    if args.role == "load":
        print(json.dumps(asyncio.run(load(args.port, args.seconds, args.inflight, args.stubs))))
        return 0
    keys = [k.strip() for k in args.systems.split(",") if k.strip()]
    if unknown := set(keys) - set(SYSTEMS):
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    tools = Tools(wrk="", nginx="", haproxy="", caddy="", taskset=shutil.which("taskset"), py_spy=None)
    try:
        results = run(tools, keys, args.rounds, args.seconds, args.inflight, args.profile, args.profile_out)
    except BenchError as exc:
        print(f"grpc bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print("\n".join(render(results, args.rounds, args.seconds, args.inflight)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
