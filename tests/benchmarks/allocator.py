"""The malloc thresholds of ``sidecar run`` on and off, interleaved in one run (issue #19).

    python tests/benchmarks/allocator.py                      # ~6 minutes: 3 rounds, no 1M-request runs
    python tests/benchmarks/allocator.py --long               # + RSS after 1,000,000 small requests per sidecar
    python tests/benchmarks/allocator.py --rounds 1 --seconds 2 --systems nginx,sidecar-off,sidecar  # a check

Systems: ``nginx`` and ``haproxy`` (references), ``sidecar`` (as shipped: ``mallopt`` at start),
``sidecar-off`` (``SIDECAR_MALLOC=off``: glibc's defaults), ``sidecar-env`` (the same thresholds through
``GLIBC_TUNABLES``, set before the process starts), ``sidecar-small`` (``GLIBC_TUNABLES`` with mmap 4 MiB /
trim 32 MiB). Each round, each system in turn: 64 KiB and 1 MiB answers (``wrk -t1 -c50``, GiB/s, the proxy's
minor page faults per response from /proc/PID/stat and its CPU s/GiB) and 1 MiB uploads (``wrk -t1 -c4``, POST
with a Content-Length to the upstream's ``return 200``). RSS (MiB): idle after start, after the rounds
(body-heavy), 35 s later (the shipped sidecar gives free heap pages back every 30 s), and with ``--long``
before/after 1,000,000 small requests. Proxies pinned to core 1, wrk to core 0 (as in bench.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere in the checkout

from proxy.allocator import GIVE_BACK_EVERY
from tests.benchmarks import bench, uploads

MiB = 1 << 20
GiB = 1 << 30
SMALL_TUNABLES = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=33554432"
# Environment of each sidecar variant (the key "sidecar" is what ships: no variable set).
VARIANTS: dict[str, dict[str, str]] = {
    "sidecar": {},
    "sidecar-off": {"SIDECAR_MALLOC": "off"},
    "sidecar-env": {"GLIBC_TUNABLES": uploads.TUNABLES},
    "sidecar-small": {"GLIBC_TUNABLES": SMALL_TUNABLES},
}
SYSTEMS = ("nginx", "haproxy", *VARIANTS)
BODIES = {"64k": 64 << 10, "1m": MiB}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def minor_faults(root: int) -> int:
    total = 0
    for pid in bench.tree_pids(root):
        try:
            total += int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])  # minflt, field 10
        except OSError:
            continue
    return total


def start(b: bench.Bench, key: str, upstream: bench.Proc) -> bench.Running:
    if key not in VARIANTS:
        return b.start(key, upstream)
    names = ("SIDECAR_MALLOC", "GLIBC_TUNABLES")
    env = VARIANTS[key]
    with uploads.mapped_env(names[0], env.get(names[0])), uploads.mapped_env(names[1], env.get(names[1])):
        run = b.start("sidecar", upstream)
    run.key = key
    return run


def body(b: bench.Bench, run: bench.Running, name: str, seconds: int) -> dict[str, Any]:
    pid = run.proc.pid
    faults0, cpu0 = minor_faults(pid), bench.cpu_seconds(pid)
    r = bench.run_wrk(b.tools, f"http://127.0.0.1:{run.port}/files/{name}", 50, seconds)
    faults, cpu = minor_faults(pid) - faults0, bench.cpu_seconds(pid) - cpu0
    moved = r["requests"] * BODIES[name] / GiB
    return {
        "gib_s": r["rps"] * BODIES[name] / GiB,
        "faults_per_response": faults / r["requests"] if r["requests"] else None,
        "cpu_s_per_gib": cpu / moved if moved else None,
        "errors": r["non_2xx"] + r["socket_errors"],
    }


def one_round(b: bench.Bench, runs: list[bench.Running], seconds: int, log: Path, rows: dict[str, Any]) -> None:
    for run in runs:
        row = rows[run.key]
        for name in BODIES:
            time.sleep(bench.SETTLE_SECONDS)
            r = body(b, run, name, seconds)
            row[name].append(r)
            bench.log(f"  {run.key} {name}: {r['gib_s']:.2f} GiB/s, {r['faults_per_response']:.1f} faults/response")
        time.sleep(bench.SETTLE_SECONDS)
        up = uploads.upload(b, run, "/", False, seconds, log)
        row["upload"].append(up)
        bench.log(f"  {run.key} upload: {up['gib_s']:.2f} GiB/s {up['errors']}")


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}–{max(values):.2f}]"


def render(rows: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"Rounds: {meta['rounds']} × {meta['seconds']} s per measurement, interleaved; median [min–max].",
        f"Nice {meta['nice']}. Load average {meta['loadavg']} at start, {meta['loadavg_end']} at end.",
        "",
        "| system | 64 KiB GiB/s | faults/resp | CPU s/GiB | 1 MiB GiB/s | faults/resp | CPU s/GiB | "
        "1 MiB upload GiB/s | upload CPU s/GiB | RSS idle | RSS after bodies | 35 s later |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in rows.items():
        cells = [key]
        for name in BODIES:
            cells.append(spread([r["gib_s"] for r in row[name]]))
            cells.append(f"{statistics.median([r['faults_per_response'] for r in row[name]]):.1f}")
            cells.append(f"{statistics.median([r['cpu_s_per_gib'] for r in row[name]]):.2f}")
        cells.append(spread([r["gib_s"] for r in row["upload"]]))
        cells.append(f"{statistics.median([r['cpu_s_per_gib'] for r in row['upload']]):.2f}")
        cells += [f"{row['rss_idle_mb']:.1f}", f"{row['rss_bodies_mb']:.1f}", f"{row['rss_bodies_later_mb']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    longs = {k: row["long"] for k, row in rows.items() if "long" in row}
    if longs:
        lines += [
            "",
            "| system | requests | RSS before | RSS after | growth | after − idle |",
            "|---|---|---|---|---|---|",
        ]
        for key, lg in longs.items():
            lines.append(
                f"| {key} | {lg['requests']:,} | {lg['rss_before_mb']:.1f} | {lg['rss_after_mb']:.1f} | "
                f"{lg['growth_mb']:+.1f} | {lg['rss_after_mb'] - rows[key]['rss_idle_mb']:+.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--long", action="store_true", help="also RSS after 1,000,000 small requests per sidecar")
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    parser.add_argument("--nice", type=int, metavar="N", help="run every benchmark process at this nice level")
    args = parser.parse_args(argv)
    keys = [k for k in args.systems.split(",") if k]
    if unknown := set(keys) - set(SYSTEMS):
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    b = bench.Bench(bench.Tools.locate(False), Path(tempfile.mkdtemp(prefix="seawall-allocator-")))
    if args.nice is not None:
        b.tools.nice = [bench.need("nice", "coreutils"), "-n", str(args.nice)]
    meta: dict[str, Any] = {"nice": args.nice, "rounds": args.rounds, "seconds": args.seconds, "loadavg": loadavg()}
    runs: list[bench.Running] = []
    upstream = None
    rows: dict[str, Any] = {}
    try:
        upstream = b.start_upstream()
        log = b.workdir / "no-access-log"  # the bench upstream keeps none; upload() then counts 0 connections
        log.touch()
        for key in keys:
            runs.append(start(b, key, upstream))
        time.sleep(1.0)
        for run in runs:
            rows[run.key] = {"64k": [], "1m": [], "upload": [], "rss_idle_mb": bench.rss_mb(run.proc.pid)}
        for round_ in range(args.rounds):
            bench.log(f"round {round_ + 1}")
            one_round(b, runs, args.seconds, log, rows)
        time.sleep(bench.SETTLE_SECONDS)
        for run in runs:
            rows[run.key]["rss_bodies_mb"] = bench.rss_mb(run.proc.pid)
        time.sleep(GIVE_BACK_EVERY + 5)  # the shipped sidecar's malloc_trim has run at least once
        for run in runs:
            rows[run.key]["rss_bodies_later_mb"] = bench.rss_mb(run.proc.pid)
        if args.long:
            for run in runs:
                if run.key in VARIANTS:
                    bench.log(f"{run.key}: 1,000,000 requests")
                    rows[run.key]["long"] = bench.measure_long(b, run, 10_000)
    finally:
        for run in runs:
            run.proc.stop()
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(b.workdir, ignore_errors=True)
    meta["loadavg_end"] = loadavg()
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(render(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
