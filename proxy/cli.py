"""The ``sidecar`` command: run, check, schema, explain."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description="Seawall: a circuit-breaking sidecar proxy.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start the sidecar (SIGHUP reloads the file, SIGTERM drains and exits)")
    run.add_argument("--config", required=True, help="policy file (YAML)")
    run.add_argument(
        "--demo", action="store_true", help="also start a built-in demo upstream on 127.0.0.1:18080 (for trying it out)"
    )
    run.add_argument("--no-watch", action="store_true", help="reload only on SIGHUP, not when the file changes")
    run.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="override logging.level from the file"
    )

    check = sub.add_parser("check", help="validate policy files; one line per problem, exit 1 if any")
    check.add_argument("paths", nargs="+", metavar="PATH")

    sub.add_parser("schema", help="print the JSON Schema of the policy file")

    explain = sub.add_parser("explain", help="the effective policy per upstream, and what it means")
    explain.add_argument("path", metavar="PATH")
    explain.add_argument("upstream", nargs="?", metavar="UPSTREAM")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        from proxy.allocator import tune_malloc

        malloc = tune_malloc(os.environ)  # before the serving code is imported and allocates
        from proxy.server import run_command

        return run_command(
            args.config, demo=args.demo, watch=not args.no_watch, log_level=args.log_level, malloc=malloc
        )
    if args.command == "check":
        from proxy.policy.check import check_command
        from proxy.upstream.tls import checked

        return check_command(args.paths, sys.stdout, judge=lambda read: checked(read)[0])
    if args.command == "schema":
        from proxy.policy.schema import schema_command

        return schema_command(sys.stdout)
    if args.command == "explain":
        from proxy.policy.explain import explain_command

        return explain_command(args.path, args.upstream, sys.stdout)
    return 2
