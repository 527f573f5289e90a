"""Fixtures for the deployment tests: the compose file and the services' policies, parsed once per session.

The paths and the validators' runner are in tests/support/deploy.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.deploy import APP_SERVICES, COMPOSE_FILE, POLICY_DIR, load_yaml


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    """compose/docker-compose.yml as YAML (anchors and merge keys resolved, ${VAR} left as written)."""
    data = load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="session")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def policies() -> dict[str, dict[str, Any]]:
    return {service: load_yaml(POLICY_DIR / f"{service}.yaml") for service in APP_SERVICES}
