"""compose/*.Dockerfile and .dockerignore: hadolint-clean, slim pinned base, non-root, tini, built from
this repository."""

from __future__ import annotations

import re
import tomllib

import pytest

from tests.support.deploy import COMPOSE_DIR, REPO, run_tool
from tests.support.tools import require_tool

DOCKERFILES = {"sidecar": COMPOSE_DIR / "sidecar.Dockerfile", "cleanup": COMPOSE_DIR / "cleanup.Dockerfile"}


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name: str) -> None:
    tool = require_tool("hadolint")
    result = run_tool(tool, "--no-color", str(DOCKERFILES[name]))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_shape(name: str) -> None:
    text = DOCKERFILES[name].read_text(encoding="utf-8")
    bases = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert bases, "no FROM"
    for base in bases:
        # python:<major>.<minor>.<patch>-slim-<debian>: pinned to a patch release, slim variant.
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+", base), base
    runtime = text[text.rindex("FROM") :]
    assert re.search(r"^USER\s+10001(:10001)?\s*$", runtime, re.MULTILINE), "runs as a non-root user"
    assert re.search(r"tini=\d", runtime), "tini installed, version pinned"
    assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "--", ', runtime, re.MULTILINE), "tini is PID 1"
    # Built from this repository, not from a registry.
    assert "COPY pyproject.toml README.md ./" in text


def test_sidecar_installs_the_project() -> None:
    text = DOCKERFILES["sidecar"].read_text(encoding="utf-8")
    assert re.search(r"^RUN pip install \.\s*$", text, re.MULTILINE)
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "sidecar"]' in text


def test_cleanup_installs_only_the_cleanup_extra() -> None:
    text = DOCKERFILES["cleanup"].read_text(encoding="utf-8")
    assert "RUN pip install '.[cleanup]'" in text
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "checkpoint-cleanup"]' in text
    # The extra must bring mlflow-skinny, never the full mlflow server distribution.
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extra = project["optional-dependencies"]["cleanup"]
    names = {re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower() for req in extra}
    assert "mlflow-skinny" in names
    assert "mlflow" not in names
    base = {re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower() for req in project["dependencies"]}
    assert "mlflow" not in base


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    lines = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for excluded in (".git", "tests", "**/__pycache__", ".venv", "**/.env"):
        assert excluded in lines, excluded
    for needed in ("pyproject.toml", "README.md", "proxy", "cleanup", "compose"):
        assert needed not in lines, f"{needed} is needed by the image builds"
