"""Side-by-side benchmark: the sidecar against direct, nginx, HAProxy, Caddy and a naive aiohttp proxy.

One run, one machine, everything on 127.0.0.1. See README.md beside this file for what is measured and how.

    python tests/benchmarks/bench.py --quick          # ~2 minutes, to check that everything works
    python tests/benchmarks/bench.py                  # full run (~10 minutes)
    python tests/benchmarks/bench.py --long --profile # + RSS after 1,000,000 requests, + py-spy profile
    python tests/benchmarks/bench.py --grpc           # + gRPC unary rows (grpc_bench.py): direct, nginx, sidecar

Results land in bench-results/ at the repository root: results.md, results.json, throughput.png (and
profile.svg / profile-top.md with --profile).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

SMALL_BODY = "hello from the seawall bench upstream\n"
UPSTREAM_NAME = "bench"  # the sidecar's upstream name, used for its admin breaker calls
TOKEN_ENV = "SEAWALL_BENCH_ADMIN_TOKEN"

# CPU layout on a 2-core machine: the load generator (wrk, the open-loop sender, py-spy) owns core 0, the
# proxy under test owns core 1, and the upstream nginx floats (the scheduler puts it where there is room).
# Without pinning, wrk and a single-threaded proxy fight for the same core and runs get noisy.
LOADGEN_CPU = "0"
PROXY_CPU = "1"


@dataclass(frozen=True)
class Mode:
    name: str
    runs: int  # throughput runs per system; the median is reported
    tput_seconds: int
    c1_seconds: int
    open_seconds: float
    open_rates: tuple[int, ...]
    body_seconds: int
    warmup_seconds: int


QUICK = Mode(
    "quick", runs=1, tput_seconds=3, c1_seconds=2, open_seconds=3, open_rates=(1000,), body_seconds=2, warmup_seconds=1
)
FULL = Mode(
    "full",
    runs=3,
    tput_seconds=10,
    c1_seconds=5,
    open_seconds=10,
    open_rates=(1000, 3000),
    body_seconds=5,
    warmup_seconds=2,
)

LONG_REQUESTS = 1_000_000
LONG_MAX_SECONDS = 600  # the 1M-request run gives up (and says so) after this long


class BenchError(RuntimeError):
    """A benchmark step could not run (missing tool, a system that would not start, ...)."""


# --------------------------------------------------------------------------------------------- tools ----


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise BenchError(f"'{tool}' not found on PATH; install it (Debian: apt-get install {package})")
    return path


@dataclass
class Tools:
    wrk: str
    nginx: str
    haproxy: str
    caddy: str
    taskset: str | None
    py_spy: str | None
    nice: list[str] = field(default_factory=list)  # e.g. ["nice", "-n", "-5"] with --nice

    @classmethod
    def locate(cls, want_profile: bool) -> Tools:
        py_spy = shutil.which("py-spy")
        if want_profile and py_spy is None:
            raise BenchError("--profile needs py-spy on PATH (pip install py-spy)")
        return cls(
            wrk=need("wrk", "wrk"),
            nginx=need("nginx", "nginx-light"),
            haproxy=need("haproxy", "haproxy"),
            caddy=need("caddy", "caddy"),
            taskset=shutil.which("taskset"),
            py_spy=py_spy,
        )

    def pinned(self, cmd: list[str], cpus: str | None) -> list[str]:
        # Pinning is an optimisation for stable numbers, not a requirement: without taskset, run unpinned.
        if cpus is None or self.taskset is None or (os.cpu_count() or 1) < 2:
            return [*self.nice, *cmd]
        return [*self.nice, self.taskset, "-c", cpus, *cmd]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------- /proc sampling ----

CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_pids(root: int) -> list[int]:
    """root and all its descendants (nginx master + worker, for instance)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after the last ')'.
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    pids, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        pids.extend(frontier)
    return pids


def cpu_seconds(root: int) -> float:
    return sum(cpu_split(root))


def cpu_split(root: int) -> tuple[float, float]:
    """CPU seconds of the process tree so far: in user space, and in the kernel (system calls, the network stack
    run on its behalf)."""
    user = system = 0
    for pid in tree_pids(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])  # utime and stime: fields 14 and 15 of stat(5)
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def rss_mb(root: int) -> float:
    """Resident memory of the process tree in MiB (summed RSS; shared pages of a forked tree count twice)."""
    total_kb = 0
    for pid in tree_pids(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


# ------------------------------------------------------------------------------------------ processes ----


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if not self.alive():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=5)


def spawn(name: str, cmd: list[str], workdir: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> Proc:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd or workdir,
        )
    return Proc(name, popen, log)


def http(
    method: str, url: str, headers: dict[str, str] | None = None, timeout: float = 2.0
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def wait_ready(proc: Proc, url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            status, _, _ = http("GET", url, timeout=1.0)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(f"{proc.name} not ready at {url} after {timeout:.0f}s ({last}):\n{proc.log_tail()}")


# ------------------------------------------------------------------------------------------- configs ----


def nginx_common(prefix: Path, keepalive_requests: int = 1_000_000) -> str:
    # Every path nginx would write to lives under our own prefix, so no root-owned system dirs are touched.
    temps = "\n".join(
        f"    {kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
master_process on;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/octet-stream;
    keepalive_requests {keepalive_requests};
{temps}
"""


def upstream_nginx_conf(prefix: Path, root: Path, port: int, tls: UpstreamTls | None = None) -> str:
    locations = f"""        root {root};
        location = / {{ return 200 "{SMALL_BODY.strip()}\\n"; }}
        location = /health {{ return 200 "ok\\n"; }}
        location /files/ {{ }}
"""
    # The same server behind TLS (for the HTTPS-upstream rows): sessions resumable by ticket and by cache.
    https = (
        f"""    server {{
        listen 127.0.0.1:{tls.port} ssl reuseport backlog=4096;
        ssl_certificate {tls.cert};
        ssl_certificate_key {tls.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        ssl_session_tickets on;
{locations}    }}
"""
        if tls is not None
        else ""
    )
    return (
        nginx_common(prefix)
        + f"""    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
{locations}    }}
{https}}}
"""
    )


def nginx_proxy_conf(prefix: Path, port: int, upstream_port: int, tls: UpstreamTls | None = None) -> str:
    # max_fails/fail_timeout is nginx's passive breaker; proxy_next_upstream is its retry policy. With ``tls``:
    # proxy_pass https:// to the upstream's TLS port, verified like the sidecar does, keep-alive, sessions reused.
    https = (
        f"""            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {tls.ca};
            proxy_ssl_name {UPSTREAM_TLS_NAME};
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
"""
        if tls is not None
        else ""
    )
    return (
        nginx_common(prefix)
        + f"""    upstream app {{
        server 127.0.0.1:{tls.port if tls else upstream_port} max_fails=5 fail_timeout=60s;
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
{https}            proxy_pass {"https" if tls else "http"}://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout http_502 http_503 http_504;
            proxy_next_upstream_tries 4;
            proxy_connect_timeout 1s;
            proxy_read_timeout 5s;
        }}
    }}
}}
"""
    )


def haproxy_conf(port: int, upstream_port: int) -> str:
    # observe layer7 + on-error mark-down is HAProxy's passive breaker; http-reuse keeps upstream keep-alive.
    return f"""global
    nbthread 1
    maxconn 4000

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 5s
    option http-keep-alive
    http-reuse always
    retries 3
    option redispatch

frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    option httpchk GET /health
    server app 127.0.0.1:{upstream_port} check inter 5s observe layer7 error-limit 5 on-error mark-down
"""


def caddyfile(port: int, upstream_port: int) -> str:
    # Passive health checks (fail_duration / max_fails / unhealthy_status) are Caddy's breaker-like feature.
    return f"""{{
    admin off
    auto_https off
}}

http://127.0.0.1:{port} {{
    reverse_proxy 127.0.0.1:{upstream_port} {{
        fail_duration 60s
        max_fails 5
        unhealthy_status 5xx
    }}
}}
"""


# The rate-limit rows: limits far above what the bench sends (never reached: the cost of counting alone), local
# or shared through a real redis-server on loopback.
RATE_LIMIT_LOCAL = (
    "    rate_limit: {limits: [{requests: 10000000, per: 1s}, {requests: 600000000, per: 1m, window: fixed}]}\n"
)


def rate_limit_shared(redis_port: int) -> str:
    return (
        "    rate_limit:\n"
        "      limits: [{requests: 10000000, per: 1s}, {requests: 600000000, per: 1m, window: fixed}]\n"
        f'      shared: {{redis: "redis://127.0.0.1:{redis_port}/0", key: bench}}\n'
    )


def sidecar_policy(
    port: int, admin_port: int, upstream_port: int, tls: UpstreamTls | None = None, extra: str = ""
) -> str:
    # The shipped default policy (config/sidecar.yaml): breaker, retries with budget, health checks, metrics
    # all on. Only the addresses differ, and logging stays at its default (no per-request lines).
    return (
        f"""admin:
  listen: 127.0.0.1:{admin_port}
  token_env: {TOKEN_ENV}
defaults:
  timeouts: {{connect: 1s, per_try: 5s, total: 15s}}
  breaker: {{failure_threshold: 5, window: 60s, open_duration: 60s, half_open_max_calls: 1}}
  retry:
    max_retries: 3
    base_delay: 1s
    max_delay: 4s
    jitter: true
    retry_on: [connect_error, reset, 502, 503, 504]
    methods: [GET, HEAD, OPTIONS, PUT, DELETE]
    budget: {{ratio: 0.2, min_per_second: 10}}
upstreams:
  {UPSTREAM_NAME}:
    listen: 127.0.0.1:{port}
    targets: ["{f"https://127.0.0.1:{tls.port}" if tls else f"http://127.0.0.1:{upstream_port}"}"]
    health: {{path: /health, interval: 5s, timeout: 1s, critical: true}}
    fallback: {{status: 503, body: '{{"cached": false}}', content_type: application/json}}
"""
        + (f"    tls: {{ca_file: {tls.ca}, server_name: {UPSTREAM_TLS_NAME}}}\n" if tls else "")
        + extra
    )


UPSTREAM_TLS_NAME = "localhost"  # the upstream certificate's name (verified, and sent as SNI)


@dataclass(frozen=True)
class UpstreamTls:
    """The upstream nginx's TLS port and a throwaway CA's files (trustme, as in the TLS tests)."""

    port: int
    cert: Path
    key: Path
    ca: Path

    @classmethod
    def make(cls, directory: Path) -> UpstreamTls:
        import trustme

        directory.mkdir(parents=True)
        ca = trustme.CA()
        leaf = ca.issue_cert(UPSTREAM_TLS_NAME, "127.0.0.1")
        tls = cls(free_port(), directory / "upstream.crt", directory / "upstream.key", directory / "ca.pem")
        tls.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(tls.key))
        ca.cert_pem.write_to_path(str(tls.ca))
        for path in (directory, tls.cert, tls.key, tls.ca):  # nginx workers run unprivileged
            path.chmod(0o755 if path.is_dir() else 0o644)
        return tls


# ------------------------------------------------------------------------------------------- systems ----


@dataclass
class Running:
    key: str
    label: str
    workers: str
    proc: Proc
    port: int
    admin_port: int | None = None


@dataclass
class Bench:
    tools: Tools
    workdir: Path
    upstream_port: int = 0
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    baseline: Path | None = None  # a checkout of earlier sidecar code, run as "sidecar-baseline"
    baseline_rev: str = ""
    tls: UpstreamTls | None = None  # the upstream's TLS side, for the *-https systems
    redis: Proc | None = None  # the shared rate limit's store, for sidecar-shared

    def _nginx(self, name: str, conf: str, cpus: str | None) -> Proc:
        prefix = self.workdir / name
        prefix.mkdir(exist_ok=True)
        conf_path = prefix / "nginx.conf"
        conf_path.write_text(conf)
        return spawn(
            name, self.tools.pinned([self.tools.nginx, "-p", str(prefix), "-c", str(conf_path)], cpus), self.workdir
        )

    def start_upstream(self) -> Proc:
        root = self.workdir / "www"
        (root / "files").mkdir(parents=True)
        (root / "files" / "1k").write_bytes(b"k" * 1024)
        (root / "files" / "64k").write_bytes(b"s" * (64 << 10))
        (root / "files" / "1m").write_bytes(b"m" * (1 << 20))
        # mkdtemp makes 0700 dirs; nginx workers run as an unprivileged user and must traverse them.
        for path in (self.workdir, root, root / "files"):
            path.chmod(0o755)
        self.upstream_port = free_port()
        self.tls = UpstreamTls.make(self.workdir / "tls")
        conf = upstream_nginx_conf(self.workdir / "upstream", root, self.upstream_port, self.tls)
        proc = self._nginx("upstream", conf, None)
        wait_ready(proc, f"http://127.0.0.1:{self.upstream_port}/")
        return proc

    def start_redis(self) -> int:
        """A redis-server on loopback for the shared rate-limit row (unpinned: it is the budget's store, not
        the system measured); stopped with the bench."""
        port = free_port()
        cmd = [need("redis-server", "redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        self.redis = spawn("redis", [*cmd, "--appendonly", "no"], self.workdir)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return port
            time.sleep(0.05)
        raise BenchError("redis-server did not answer PING")

    def start(self, key: str, upstream: Proc) -> Running:
        port, up, t = free_port(), self.upstream_port, self.tools
        if key == "direct":
            return Running(key, "direct (nginx upstream)", "1 worker", upstream, up)
        if key == "nginx":
            proc = self._nginx("nginx-proxy", nginx_proxy_conf(self.workdir / "nginx-proxy", port, up), PROXY_CPU)
            run = Running(key, "nginx proxy", "1 worker, core 1", proc, port)
        elif key == "nginx-https":
            conf = nginx_proxy_conf(self.workdir / key, port, up, self.tls)
            proc = self._nginx(key, conf, PROXY_CPU)
            run = Running(key, "nginx proxy → https upstream", "1 worker, core 1", proc, port)
        elif key == "haproxy":
            cfg = self.workdir / "haproxy.cfg"
            cfg.write_text(haproxy_conf(port, up))
            proc = spawn("haproxy", t.pinned([t.haproxy, "-db", "-f", str(cfg)], PROXY_CPU), self.workdir)
            run = Running(key, "HAProxy", "nbthread 1, core 1", proc, port)
        elif key in ("caddy", "caddy-default"):
            cfg = self.workdir / f"{key}.Caddyfile"
            cfg.write_text(caddyfile(port, up))
            home = self.workdir / f"{key}-home"
            home.mkdir(exist_ok=True)
            # Caddy keeps state under $HOME / XDG dirs: point them into the temp dir.
            env = {"HOME": str(home), "XDG_DATA_HOME": str(home), "XDG_CONFIG_HOME": str(home)}
            cmd = [t.caddy, "run", "--config", str(cfg), "--adapter", "caddyfile"]
            if key == "caddy":
                proc = spawn(key, t.pinned(cmd, PROXY_CPU), self.workdir, env={**env, "GOMAXPROCS": "1"})
                run = Running(key, "Caddy", "GOMAXPROCS=1, core 1", proc, port)
            else:
                proc = spawn(key, t.pinned(cmd, None), self.workdir, env=env)
                run = Running(key, "Caddy (default)", f"GOMAXPROCS={os.cpu_count()}, unpinned", proc, port)
        elif key == "naive":
            cmd = [sys.executable, str(HERE / "naive_proxy.py"), str(port), f"http://127.0.0.1:{up}"]
            proc = spawn("naive", t.pinned(cmd, PROXY_CPU), self.workdir)
            run = Running(key, "naive aiohttp", "1 process, core 1", proc, port)
        elif key in ("sidecar", "sidecar-baseline", "sidecar-https", "sidecar-ratelimit", "sidecar-shared"):
            admin = free_port()
            policy = self.workdir / f"{key}.yaml"
            extra = RATE_LIMIT_LOCAL if key == "sidecar-ratelimit" else ""
            if key == "sidecar-shared":
                extra = rate_limit_shared(self.start_redis())
            policy.write_text(sidecar_policy(port, admin, up, self.tls if key == "sidecar-https" else None, extra))
            cmd = [sys.executable, "-m", "proxy", "run", "--config", str(policy), "--no-watch"]
            # cwd and PYTHONPATH name the checkout, so `-m proxy` runs that code whatever is installed.
            code = self.baseline if key == "sidecar-baseline" else REPO
            if code is None:
                raise BenchError("sidecar-baseline needs --baseline REV")
            env = {TOKEN_ENV: self.token, "PYTHONPATH": str(code)}
            proc = spawn(key, t.pinned(cmd, PROXY_CPU), self.workdir, env=env, cwd=code)
            name = {
                "sidecar": "seawall sidecar",
                "sidecar-https": "seawall sidecar → https upstream",
                "sidecar-ratelimit": "seawall sidecar, rate_limit (local, not reached)",
                "sidecar-shared": "seawall sidecar, rate_limit shared via redis (not reached)",
            }.get(key, f"seawall sidecar @ {self.baseline_rev}")
            run = Running(key, name, "1 process, core 1", proc, port, admin)
        else:
            raise BenchError(f"unknown system {key!r}")
        wait_ready(run.proc, f"http://127.0.0.1:{port}/")
        return run

    def admin(self, run: Running, action: str) -> None:
        status, _, body = http(
            "POST",
            f"http://127.0.0.1:{run.admin_port}/breakers/{UPSTREAM_NAME}/{action}",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        if status != 200:
            raise BenchError(f"sidecar admin {action} answered {status}: {body[:200]!r}")


ALL_SYSTEMS = (
    "direct",
    "nginx",
    "haproxy",
    "caddy",
    "caddy-default",
    "naive",
    "sidecar",
    "nginx-https",
    "sidecar-https",
    "sidecar-ratelimit",
    "sidecar-shared",
)
# The HTTPS-upstream rows: each system with an https upstream, against itself with the plain one.
HTTPS_PAIRS = (("sidecar-https", "sidecar"), ("nginx-https", "nginx"))


# ----------------------------------------------------------------------------------------------- wrk ----


UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def run_wrk(tools: Tools, url: str, connections: int, seconds: int, latency: bool = False) -> dict[str, Any]:
    cmd = [tools.wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s"]
    if latency:
        cmd.append("--latency")
    cmd.append(url)
    out = subprocess.run(
        tools.pinned(cmd, LOADGEN_CPU), capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    if out.returncode != 0:
        raise BenchError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    text = out.stdout
    result: dict[str, Any] = {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),  # type: ignore[union-attr]
        "requests": int(re.search(r"(\d+) requests in", text).group(1)),  # type: ignore[union-attr]
        "non_2xx": 0,
        "socket_errors": 0,
    }
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        result["non_2xx"] = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        result["socket_errors"] = sum(int(g) for g in m.groups())
    for pct, value, unit in re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M):
        result[f"p{pct}_us"] = float(value) * UNITS[unit]
    return result


@contextlib.contextmanager
def background_wrk(tools: Tools, url: str, seconds: int) -> Iterator[None]:
    cmd = tools.pinned([tools.wrk, "-t1", "-c50", f"-d{seconds}s", url], LOADGEN_CPU)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        try:
            proc.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_openloop(tools: Tools, port: int, rate: int, seconds: float) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(HERE / "openloop.py"),
        "--port",
        str(port),
        "--rate",
        str(rate),
        "--duration",
        str(seconds),
        "--warmup",
        "1",
    ]
    out = subprocess.run(
        tools.pinned(cmd, LOADGEN_CPU), capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    if out.returncode != 0:
        raise BenchError(f"open-loop sender failed: {out.stderr.strip()[-500:]}")
    return dict(json.loads(out.stdout))


# ------------------------------------------------------------------------------------------- measure ----


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


SETTLE_SECONDS = 2.0


def measure_throughput(bench: Bench, runs: list[Running], mode: Mode) -> dict[str, dict[str, Any]]:
    """Idle RSS, then closed-loop throughput in interleaved rounds (a, b, c, a, b, c, ...).

    Interleaving spreads slow drifts of a shared machine (other jobs, thermal) over every system instead of
    penalising whichever happened to run during a busy minute. CPU is counted per system over its own runs.
    """
    time.sleep(0.5)
    res = {
        r.key: {
            "key": r.key,
            "label": r.label,
            "workers": r.workers,
            "rss_idle_mb": rss_mb(r.proc.pid),
            "rps_runs": [],
            "requests": 0,
            "cpu_s": 0.0,
        }
        for r in runs
    }
    for run in runs:
        run_wrk(bench.tools, f"http://127.0.0.1:{run.port}/", 50, mode.warmup_seconds)  # warm pools; not kept
    for i in range(mode.runs):
        # The order reverses each round (a, b, c, c, b, a, ...): a system is not always measured right after the
        # same neighbour, nor always at the same point of a round.
        for run in runs if i % 2 == 0 else reversed(runs):
            # Let the previous system finish closing its 50 connections (and collect garbage) first: it shares
            # core 1 with the next one, whose run would otherwise pay for it.
            time.sleep(SETTLE_SECONDS)
            cpu0 = cpu_seconds(run.proc.pid)
            r = run_wrk(bench.tools, f"http://127.0.0.1:{run.port}/", 50, mode.tput_seconds)
            row = res[run.key]
            row["cpu_s"] += cpu_seconds(run.proc.pid) - cpu0
            row["rps_runs"].append(r["rps"])
            row["requests"] += r["requests"]
            if r["non_2xx"] or r["socket_errors"]:
                log(f"  {run.key}: run {i + 1} had {r['non_2xx']} non-2xx, {r['socket_errors']} socket errors")
            log(f"  round {i + 1}: {run.key} {r['rps']:,.0f} rps")
    for row in res.values():
        row["rps"] = statistics.median(row["rps_runs"])
        row["cpu_s_per_10k"] = row["cpu_s"] / row["requests"] * 10_000 if row["requests"] else None
    return res


def measure_latency_and_bodies(bench: Bench, run: Running, mode: Mode, res: dict[str, Any]) -> None:
    tools, url = bench.tools, f"http://127.0.0.1:{run.port}"
    c1 = run_wrk(tools, url + "/", 1, mode.c1_seconds, latency=True)
    res["c1"] = {"rps": c1["rps"], "p50_us": c1.get("p50_us"), "p99_us": c1.get("p99_us")}
    log(f"  {run.key}: one connection p50 {c1.get('p50_us')} µs")

    res["open"] = {}
    for rate in mode.open_rates:
        # Open-loop rates only make sense below the knee; above ~80% of max throughput queues just grow.
        if rate > 0.8 * res["rps"]:
            res["open"][str(rate)] = {"skipped": f"above knee ({res['rps']:,.0f} max)"}
            continue
        o = run_openloop(tools, run.port, rate, mode.open_seconds)
        res["open"][str(rate)] = o
        log(f"  {run.key}: open loop {rate} rps p50/p99/p99.9 {o['p50_us']}/{o['p99_us']}/{o['p999_us']} µs")

    res["bodies"] = {}
    for name in ("1k", "1m"):
        r = run_wrk(tools, f"{url}/files/{name}", 50, mode.body_seconds)
        res["bodies"][name] = r["rps"]
        if r["non_2xx"] or r["socket_errors"]:
            log(f"  {run.key}: /files/{name} had {r['non_2xx']} non-2xx, {r['socket_errors']} socket errors")
    log(f"  {run.key}: 1 KiB {res['bodies']['1k']:,.0f} rps, 1 MiB {res['bodies']['1m']:,.0f} rps")
    res["rss_after_mb"] = rss_mb(run.proc.pid)


def measure_long(bench: Bench, run: Running, rps_hint: float) -> dict[str, Any]:
    """RSS before and after at least LONG_REQUESTS requests at 50 connections, bounded in time."""
    url, pid = f"http://127.0.0.1:{run.port}/", run.proc.pid
    # Baseline after a short small-body load, not after the 1 MiB runs (their buffers are freed later, which
    # would make the growth look negative).
    done = run_wrk(bench.tools, url, 50, 5)["requests"]
    time.sleep(1)
    before, start = rss_mb(pid), time.monotonic()
    while done < LONG_REQUESTS and time.monotonic() - start < LONG_MAX_SECONDS:
        left = LONG_REQUESTS - done
        seconds = max(5, min(60, int(left / max(rps_hint, 1) * 1.1) + 1))
        done += run_wrk(bench.tools, url, 50, seconds)["requests"]
        log(f"  sidecar long run: {done:,} requests, RSS {rss_mb(pid):.1f} MiB")
    time.sleep(1)
    after = rss_mb(pid)
    return {
        "requests": done,
        "rss_before_mb": before,
        "rss_after_mb": after,
        "growth_mb": after - before,
        "complete": done >= LONG_REQUESTS,
    }


def measure_failfast(bench: Bench, run: Running, mode: Mode) -> dict[str, Any]:
    """Breaker forced open (admin API) vs proxied, in adjacent pairs so both see the same machine load."""
    url = f"http://127.0.0.1:{run.port}/"
    proxied, failfast = [], []
    for _ in range(mode.runs):
        proxied.append(run_wrk(bench.tools, url, 50, mode.tput_seconds)["rps"])
        bench.admin(run, "force-open")
        try:
            status, headers, _ = http("GET", url)
            reason = {k.lower(): v for k, v in headers.items()}.get("x-sidecar-reason")
            if status != 503 or reason != "breaker_open":
                raise BenchError(f"breaker forced open but the sidecar answered {status} reason={reason}")
            failfast.append(run_wrk(bench.tools, url, 50, mode.tput_seconds)["rps"])
        finally:
            bench.admin(run, "reset")
    log(f"  sidecar fail-fast: {statistics.median(failfast):,.0f} rps vs {statistics.median(proxied):,.0f} proxied")
    return {
        "rps": statistics.median(failfast),
        "rps_runs": failfast,
        "proxied_rps": statistics.median(proxied),
        "proxied_runs": proxied,
    }


def _py_spy_under_load(bench: Bench, run: Running, fmt: str, path: Path, seconds: int) -> None:
    """Record ``seconds`` of the sidecar under wrk load into ``path`` (py-spy format ``fmt``)."""
    assert bench.tools.py_spy is not None
    # --nonblocking: sample without pausing the process, so profiling barely perturbs what it measures.
    cmd = bench.tools.pinned(
        [bench.tools.py_spy, "record", "--nonblocking", "--rate", "250", "-d", str(seconds),
         "--format", fmt, "-o", str(path), "--pid", str(run.proc.pid)],
        LOADGEN_CPU,
    )  # fmt: skip
    with background_wrk(bench.tools, f"http://127.0.0.1:{run.port}/", seconds + 2):
        time.sleep(0.5)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise BenchError(f"py-spy failed: {done.stderr.strip()[-500:]}")


def profile(bench: Bench, run: Running, out: Path, seconds: int) -> dict[str, Any]:
    """py-spy the sidecar under wrk load: a flame graph (SVG) and a raw collapsed-stack file we summarise."""
    files = {"flamegraph": out / "profile.svg", "raw": out / "profile.txt"}
    for fmt, path in files.items():
        _py_spy_under_load(bench, run, fmt, path, seconds)
    summary = summarise_profile(files["raw"])
    # The fail-fast path too: with the breaker forced open nothing reaches the upstream, so what remains is
    # the sidecar's own per-request cost.
    failfast_raw = out / "profile-failfast.txt"
    bench.admin(run, "force-open")
    try:
        _py_spy_under_load(bench, run, "raw", failfast_raw, seconds)
    finally:
        bench.admin(run, "reset")
    summary["failfast"] = summarise_profile(failfast_raw)
    return summary


def short_frame(frame: str, keep_line: bool = False) -> str:
    # "handle (/x/y/site-packages/aiohttp/web.py:12)" → "handle (aiohttp/web.py)": group by function
    # (or by line, for self time, where the line says which call inside the function is the cost).
    m = re.match(r"(.*) \((.*?)(:\d+)?\)$", frame)
    if not m:
        return frame
    func, path, line = m.groups()
    for marker in ("site-packages/", "lib/python3.11/", "lib/python3.12/", "lib/python3.13/", str(REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{func} ({path}{line or '' if keep_line else ''})"


def raw_stacks(raw: Path) -> Iterator[tuple[list[str], int]]:
    """py-spy's raw format (``-f raw``): per line a stack, root to leaf, frames joined by ';', then its count."""
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            yield stack.split(";"), int(count_text)


def summarise_profile(raw: Path, top: int = 15) -> dict[str, Any]:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for raw_frames, count in raw_stacks(raw):
        frames = [short_frame(f) for f in raw_frames]
        total += count
        own[short_frame(raw_frames[-1], keep_line=True)] += count
        for frame in set(frames):
            inclusive[frame] += count
    pct = (lambda c: round(100 * c / total, 1)) if total else (lambda c: 0.0)
    return {
        "samples": total,
        "self": [(f, pct(c)) for f, c in own.most_common(top)],
        "inclusive": [
            (f, pct(c)) for f, c in inclusive.most_common(top * 3) if not any(marker in f for marker in ENTRY_FRAMES)
        ][:top],
    }


# Frames under every sample (interpreter start-up, the event loop runner): no information in their totals.
ENTRY_FRAMES = (
    "(<frozen",
    "(proxy/__main__.py)",
    "(proxy/cli.py)",
    "run_command (proxy/server.py)",
    "(uvloop/__init__.py)",
    "Runner.run (asyncio/runners.py)",
    "run (asyncio/runners.py)",
)


# -------------------------------------------------------------------------------------------- report ----


def fmt_us(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.0f} µs"


def fmt_n(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def render(results: list[dict[str, Any]], extra: dict[str, Any], meta: dict[str, Any]) -> str:
    by = {r["key"]: r for r in results}
    side, direct = by.get("sidecar"), by.get("direct")
    side_rps = side["rps"] if side else None
    direct_p50 = direct["c1"]["p50_us"] if direct else None
    rates = [int(r) for r in meta["open_rates"]]
    lines = [
        "# Seawall benchmark results",
        "",
        f"Mode **{meta['mode']}**, {meta['date']}, {meta['machine']}.",
        f"Load average (1/5/15 min) at start {meta['loadavg']}, at end {meta['loadavg_end']}"
        + (f", nice {meta['nice']}" if meta.get("nice") is not None else "")
        + ".",
        f"Tools: {meta['versions']}. Sidecar code: {meta['sidecar_code']}.",
        "",
        "Closed loop: `wrk -t1 -c50`, median of "
        f"{meta['runs']} × {meta['tput_seconds']} s. Load generator on core {LOADGEN_CPU}, proxies on core "
        f"{PROXY_CPU} (except Caddy default), upstream nginx unpinned.",
        "",
        "## Throughput, CPU and memory (small body, 50 connections)",
        "",
        "| system | workers | rps | sidecar ÷ system | CPU s / 10k req | RSS idle MiB | RSS after MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['workers']} | {fmt_n(r['rps'])} | {ratio(side_rps, r['rps'])} | "
            f"{r['cpu_s_per_10k']:.3f} | {r['rss_idle_mb']:.1f} | {r['rss_after_mb']:.1f} |"
        )
    lines += [
        "",
        "## Latency",
        "",
        "One connection (`wrk -c1`): p50 and the p50 added over calling nginx directly. Open loop: requests "
        "on a fixed schedule, latency from the scheduled send time (HdrHistogram), p50 / p90 / p99 / p99.9.",
        "The last column is how late the sender itself was at worst (it is descheduled too on a busy machine); "
        "tails of that order may be the load generator's, not the system's.",
        "",
        "| system | p50 @1 conn | added p50 | "
        + " | ".join(f"open loop {x} rps" for x in rates)
        + " | sender max lag |",
        "|---|---:|---:|" + "---:|" * (len(rates) + 1),
    ]
    for r in results:
        p50 = r["c1"]["p50_us"]
        added = (
            fmt_us(p50 - direct_p50) if (p50 is not None and direct_p50 is not None and r["key"] != "direct") else "–"
        )
        cells = []
        for rate in rates:
            o = r["open"].get(str(rate), {})
            if "skipped" in o:
                cells.append(o["skipped"])
            elif o:
                bad = o["non_2xx"] + o["unanswered"]
                cells.append(
                    " / ".join(fmt_us(o[k]) for k in ("p50_us", "p90_us", "p99_us", "p999_us"))
                    + (f" ({bad} failed)" if bad else "")
                )
            else:
                cells.append("–")
        lags = [o["max_send_lag_us"] for o in r["open"].values() if "max_send_lag_us" in o]
        cells.append(fmt_us(max(lags)) if lags else "–")
        lines.append(f"| {r['label']} | {fmt_us(p50)} | {added} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Response bodies (50 connections)",
        "",
        "| system | small rps | 1 KiB rps | 1 MiB rps | 1 MiB throughput |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        mib = r["bodies"]["1m"]
        lines.append(
            f"| {r['label']} | {fmt_n(r['rps'])} | {fmt_n(r['bodies']['1k'])} | {fmt_n(mib)} | {mib / 1024:.2f} GiB/s |"
        )
    if pairs := [(by[h], by[p]) for h, p in HTTPS_PAIRS if h in by and p in by]:
        lines += [
            "",
            "## HTTPS upstream (50 connections)",
            "",
            "The same upstream nginx behind TLS (TLS 1.3, a trustme CA; verified, SNI, keep-alive, sessions "
            "resumable): the sidecar with an `https://` target and nginx with `proxy_pass https://` "
            "(`keepalive 64`, `proxy_ssl_session_reuse on`), each against its own plain-HTTP throughput.",
            "",
            "| system | plain-HTTP rps | HTTPS-upstream rps | HTTPS ÷ plain | CPU s / 10k req (HTTPS) |",
            "|---|---:|---:|---:|---:|",
        ]
        for https, plain in pairs:
            lines.append(
                f"| {https['label']} | {fmt_n(plain['rps'])} | {fmt_n(https['rps'])} | "
                f"{https['rps'] / plain['rps']:.0%} | {https['cpu_s_per_10k']:.3f} |"
            )
    if side:
        lines += ["", "## Sidecar specifics", ""]
        if ff := extra.get("failfast"):
            lines.append(
                f"- Fail-fast (breaker forced open via admin, 503 `breaker_open` answers): "
                f"**{fmt_n(ff['rps'])} rps** vs {fmt_n(ff['proxied_rps'])} proxied in adjacent runs "
                f"({ratio(ff['rps'], ff['proxied_rps'])})."
            )
        if lg := extra.get("long"):
            lines.append(
                f"- RSS after {lg['requests']:,} requests: {lg['rss_before_mb']:.1f} → "
                f"{lg['rss_after_mb']:.1f} MiB (growth {lg['growth_mb']:+.1f} MiB)"
                + ("" if lg["complete"] else " — stopped early at the time cap")
                + "."
            )
        lines += ["", "## Targets (issues 8 and 21)", "", "| target | measured | |", "|---|---|---|"]
        lines += [f"| {name} | {measured} | {verdict} |" for name, measured, verdict in targets(by, extra)]
    if prof := extra.get("profile"):
        lines += [
            "",
            f"## Sidecar profile (py-spy, {prof['samples']} samples under wrk -c50)",
            "",
            "Flame graph: [profile.svg](profile.svg).",
            "",
            "| self time | % |",
            "|---|---:|",
        ]
        lines += [f"| `{f}` | {p} |" for f, p in prof["self"]]
        lines += ["", "| inclusive time | % |", "|---|---:|"]
        lines += [f"| `{f}` | {p} |" for f, p in prof["inclusive"]]
        if ff_prof := prof.get("failfast"):
            lines += [
                "",
                f"Fail-fast path (breaker forced open), {ff_prof['samples']} samples:",
                "",
                "| self time | % |",
                "|---|---:|",
            ]
            lines += [f"| `{f}` | {p} |" for f, p in ff_prof["self"][:10]]
            lines += ["", "| inclusive time | % |", "|---|---:|"]
            lines += [f"| `{f}` | {p} |" for f, p in ff_prof["inclusive"][:10]]
    if tcp := extra.get("tcp"):
        sys.path.insert(0, str(REPO))
        from tests.benchmarks import tcp_relay

        lines += ["", *tcp_relay.render(tcp["systems"], tcp["rounds"], tcp["gib"])]
    if grpc := extra.get("grpc"):
        sys.path.insert(0, str(REPO))
        from tests.benchmarks import grpc_bench

        lines += ["", *grpc_bench.render(grpc["systems"], grpc["rounds"], grpc["seconds"])]
    lines += ["", "![throughput](throughput.png)", ""]
    return "\n".join(lines)


def targets(by: dict[str, dict[str, Any]], extra: dict[str, Any]) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    side = by["sidecar"]

    def check(name: str, measured: str, ok: bool | None) -> None:
        out.append((name, measured, "–" if ok is None else ("met" if ok else "**missed**")))

    for key, want, label in (
        ("naive", 3.0, "≥ 3× naive aiohttp"),
        ("caddy", 1.0, "≥ 1.0× Caddy (1 proc)"),
        ("caddy-default", 1.0, "≥ 1.0× Caddy (default)"),
        ("caddy", 1.5, "stretch: ≥ 1.5× Caddy (1 proc)"),
    ):
        if key in by:
            x = side["rps"] / by[key]["rps"]
            check(label, f"{x:.2f}×", x >= want)
    if "direct" in by and side["c1"]["p50_us"] is not None and by["direct"]["c1"]["p50_us"] is not None:
        added = side["c1"]["p50_us"] - by["direct"]["c1"]["p50_us"]
        check("added p50 at 1 connection ≤ 100 µs", fmt_us(added), added <= 100)
    o, d = side["open"].get("1000", {}), by.get("direct", {}).get("open", {}).get("1000", {})
    if "p99_us" in o:
        check("p99 at 1000 rps open loop ≤ 1 ms", fmt_us(o["p99_us"]), o["p99_us"] <= 1000)
        if "p99_us" in d:
            added = o["p99_us"] - d["p99_us"]
            check("added p99 at 1000 rps open loop ≤ 1 ms", fmt_us(added), added <= 1000)
    if ff := extra.get("failfast"):
        x = ff["rps"] / ff["proxied_rps"]
        check("fail-fast ≥ 2× proxied", f"{x:.2f}×", x >= 2)
    if "sidecar-https" in by:
        x = by["sidecar-https"]["rps"] / side["rps"]
        check("HTTPS upstream ≥ 50% of plain-HTTP throughput", f"{x:.0%}", x >= 0.5)
    if "sidecar-ratelimit" in by:
        x = by["sidecar-ratelimit"]["rps"] / side["rps"]
        check("local rate_limit not reached: ≥ 95% of the sidecar's throughput", f"{x:.0%}", x >= 0.95)
    if "sidecar-shared" in by:
        x = by["sidecar-shared"]["rps"] / side["rps"]
        check("shared rate_limit (redis): throughput, for the record", f"{x:.0%}", True)
    if grpc := extra.get("grpc"):
        sys.path.insert(0, str(REPO))
        from tests.benchmarks import grpc_bench

        for name, measured, ok in grpc_bench.checks(grpc["systems"]):
            check(name, measured, ok)
    check("idle RSS ≤ 60 MB", f"{side['rss_idle_mb']:.1f} MiB", side["rss_idle_mb"] * 1.048576 <= 60)
    if lg := extra.get("long"):
        check(
            "RSS growth after 1M requests < 10 MB",
            f"{lg['growth_mb']:+.1f} MiB",
            lg["growth_mb"] * 1.048576 < 10 and lg["complete"],
        )
    return out


def chart(results: list[dict[str, Any]], extra: dict[str, Any], rates: tuple[int, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: write a file, never open a window
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in results]
    colors = ["#c44e52" if r["key"] == "sidecar" else "#4c72b0" for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))

    values = [r["rps"] for r in results]
    if ff := extra.get("failfast"):
        labels, values, colors = [*labels, "sidecar\nbreaker open"], [*values, ff["rps"]], [*colors, "#dd8452"]
    bars = ax1.bar(range(len(values)), values, color=colors)
    ax1.bar_label(bars, labels=[f"{v / 1000:.1f}k" for v in values], fontsize=8)
    ax1.set_xticks(
        range(len(values)), [lbl.replace(" (", "\n(") for lbl in labels], fontsize=8, rotation=30, ha="right"
    )
    ax1.set_ylabel("requests / s (wrk -t1 -c50, median)")
    ax1.set_title("Closed-loop throughput, small body")

    rate = str(rates[0])
    pcts = (("p50_us", "p50"), ("p90_us", "p90"), ("p99_us", "p99"), ("p999_us", "p99.9"))
    shown = [r for r in results if "p50_us" in r["open"].get(rate, {})]
    width = 0.8 / len(pcts)
    for i, (key, name) in enumerate(pcts):
        ax2.bar([j + i * width for j in range(len(shown))], [r["open"][rate][key] for r in shown], width, label=name)
    ax2.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(shown))],
        [r["label"].replace(" (", "\n(") for r in shown],
        fontsize=8,
        rotation=30,
        ha="right",
    )
    ax2.set_yscale("log")
    if shown:  # head room above the tallest bar so the legend never covers one
        ax2.set_ylim(top=4 * max(r["open"][rate]["p999_us"] for r in shown))
    ax2.set_ylabel("latency from scheduled send, µs (log)")
    ax2.set_title(f"Open-loop latency at {rate} rps")
    ax2.legend(fontsize=8, ncol=4, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def checkout(rev: str, where: Path) -> tuple[Path, str]:
    """A detached worktree of this repository at ``rev``; (its path, the short commit)."""
    git = need("git", "git")
    short = subprocess.run(
        [git, "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True, text=True, timeout=10, check=False
    )
    if short.returncode != 0:
        raise BenchError(f"--baseline {rev}: not a revision of this repository")
    subprocess.run(
        [git, "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(where), rev], check=True, timeout=60
    )
    return where, short.stdout.strip()


def code_version() -> str:
    """Which sidecar code was measured: the commit, and whether proxy/ had uncommitted changes."""
    git = shutil.which("git")
    if git is None:
        return "unknown (git not found)"
    head = subprocess.run(
        [git, "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        [git, "-C", str(REPO), "status", "--porcelain", "--", "proxy"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout.strip()
    return f"{head or '?'}{' + uncommitted changes in proxy/' if dirty else ''}"


def versions(tools: Tools) -> str:
    def first_line(cmd: list[str]) -> str:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"

    nginx = first_line([tools.nginx, "-v"]).split("/")[-1]
    haproxy = first_line([tools.haproxy, "-v"]).split()[2]
    caddy = first_line([tools.caddy, "version"]).split()[0]
    wrk = first_line([tools.wrk, "-v"]).split()[1]
    return f"nginx {nginx}, HAProxy {haproxy}, Caddy {caddy}, wrk {wrk}, Python {platform.python_version()}"


# ---------------------------------------------------------------------------------------------- main ----


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short run per measurement (debugging)")
    parser.add_argument("--long", action="store_true", help="also the sidecar's RSS after 1,000,000 requests")
    parser.add_argument("--profile", action="store_true", help="also py-spy the sidecar under load")
    parser.add_argument(
        "--systems", default=",".join(ALL_SYSTEMS), help=f"comma-separated subset of {','.join(ALL_SYSTEMS)}"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench-results", help="where results land")
    parser.add_argument(
        "--nice",
        type=int,
        metavar="N",
        help="run every benchmark process at this nice level (e.g. -5 on a busy shared machine)",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="measure nothing: re-render results.md and the chart from an earlier results.json",
    )
    parser.add_argument("--keep-temp", action="store_true", help="keep the temp dir with configs and logs")
    parser.add_argument(
        "--tcp",
        action="store_true",
        help="also the TCP relay rows (tcp_relay.py: bulk GiB/s, redis-benchmark -P1 vs HAProxy mode tcp)",
    )
    parser.add_argument(
        "--grpc",
        action="store_true",
        help="also the gRPC rows (grpc_bench.py: unary calls/s and CPU per call, direct vs nginx grpc_pass vs sidecar)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run the sidecar at git revision REV (a temporary worktree) as 'sidecar-baseline', interleaved "
        "with the others: before/after a change in one run",
    )
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    keys = [k.strip() for k in args.systems.split(",") if k.strip()]
    if unknown := set(keys) - set(ALL_SYSTEMS):
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")

    if args.from_json is not None:
        data = json.loads(args.from_json.read_text())
        extra = {k: v for k, v in data.items() if k not in ("meta", "systems")}
        write_results(args.out, data["meta"], data["systems"], extra)
        return 0

    try:
        tools = Tools.locate(args.profile)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    if args.nice is not None:
        tools.nice = [need("nice", "coreutils"), "-n", str(args.nice)]
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="seawall-bench-"))
    bench = Bench(tools, workdir)
    if args.baseline:
        try:
            bench.baseline, bench.baseline_rev = checkout(args.baseline, workdir / "baseline")
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2
        keys.append("sidecar-baseline")
    meta = {
        "mode": mode.name,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "runs": mode.runs,
        "tput_seconds": mode.tput_seconds,
        "open_rates": mode.open_rates,
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, {platform.system()} {platform.release()}",
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "versions": versions(tools),
    }
    meta["nice"] = args.nice
    meta["sidecar_code"] = code_version()
    if tools.taskset is None:
        log("taskset not found: running everything unpinned (noisier numbers)")
    results: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    upstream: Proc | None = None
    running: list[Running] = []
    try:
        upstream = bench.start_upstream()
        log(f"upstream nginx on 127.0.0.1:{bench.upstream_port}, work dir {workdir}")
        for key in keys:
            log(f"{key}: starting")
            running.append(bench.start(key, upstream))
        tput = measure_throughput(bench, running, mode)
        for run in running:
            log(f"{run.key}: latency and bodies")
            measure_latency_and_bodies(bench, run, mode, tput[run.key])
            results.append(tput[run.key])
            if run.key == "sidecar":
                if args.long:
                    extra["long"] = measure_long(bench, run, tput[run.key]["rps"])
                extra["failfast"] = measure_failfast(bench, run, mode)
                if args.profile:
                    extra["profile"] = profile(bench, run, args.out, 5 if args.quick else 10)
        if args.tcp:
            sys.path.insert(0, str(REPO))  # bench.py runs as a script
            from tests.benchmarks import tcp_relay

            gib = 0.5 if args.quick else 2.0
            log("tcp relay: direct, HAProxy mode tcp, sidecar by splice and by protocols")
            tcp = tcp_relay.run(tools, list(tcp_relay.SYSTEMS), mode.runs, gib)
            extra["tcp"] = {"rounds": mode.runs, "gib": gib, "systems": tcp}
        if args.grpc:
            sys.path.insert(0, str(REPO))
            from tests.benchmarks import grpc_bench

            rounds, seconds = max(mode.runs, 3), mode.tput_seconds  # issue 21 asks for at least 3 rounds
            log("grpc: direct, nginx grpc_pass, sidecar protocol: grpc")
            profile_seconds = (5 if args.quick else 10) if args.profile else 0
            grpc = grpc_bench.run(
                tools, list(grpc_bench.SYSTEMS), rounds, seconds, 50, profile_seconds, args.out / "profile-grpc.txt"
            )
            extra["grpc"] = {"rounds": rounds, "seconds": seconds, "systems": grpc}
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        for run in running:
            if run.proc is not upstream:
                run.proc.stop()
        if upstream is not None:
            upstream.stop()
        if bench.redis is not None:
            bench.redis.stop()
        if bench.baseline is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(bench.baseline)], check=False)
        if args.keep_temp:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    meta["loadavg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    write_results(args.out, meta, results, extra)
    return 0


def write_results(out: Path, meta: dict[str, Any], results: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = render(results, extra, meta)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"meta": meta, "systems": results, **extra}, indent=2))
    chart(results, extra, tuple(meta["open_rates"]), out / "throughput.png")
    print(text)
    log(f"wrote {out / 'results.md'} and {out / 'throughput.png'}")


if __name__ == "__main__":
    sys.exit(main())
