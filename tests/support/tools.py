"""Programs the suite starts for real (Chromium, Prometheus, redis-server, PostgreSQL, nginx, promtool, …).

Where one is not installed, a test that needs it is skipped on a developer's machine — and fails on CI (the
``CI`` environment variable set, as CI services do): ``make test`` installs every one of them, so a missing one
there means an install step broke, which must not pass silently. ``tests/conftest.py`` applies the same rule
to any other skip.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def on_ci() -> bool:
    """CI sets ``CI`` (``true``, ``1``, …); an empty value or ``false``/``0`` does not count."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(reason: str) -> NoReturn:
    """Skip the test for ``reason`` — or fail it on CI, where nothing may be missing."""
    if on_ci():
        pytest.fail(f"{reason}: on CI every tool must be installed (`make deps`)", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str, hint: str = "") -> str:
    """The path of program ``name`` on PATH; else skip (fail on CI) saying which program and package is absent."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed{f' ({hint})' if hint else ''}")
    return path
