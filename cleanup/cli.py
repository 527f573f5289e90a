"""``checkpoint-cleanup``: keep the best, the recent and the protected MLflow runs; reclaim the rest.

Exit status: 0 when every planned deletion succeeded (or, with ``--schedule``, after a clean stop),
1 when any run failed or the job could not plan at all, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from cleanup.budget import DEFAULT_MAX_CONSECUTIVE_FAILURES
from cleanup.client_retries import configure_client_retries
from cleanup.metric_mode import resolve_metric_mode
from cleanup.policy import DEFAULT_PROTECT_TAGS, RetentionPolicy
from cleanup.redact import redact_text

log = logging.getLogger("cleanup")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects NaN
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _protect_tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def _listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected [HOST:]PORT, got {text!r}") from None
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError("port must be 1-65535")
    # Port only: all interfaces, like every Prometheus exporter, so a scraper in another container reaches it.
    return (host.strip("[]") if sep else "0.0.0.0"), number


def _cron(text: str) -> str:
    from cleanup.schedule import validate_cron  # croniter is only needed with --schedule

    try:
        return validate_cron(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="checkpoint-cleanup",
        description=(
            "Retention for MLflow checkpoints. Per experiment, keep the best --top-n runs by --metric, "
            "every run from the last --retention-days, every protected run (tags, registered model "
            "versions and their aliases, parents of kept runs) and every unfinished run; delete the "
            "artifacts of the rest (archived first with --archive-path) and soft-delete those runs."
        ),
        epilog="Restore a deleted run from the archive: checkpoint-cleanup restore RUN_ID --archive-path PATH "
        "(see restore --help). Credentials come from MLflow's usual environment variables "
        "(MLFLOW_TRACKING_TOKEN, ...).",
    )
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="MLflow tracking server (http://mlflow:5000) or a local sqlite:///mlflow.db store "
        "(default: $MLFLOW_TRACKING_URI, else MLflow's local default)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    parser.add_argument(
        "--archive-path",
        type=Path,
        help="copy artifacts to <path>/<experiment_id>/<run_id>/ and verify them before deleting",
    )
    parser.add_argument("--retention-days", type=_non_negative_float, default=30.0, help="default: 30")
    parser.add_argument("--top-n", type=_non_negative_int, default=10, help="default: 10")
    parser.add_argument("--metric", default="sharpe_ratio", help="ranking metric (default: sharpe_ratio)")
    parser.add_argument(
        "--metric-mode",
        choices=("max", "min", "auto"),
        default="auto",
        help="max: higher is better, min: lower is better, auto: min when the metric's name says loss, "
        "error, drawdown, ... (with a warning), else max (default: auto)",
    )
    parser.add_argument(
        "--rank-by",
        choices=("last", "best"),
        default="last",
        help="rank by each run's latest value of --metric, or by the best value of its history "
        "(one extra request per run) (default: last)",
    )
    parser.add_argument(
        "--protect-tag",
        type=_protect_tag,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also protect runs with this tag (value case-insensitive; repeatable). Always protected: "
        + ", ".join(f"{k}={v}" for k, v in DEFAULT_PROTECT_TAGS),
    )
    parser.add_argument(
        "--allow-missing-metric",
        action="store_true",
        help="delete in experiments where no run has --metric (by default they are left alone)",
    )
    parser.add_argument(
        "--experiment",
        action="append",
        default=[],
        metavar="NAME_OR_ID",
        help="only clean these experiments (repeatable; default: all active experiments)",
    )
    parser.add_argument(
        "--include-deleted",
        action="store_true",
        help="also free runs users already deleted and the runs of deleted experiments (archived first with "
        "--archive-path; hard-deleted with --purge), except those a registered version or protect tag needs",
    )
    parser.add_argument(
        "--purge",
        action="store_true",
        help="also hard-delete the metadata of deleted runs (needs --backend-store-uri)",
    )
    parser.add_argument(
        "--backend-store-uri",
        default=os.environ.get("MLFLOW_BACKEND_STORE_URI"),
        help="the tracking server's database, for --purge (default: $MLFLOW_BACKEND_STORE_URI)",
    )
    parser.add_argument("--report", type=Path, metavar="FILE", help="write every run's decision as JSON")
    parser.add_argument(
        "--schedule",
        type=_cron,
        metavar="CRON",
        help='run forever on this cron schedule in UTC, e.g. "0 2 * * *" (default: run once)',
    )
    parser.add_argument(
        "--metrics-port",
        type=_listen_address,
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics on this port (all interfaces; 127.0.0.1:PORT for local only)",
    )
    parser.add_argument(
        "--textfile",
        type=Path,
        metavar="PATH",
        help="write Prometheus metrics to this node-exporter textfile (*.prom) after every run",
    )
    parser.add_argument(
        "--max-consecutive-failures",
        type=_non_negative_int,
        default=DEFAULT_MAX_CONSECUTIVE_FAILURES,
        metavar="N",
        help="stop the pass (report written, exit 1) after N runs in a row failed, e.g. because the "
        f"server went away (default: {DEFAULT_MAX_CONSECUTIVE_FAILURES}; 0: never)",
    )
    parser.add_argument(
        "--max-duration",
        type=_non_negative_float,
        metavar="SECONDS",
        help="stop the pass (report written, exit 1) once it has run this long (default: no limit)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every decision and MLflow call")
    return parser


class RedactingFormatter(logging.Formatter):
    """UTC timestamps, and credentials masked in every line (MLflow's errors quote full URLs)."""

    converter = time.gmtime  # type: ignore[assignment]  # typeshed wants a parameter; gmtime() has one

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%SZ"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    if not verbose:
        # MLflow and urllib3 chatter (and request URLs) stay out of the job's log unless asked for.
        for noisy in ("mlflow", "urllib3", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["restore"]:
        configure_logging("-v" in arguments or "--verbose" in arguments)
        configure_client_retries()
        from cleanup.restore import main as restore  # deferred like the runner: mlflow imports are slow

        return restore([a for a in arguments[1:] if a not in ("-v", "--verbose")])
    parser = build_parser()
    args = parser.parse_args(arguments)
    if args.purge and not args.backend_store_uri:
        parser.error("--purge needs --backend-store-uri (or $MLFLOW_BACKEND_STORE_URI)")
    configure_logging(args.verbose)
    retries = configure_client_retries()
    log.info("MLflow client: %s", ", ".join(f"{name}={value}" for name, value in retries.items()))
    explicit_mode = None if args.metric_mode == "auto" else args.metric_mode
    metric_mode, mode_warning = resolve_metric_mode(args.metric, explicit_mode)
    if mode_warning:
        log.warning("%s", mode_warning)
    policy = RetentionPolicy(
        top_n=args.top_n,
        metric=args.metric,
        metric_mode=metric_mode,
        rank_by=args.rank_by,
        retention_days=args.retention_days,
        protect_tags=DEFAULT_PROTECT_TAGS + tuple(args.protect_tag),
        allow_missing_metric=args.allow_missing_metric,
    )
    stop = threading.Event()
    _install_signal_handlers(stop)

    from cleanup.runner import Runner  # deferred: keeps `--help` fast (mlflow imports take seconds)

    try:
        runner = Runner.from_args(args, policy, stop, notes=[mode_warning] if mode_warning else [])
    except Exception as error:
        log.error("%s", error)
        return EXIT_FAILED
    if args.schedule:
        from cleanup.schedule import run_on_schedule

        run_on_schedule(args.schedule, runner.run_once, stop)
        return EXIT_OK
    ok = runner.run_once(None)
    return EXIT_OK if ok else EXIT_FAILED


def _install_signal_handlers(stop: threading.Event) -> None:
    def handle(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            raise SystemExit(128 + signum)
        log.info(
            "%s received: finishing the current step, then exiting (send again to force)",
            signal.Signals(signum).name,
        )
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
