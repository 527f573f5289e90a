"""Structured logs: one JSON object per line on stderr, with the ``extra`` fields a record carries."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class Throttled:
    """At most one line per ``interval`` seconds per key; the next line says how many were held back.

    For conditions that can recur thousands of times a second (running out of file descriptors) and would
    otherwise drown the log and cost the CPU the sidecar is short of."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object, extra: dict[str, Any] | None = None) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self._interval) < self._interval:
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        self._logger.warning(msg, *args, extra={**(extra or {}), "event": key, "suppressed": held})


_ACCEPT_EXHAUSTED = "socket.accept() out of system resource"


def throttle_accept_exhaustion(loop: asyncio.AbstractEventLoop, logger: logging.Logger) -> None:
    """asyncio logs one error with a traceback per failed accept while descriptors are out (up to a hundred per
    wake-up, with accepting paused a second in between): one line a second, with a count, says the same."""
    throttled = Throttled(logger)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith(_ACCEPT_EXHAUSTED):
            throttled.warning("accept_out_of_resources", "accepting paused: %s", context.get("exception"))
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
