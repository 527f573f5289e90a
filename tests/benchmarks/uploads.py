"""1 MiB uploads through each proxy: GiB/s and how many upstream connections they took (issue #19).

    python tests/benchmarks/uploads.py --baseline ea1547c            # ~1.5 minutes: sidecar, baseline, HAProxy
    python tests/benchmarks/uploads.py --systems haproxy,sidecar --rounds 1 --seconds 2

The upstream is nginx with two locations: ``/read`` reads each whole body before answering (request buffering,
then only the head proxied to a ``return 200`` server), ``/early`` answers at once (``return 200``) and drops the body
after, as nginx does — the upstream that answers before the request is all in. ``wrk -t1 -c4`` POSTs 1 MiB
bodies (with a Content-Length, or chunked in 16 pieces) for ``--seconds``, each system in turn, ``--rounds``
times (interleaved, the median kept); the proxy is pinned to core 1 and wrk to core 0, as in ``bench.py``.
Upstream connections are counted from nginx's access log (distinct ``$connection`` of the POSTs of a run).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere in the checkout

from tests.benchmarks import bench

MiB = 1 << 20
CONNECTIONS = 4
TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=134217728"
SYSTEMS = ("direct", "haproxy", "nginx", "sidecar")

UPSTREAM_CONF = """
    log_format conn '$connection $request_method';
    client_max_body_size 0;
    client_body_buffer_size 2m;
    upstream inner {{ server 127.0.0.1:{inner}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        access_log {log} conn;
        location / {{ return 200 "ok\\n"; }}
        location /early {{ return 200 "early\\n"; }}
        location /read {{
            proxy_pass http://inner/;  # after the whole body is read (request buffering); the inner gets none
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header Transfer-Encoding "";
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
    server {{ listen 127.0.0.1:{inner}; access_log off; location / {{ return 200 "read\\n"; }} }}
}}
"""

LUA = """
local body = string.rep("u", {size})
local chunked = {chunked}
local req
init = function()
  if chunked then
    local piece = string.rep("u", {size} / 16)
    local framed = {{}}
    for i = 1, 16 do framed[i] = string.format("%x\\r\\n", #piece) .. piece .. "\\r\\n" end
    req = "POST {path} HTTP/1.1\\r\\nHost: bench\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n"
      .. table.concat(framed) .. "0\\r\\n\\r\\n"
  else
    req = wrk.format("POST", "{path}", {{["Content-Type"] = "application/octet-stream"}}, body)
  end
end
request = function() return req end
"""


def start_upstream(b: bench.Bench) -> tuple[bench.Proc, Path]:
    prefix = b.workdir / "upstream"
    prefix.mkdir()
    for path in (b.workdir, prefix):
        path.chmod(0o755)  # nginx workers run unprivileged
    b.upstream_port = bench.free_port()
    log = prefix / "access.log"
    conf = bench.nginx_common(prefix) + UPSTREAM_CONF.format(port=b.upstream_port, inner=bench.free_port(), log=log)
    proc = b._nginx("upstream", conf, None)
    bench.wait_ready(proc, f"http://127.0.0.1:{b.upstream_port}/")
    return proc, log


@contextlib.contextmanager
def mapped_env(name: str, value: str | None) -> Iterator[None]:
    """``name=value`` in this process's environment (inherited by what it starts) for the block."""
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def upload(b: bench.Bench, run: bench.Running, path: str, chunked: bool, seconds: int, log: Path) -> dict[str, Any]:
    script = b.workdir / f"upload-{path.strip('/')}-{chunked}.lua"
    script.write_text(LUA.format(size=MiB, chunked="true" if chunked else "false", path=path))
    offset = log.stat().st_size if log.exists() else 0
    cpu0 = bench.cpu_seconds(run.proc.pid)
    cmd = [b.tools.wrk, "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script)]
    cmd.append(f"http://127.0.0.1:{run.port}{path}")
    out = subprocess.run(
        b.tools.pinned(cmd, bench.LOADGEN_CPU), capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    if out.returncode != 0:
        raise bench.BenchError(f"wrk failed: {out.stderr.strip() or out.stdout.strip()}")
    cpu = bench.cpu_seconds(run.proc.pid) - cpu0
    text = out.stdout
    requests_match = re.search(r"(\d+) requests in", text)
    rps_match = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if requests_match is None or rps_match is None:
        raise bench.BenchError(f"unexpected wrk output: {text}")
    requests, rps = int(requests_match.group(1)), float(rps_match.group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", text)
    time.sleep(0.3)  # nginx writes its log line as each request ends
    with log.open("rb") as f:
        f.seek(offset)
        posts = [line.split()[0] for line in f.read().decode().splitlines() if line.endswith(" POST")]
    return {
        "gib_s": rps * MiB / (1 << 30),
        "requests": requests,
        "upstream_posts": len(posts),
        "upstream_connections": len(set(posts)),
        "cpu_s_per_gib": cpu / (requests * MiB / (1 << 30)) if requests else None,
        "errors": errors.group(0) if errors else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default="haproxy,sidecar", help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--baseline", metavar="REV", help="also the sidecar at git revision REV")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--paths", default="/read,/early")
    parser.add_argument(
        "--malloc-tunables",
        action="store_true",
        help=f"start the sidecars (only) with GLIBC_TUNABLES={TUNABLES} (glibc keeps large buffers; since "
        "sidecar run sets the same thresholds itself, compare with SIDECAR_MALLOC=off in the environment)",
    )
    args = parser.parse_args(argv)
    keys = [k for k in args.systems.split(",") if k]
    tools = bench.Tools.locate(False)
    workdir = Path(tempfile.mkdtemp(prefix="seawall-uploads-"))
    b = bench.Bench(tools, workdir)
    if args.baseline:
        b.baseline, b.baseline_rev = bench.checkout(args.baseline, workdir / "baseline")
        keys.append("sidecar-baseline")
    runs: list[bench.Running] = []
    upstream = None
    rows: dict[tuple[str, str, bool], list[dict[str, Any]]] = {}
    try:
        upstream, log = start_upstream(b)
        for key in keys:
            tuned = args.malloc_tunables and key.startswith("sidecar")
            with mapped_env("GLIBC_TUNABLES", TUNABLES if tuned else None):
                runs.append(b.start(key, upstream))
        for round_ in range(args.rounds):
            for path in args.paths.split(","):
                for chunked in (False, True):
                    for run in runs:
                        time.sleep(1.0)
                        r = upload(b, run, path, chunked, args.seconds, log)
                        rows.setdefault((run.key, path, chunked), []).append(r)
                        bench.log(
                            f"round {round_ + 1} {run.key} {path} {'chunked' if chunked else 'length'}: "
                            f"{r['gib_s']:.2f} GiB/s, {r['requests']} POSTs, {r['upstream_connections']} upstream "
                            f"connections {r['errors']}"
                        )
    finally:
        for run in runs:
            if run.proc is not upstream:
                run.proc.stop()
        if upstream is not None:
            upstream.stop()
        if b.baseline is not None:
            subprocess.run(
                ["git", "-C", str(bench.REPO), "worktree", "remove", "--force", str(b.baseline)], check=False
            )
    print(f"\n1 MiB uploads, wrk -t1 -c{CONNECTIONS}, {args.rounds} × {args.seconds} s (median, [min–max])\n")
    print("| system | path | body | GiB/s | POSTs | upstream connections | CPU s/GiB |")
    print("|---|---|---|---|---|---|---|")
    for (key, path, chunked), results in rows.items():
        gib = [r["gib_s"] for r in results]
        cpu = [r["cpu_s_per_gib"] for r in results if r["cpu_s_per_gib"] is not None]
        print(
            f"| {key} | {path} | {'chunked' if chunked else 'length'} | {statistics.median(gib):.2f} "
            f"[{min(gib):.2f}–{max(gib):.2f}] | {sum(r['requests'] for r in results)} | "
            f"{'/'.join(str(r['upstream_connections']) for r in results)} | "
            f"{statistics.median(cpu):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
