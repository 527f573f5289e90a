"""Interleaved A/B of sidecar variants: CPU time per request, round by round, to tell a few per cent apart.

bench.py compares systems; this compares one sidecar with itself (a config feature on and off, or the code
before a change) when the difference sought is smaller than a noisy machine's drift. Every variant runs once
per round, the order reversing each round (a, b, c, c, b, a, ...), each pinned to the proxy core with wrk on the
load core; a round's figure is the sidecar's CPU seconds (from /proc) over the requests wrk completed. Ratios are
taken within a round, against the first variant, then their median is reported: drift between rounds cancels.

    python tests/benchmarks/ab.py --variants sidecar,sidecar-ratelimit --rounds 8
    python tests/benchmarks/ab.py --variants sidecar,sidecar-baseline --baseline HEAD~1
    python tests/benchmarks/ab.py --variants sidecar,sidecar#2       # A/A: the noise between two equal processes
    python tests/benchmarks/ab.py --variants sidecar,sidecar@HEAD~3,sidecar@HEAD~9   # several revisions at once
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks.bench import (
    REPO,
    SETTLE_SECONDS,
    Bench,
    BenchError,
    Proc,
    Running,
    Tools,
    checkout,
    cpu_split,
    log,
    need,
    run_wrk,
)

# Per variant, per round: CPU µs per request, requests/s, CPU seconds, requests, user CPU seconds.
Seen = dict[str, list[tuple[float, float, float, int, float]]]

VARIANTS = ("sidecar", "sidecar-ratelimit", "sidecar-shared", "sidecar-baseline")


def rounds_of(bench: Bench, runs: list[Running], rounds: int, seconds: int, settle: float) -> Seen:
    """(CPU µs per request, requests/s) of every variant in every round, the order reversing each round."""
    for run in runs:
        run_wrk(bench.tools, f"http://127.0.0.1:{run.port}/", 50, 2)  # warm pools and caches; not kept
    seen: Seen = {run.key: [] for run in runs}
    for i in range(rounds):
        for run in runs if i % 2 == 0 else reversed(runs):
            time.sleep(settle)
            user0, system0 = cpu_split(run.proc.pid)
            r = run_wrk(bench.tools, f"http://127.0.0.1:{run.port}/", 50, seconds)
            user, system = cpu_split(run.proc.pid)
            user, cpu = user - user0, user + system - user0 - system0
            if r["non_2xx"] or r["socket_errors"] or not r["requests"]:
                raise BenchError(f"{run.key}: {r['non_2xx']} non-2xx, {r['socket_errors']} socket errors")
            seen[run.key].append((cpu / r["requests"] * 1e6, r["rps"], cpu, r["requests"], user))
            log(f"  round {i + 1}: {run.key} {r['rps']:,.0f} rps, {seen[run.key][-1][0]:.1f} µs CPU/request")
    return seen


def _start(bench: Bench, key: str, upstream: Proc, checkouts: list[Path]) -> Running:
    """A variant's sidecar; ``sidecar#2`` is a second process of the same variant (an A/A run: how far apart two
    identical processes measure on this machine); ``sidecar@REV`` the sidecar at git revision REV."""
    base, _, copy = key.partition("#")
    saved = bench.baseline, bench.baseline_rev  # --baseline's, for a sidecar-baseline variant
    if "@" in base:
        where = bench.workdir / f"code-{len(checkouts)}"
        bench.baseline, bench.baseline_rev = checkout(base.split("@", 1)[1], where)
        checkouts.append(where)
        base = "sidecar-baseline"
    run = bench.start(base, upstream)
    bench.baseline, bench.baseline_rev = saved
    if "@" in key:
        run.key = key
    if copy:
        run.key, run.label = key, f"{run.label} (copy {copy})"
    return run


def report(runs: list[Running], seen: Seen) -> str:
    """Medians and spreads of each variant, and its per-round ratios to the first variant (CPU and rps)."""
    first = seen[runs[0].key]
    lines = [
        "| variant | median rps | rps ÷ first (median, spread) | median CPU µs / request | spread "
        "| CPU ÷ first (median, spread) | pooled CPU µs / request (÷ first) | of it user / kernel |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    pooled_first = sum(row[2] for row in first) / sum(row[3] for row in first) * 1e6
    for run in runs:
        rows = seen[run.key]
        cpu = [row[0] for row in rows]
        cpu_ratios = [row[0] / f[0] for row, f in zip(rows, first, strict=True)]
        rps_ratios = [row[1] / f[1] for row, f in zip(rows, first, strict=True)]
        requests = sum(row[3] for row in rows)
        pooled = sum(row[2] for row in rows) / requests * 1e6
        user = sum(row[4] for row in rows) / requests * 1e6
        lines.append(
            f"| {run.label} | {statistics.median(row[1] for row in rows):,.0f} | {spread(rps_ratios)} "
            f"| {statistics.median(cpu):.1f} | {min(cpu):.1f} – {max(cpu):.1f} | {spread(cpu_ratios)} "
            f"| {pooled:.1f} ({pooled / pooled_first:.3f}) | {user:.1f} / {pooled - user:.1f} |"
        )
    return "\n".join(lines)


def spread(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.3f} ({min(ratios):.3f} – {max(ratios):.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="sidecar,sidecar-ratelimit", help=f"a subset of {','.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=5, help="length of one wrk run")
    parser.add_argument(
        "--settle", type=float, default=SETTLE_SECONDS, help="pause before each run (the last one's connections close)"
    )
    parser.add_argument("--baseline", metavar="REV", help="the code of sidecar-baseline")
    parser.add_argument("--nice", type=int, metavar="N")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    if unknown := {k.split("#")[0].split("@")[0] for k in keys} - set(VARIANTS):
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    if "sidecar-baseline" in keys and not args.baseline:
        parser.error("sidecar-baseline needs --baseline REV")
    # Every sidecar hashes alike: with per-process random hash seeds two identical sidecars measured up to 6 %
    # apart here (dict layouts differ); with one seed, within 1 %.
    os.environ.setdefault("PYTHONHASHSEED", "0")
    tools = Tools.locate(want_profile=False)
    if args.nice is not None:
        tools.nice = [need("nice", "coreutils"), "-n", str(args.nice)]
    workdir = Path(tempfile.mkdtemp(prefix="seawall-ab-"))
    bench = Bench(tools, workdir)
    upstream: Proc | None = None
    runs: list[Running] = []
    checkouts: list[Path] = []
    try:
        if args.baseline:
            bench.baseline, bench.baseline_rev = checkout(args.baseline, workdir / "baseline")
        upstream = bench.start_upstream()
        for key in keys:  # one by one: those started are stopped below even if a later one fails to start
            runs.append(_start(bench, key, upstream, checkouts))
        seen = rounds_of(bench, runs, args.rounds, args.seconds, args.settle)
    except BenchError as exc:
        print(f"ab: {exc}", file=sys.stderr)
        return 1
    finally:
        for run in runs:
            run.proc.stop()
        for proc in (upstream, bench.redis):
            if proc is not None:
                proc.stop()
        for where in {*checkouts, *([bench.baseline] if bench.baseline is not None else [])}:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)], check=False)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{args.rounds} rounds × {args.seconds} s, wrk -t1 -c50, order reversing each round\n")
    print(report(runs, seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
