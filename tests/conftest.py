"""Shared fixtures. Real servers on loopback; time injected where the logic is pure."""

from __future__ import annotations

from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture
def artifacts_dir() -> Path:
    """Where tests leave screenshots and reports for a person to look at (ignored by git)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
