"""The sidecar's RSS while it serves a bounded load through a plain or an https target (issue 19's TLS leak).

    python tests/benchmarks/tls_churn.py --target https --close-every 10 --steps 5 --step-seconds 20
    python tests/benchmarks/tls_churn.py --target http --close-every 0    # steady keep-alive, plain

Layout (all on 127.0.0.1): wrk → ``python -m proxy run`` (a subprocess) → nginx (one worker) answering
``200 ok`` on a plain and a TLS port. ``--close-every N`` is nginx's ``keepalive_requests N``: the upstream closes
every connection after N answers, so the sidecar opens a new (TLS) connection every N requests; 0 keeps them
open. After a warm-up step, each step runs wrk for ``--step-seconds`` and prints the requests served so far and
the sidecar's RSS (``/proc/PID/status``); then the load stops and the idle RSS is printed after ``--idle`` seconds.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.benchmarks import bench  # noqa: E402
from tests.support.sidecar import free_port  # noqa: E402


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(match.group(1)) if match else 0


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key, ca_path = directory / "upstream.crt", directory / "upstream.key", directory / "ca.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_path))
    return cert, key, ca_path


def nginx_conf(prefix: Path, port: int, tls_port: int, cert: Path, key: Path, close_every: int) -> str:
    return (
        bench.nginx_common(prefix, keepalive_requests=close_every or 1_000_000)
        + f"""    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok\\n"; }}
    }}
    server {{
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        ssl_session_tickets on;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""
    )


def policy(listen: int, admin: int, target: str, ca: Path) -> str:
    tls = f"    tls: {{ca_file: {ca}, server_name: localhost}}\n" if target.startswith("https") else ""
    return f"""admin: {{listen: 127.0.0.1:{admin}}}
defaults:
  timeouts: {{connect: 1s, per_try: 5s, total: 10s}}
  retry: {{max_retries: 1, retry_on: [connect_error, reset]}}
upstreams:
  api:
    listen: 127.0.0.1:{listen}
    targets: ["{target}"]
{tls}"""


def wrk(port: int, seconds: float, connections: int) -> int:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    served = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        print(f"  ! {errors.group(1)} non-2xx answers", flush=True)
    return int(served.group(1)) if served else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=("http", "https"), default="https")
    parser.add_argument("--close-every", type=int, default=10, help="nginx keepalive_requests (0: keep open)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--step-seconds", type=float, default=20)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--idle", type=float, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tls-churn-") as tmp:
        work = Path(tmp)
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (work / kind).mkdir()
        cert, key, ca = make_tls(work)
        port, tls_port, listen, admin = free_port(), free_port(), free_port(), free_port()
        conf = work / "nginx.conf"
        conf.write_text(nginx_conf(work, port, tls_port, cert, key, args.close_every))
        nginx = subprocess.Popen([shutil.which("nginx") or "nginx", "-p", str(work), "-c", str(conf)])
        target = f"https://127.0.0.1:{tls_port}" if args.target == "https" else f"http://127.0.0.1:{port}"
        (work / "policy.yaml").write_text(policy(listen, admin, target, ca))
        log = (work / "sidecar.log").open("wb")
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(work / "policy.yaml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
        )
        try:
            for _ in range(200):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=0.2)
                    break
                except OSError:
                    time.sleep(0.05)
            print(f"target {target}, close every {args.close_every or 'never'}, pid {sidecar.pid}", flush=True)
            print(f"start           rss {rss_kib(sidecar.pid) / 1024:7.1f} MiB", flush=True)
            total = wrk(listen, args.step_seconds, args.connections)
            print(f"warm-up {total:>8} requests, rss {rss_kib(sidecar.pid) / 1024:7.1f} MiB", flush=True)
            for _ in range(args.steps):
                total += wrk(listen, args.step_seconds, args.connections)
                print(f"        {total:>8} requests, rss {rss_kib(sidecar.pid) / 1024:7.1f} MiB", flush=True)
            time.sleep(args.idle)
            print(f"idle {args.idle:g}s           rss {rss_kib(sidecar.pid) / 1024:7.1f} MiB", flush=True)
        finally:
            sidecar.terminate()
            sidecar.wait(10)
            nginx.terminate()
            nginx.wait(10)
            log.close()


if __name__ == "__main__":
    main()
