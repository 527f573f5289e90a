"""``sidecar schema``: generated from the model, committed for editors, and in agreement with the loader."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from proxy.policy.loader import load_text
from proxy.policy.schema import build_schema, schema_command

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "config" / "sidecar.schema.json"
SHIPPED = sorted(p for p in (ROOT / "config").rglob("*") if p.suffix in (".yaml", ".yml"))


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = build_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_committed_schema_is_what_sidecar_schema_prints() -> None:
    out = io.StringIO()
    assert schema_command(out) == 0
    assert COMMITTED.read_text(encoding="utf-8") == out.getvalue(), (
        "config/sidecar.schema.json is stale: regenerate it with `sidecar schema > config/sidecar.schema.json`"
    )


def _properties(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any], list[str]]]:
    found = [("", schema, schema.get("required", []))]
    found += [(name, sub, sub.get("required", [])) for name, sub in schema["$defs"].items()]
    return found


def test_every_field_has_a_description_and_a_default_unless_required() -> None:
    schema = build_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    for where, obj, required in _properties(schema):
        assert obj["additionalProperties"] is False, where
        for name, prop in obj["properties"].items():
            assert prop.get("description"), f"{where}.{name} has no description"
            assert "default" in prop or name in required, f"{where}.{name} has no default"


def test_defaults_are_the_upstream_schema_without_listen_targets_and_routes() -> None:
    defs = build_schema()["$defs"]
    upstream, defaults = defs["Upstream"]["properties"], defs["Defaults"]["properties"]
    assert set(upstream) - set(defaults) == {"listen", "targets", "routes"}
    assert defs["Upstream"]["required"] == ["listen", "targets"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_is_valid_for_the_schema_and_the_loader(
    path: Path, validator: jsonschema.Draft202012Validator
) -> None:
    text = path.read_text(encoding="utf-8")
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(yaml.safe_load(text))]
    assert errors == []
    config, issues = load_text(text, str(path), environ={})
    assert config is not None, [str(i) for i in issues]
    assert [i for i in issues if i.severity == "error"] == []


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_points_editors_at_the_schema(path: Path) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# yaml-language-server: $schema=")
    target = (path.parent / first.split("$schema=", 1)[1].strip()).resolve()
    assert target == COMMITTED


BASE = {"upstreams": {"a": {"listen": "127.0.0.1:15001", "targets": ["http://a:80"]}}}


def _with(path: str, value: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(BASE))
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("upstreams.a.breaker.failure_threshold", -1),
        ("upstreams.a.breaker.failure_treshold", 3),
        ("upstreams.a.timeouts.per_try", "5 seconds"),
        ("upstreams.a.protocol", "udp"),
        ("upstreams.a.listen", "localhost"),
        ("upstreams.a.retry.jitter", "sometimes"),
        ("upstreams.a.retry.retry_on", ["teapot"]),
        ("defaults.listen", "127.0.0.1:1"),
        ("admin.port", 9901),
        ("upstreams.bad name", {"listen": "127.0.0.1:1", "targets": ["http://a:80"]}),
    ],
)
def test_schema_and_loader_reject_the_same_mistakes(
    path: str, value: Any, validator: jsonschema.Draft202012Validator
) -> None:
    doc = _with(path, value)
    assert list(validator.iter_errors(doc)), "the schema accepted it"
    config, _ = load_text(yaml.safe_dump(doc), "p.yaml")
    assert config is None, "the loader accepted it"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("upstreams.a.breaker.failure_threshold", "${THRESHOLD:-3}"),
        ("upstreams.a.timeouts.per_try", 2.5),
        ("upstreams.a.timeouts.per_try", "1500ms"),
        ("upstreams.a.listen", "${LISTEN:-127.0.0.1:15009}"),
        ("upstreams.a.retry.retry_on", [503, "5xx", "gateway_error", "timeout"]),
        ("upstreams.a.retry.budget", None),
        ("upstreams.a.health", {"path": "/ready", "interval": "5s"}),
        ("allow_non_loopback", True),
    ],
)
def test_schema_and_loader_accept_the_same_good_values(
    path: str, value: Any, validator: jsonschema.Draft202012Validator
) -> None:
    doc = _with(path, value)
    assert list(validator.iter_errors(doc)) == []
    config, issues = load_text(yaml.safe_dump(doc), "p.yaml", environ={})
    assert config is not None, [str(i) for i in issues]
