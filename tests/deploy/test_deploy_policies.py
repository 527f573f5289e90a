"""config/services/<app>.yaml: one sidecar policy per app service, loadable by the sidecar itself."""

from __future__ import annotations

import shutil

import pytest

from tests.support.deploy import APP_SERVICES, POLICY_DIR, run_tool

SCHEMA_LINE = "# yaml-language-server: $schema=../sidecar.schema.json\n"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_policy_file_exists_with_schema_line(service: str) -> None:
    text = (POLICY_DIR / f"{service}.yaml").read_text(encoding="utf-8")
    assert text.startswith(SCHEMA_LINE)
    # Probes and Prometheus need the admin beyond loopback in containers; that is set by env, never here.
    assert 'listen: "${SIDECAR_ADMIN_LISTEN:-127.0.0.1:9901}"' in text


def test_sidecar_check_accepts_every_policy() -> None:
    sidecar = shutil.which("sidecar")
    assert sidecar is not None, "the sidecar command is not installed (pip install -e .)"
    result = run_tool(sidecar, "check", *(str(POLICY_DIR / f"{s}.yaml") for s in APP_SERVICES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_sidecar_loads_every_policy() -> None:
    from proxy.policy.loader import load_file

    for service in APP_SERVICES:
        config = load_file(POLICY_DIR / f"{service}.yaml", environ={})
        assert config is not None
