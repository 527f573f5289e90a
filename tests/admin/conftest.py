"""Fixtures for the admin-plane tests (their helpers — admin calls, Prometheus, nginx — are in tests/support)."""

from __future__ import annotations

import pytest

from tests.support.admin import TOKEN


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    """The admin token, in the env var that ``write_policy`` names (SEAWALL_TEST_TOKEN)."""
    monkeypatch.setenv("SEAWALL_TEST_TOKEN", TOKEN)
    return TOKEN
