"""``routes:`` in the policy language: merged over the upstream's keys, judged with file:line, explained, in the schema."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from proxy.policy.explain import explain_command, explain_upstream
from proxy.policy.loader import load_text
from proxy.policy.schema import build_schema

HEAD = """\
defaults:
  timeouts: {connect: 500ms, per_try: 2s, total: 10s}
  retry: {max_retries: 2, jitter: false}
upstreams:
  mlflow:
    listen: 127.0.0.1:15000
    targets: [http://mlflow:5000]
    retry: {base_delay: 200ms}
    routes:
"""


def issues_of(routes: str, head: str = HEAD) -> list[str]:
    _, issues = load_text(head + routes, "p.yaml", environ={})
    return [str(i) for i in issues]


def test_a_route_holds_the_upstream_policy_with_its_own_keys_over_it() -> None:
    config, issues = load_text(
        HEAD
        + "      - name: artifacts\n"
        + "        match: {path_prefix: /api/2.0/mlflow-artifacts/, methods: [put, GET]}\n"
        + "        timeouts: {per_try: 5m, total: 10m}\n"
        + "        retry: {max_retries: 0}\n"
        + "      - match: {path: /poll}\n",
        "p.yaml",
        environ={},
    )
    assert config is not None and issues == []
    artifacts, poll = config.upstream("mlflow").routes
    assert artifacts.name == "artifacts" and artifacts.match.methods == ("PUT", "GET")
    t = artifacts.timeouts
    assert (t.connect, t.per_try, t.total, t.idle) == (0.5, 300.0, 600.0, 300.0)  # connect from defaults
    assert (artifacts.retry.max_retries, artifacts.retry.base_delay) == (0, 0.2)  # base_delay from the upstream
    assert poll.name == "routes[1]" and poll.match.path == "/poll" and poll.match.methods is None
    assert poll.timeouts == config.upstream("mlflow").timeouts and poll.retry == config.upstream("mlflow").retry


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        ("      - match: {path: /a, path_prefix: /b}\n", "p.yaml:10:9: upstreams.mlflow.routes[0].match: give exactly"),
        ("      - match: {}\n", "p.yaml:10:9: upstreams.mlflow.routes[0].match: give exactly one of path and path_prefix"),
        ("      - match: {path: api}\n", "p.yaml:10:17: upstreams.mlflow.routes[0].match.path: a path starts with '/'"),
        ("      - match: {path: '/a?b=1'}\n", "routes[0].match.path: routes match the path without its query string"),
        ("      - match: {path: /a, mehtods: [GET]}\n", "routes[0].match.mehtods: unknown key (did you mean 'methods'?)"),
        ("      - match: {path: /a, methods: [G3T]}\n", "routes[0].match.methods[0]: expected an HTTP method name, got 'G3T'"),
        ("      - match: {path: /a, methods: []}\n", "routes[0].match.methods: an empty list matches nothing"),
        ("      - timeouts: {per_try: 1s}\n", "p.yaml:10:9: upstreams.mlflow.routes[0].match: a route needs a match"),
        ("      - match: {path: /a}\n        breaker: {}\n", "p.yaml:11:9: upstreams.mlflow.routes[0].breaker: unknown key"),
        ("      - match: {path: /a}\n        retry: {budget: null}\n", "routes[0].retry.budget: the retry budget is the upstream's"),
        ("      - match: {path: /a}\n        name: 'bad name'\n", "routes[0].name: route names are letters"),
        ("      - match: {path: /a}\n        timeouts: {per_try: 30s}\n",
         "p.yaml:11:20: upstreams.mlflow.routes[0].timeouts.per_try: per_try (30s) is longer than total (10s)"),
        ("      - match: {path: /a}\n        timeouts: {total: 1s}\n",
         "p.yaml:11:20: upstreams.mlflow.routes[0].timeouts.per_try: per_try (2s) is longer than total (1s)"),
        ("      - match: {path: /a}\n        timeouts: {connect: 3s}\n",
         "p.yaml:11:20: upstreams.mlflow.routes[0].timeouts.connect: connect (3s) is longer than per_try (2s)"),
        ("      - match: {path: /a}\n        retry: {max_delay: 100ms}\n",
         "p.yaml:11:17: upstreams.mlflow.routes[0].retry.max_delay: max_delay (100ms) is shorter than base_delay"),
        ("      - {name: a, match: {path: /a}}\n      - {name: a, match: {path: /b}}\n",
         "p.yaml:11:10: upstreams.mlflow.routes[1].name: 'a' is already the name of upstreams.mlflow.routes[0]"),
        ("      - /a\n", "p.yaml:10:9: upstreams.mlflow.routes[0]: expected a route"),
        ("      match: {path: /a}\n", "upstreams.mlflow.routes: expected a list of routes"),
    ],
)  # fmt: skip
def test_check_rejects_bad_routes_at_their_line(routes: str, expected: str) -> None:
    found = issues_of(routes)
    assert any(expected in issue for issue in found), found


def test_an_upstream_breaking_a_rule_on_its_own_is_told_once_not_once_per_route() -> None:
    head = HEAD.replace("    retry: {base_delay: 200ms}\n", "    timeouts: {per_try: 20s}\n")
    found = issues_of("      - match: {path: /a}\n        retry: {max_retries: 0}\n", head)
    assert found == ["p.yaml:8:16: upstreams.mlflow.timeouts.per_try: per_try (20s) is longer than total (10s)"]


def test_routes_belong_to_an_upstream_not_to_defaults_nor_to_tcp() -> None:
    text = (
        "defaults:\n  routes: [{match: {path: /a}}]\nupstreams:\n  db:\n    protocol: tcp\n"
        "    listen: 127.0.0.1:15432\n    targets: [db:5432]\n    routes: [{match: {path: /a}}]\n"
    )
    found = issues_of("", head=text)
    assert "p.yaml:2:3: defaults.routes: routes is set per upstream, not in defaults" in found
    assert "p.yaml:8:5: upstreams.db.routes: a tcp upstream has no HTTP routes" in found


def test_a_route_an_earlier_one_covers_is_warned_about() -> None:
    config, issues = load_text(
        HEAD
        + "      - {name: all-gets, match: {path_prefix: /api/, methods: [GET]}}\n"
        + "      - {match: {path: /api/x, methods: [GET]}}\n"
        + "      - {match: {path: /api/x}}\n",
        "p.yaml",
        environ={},
    )
    assert config is not None
    assert [str(i) for i in issues] == [
        "p.yaml:11:9: upstreams.mlflow.routes[1]: warning: never used: all-gets comes first and matches every "
        "request this route would"
    ]


def test_explain_shows_each_route_with_its_effective_policy(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        HEAD
        + "      - name: artifacts\n"
        + "        match: {path_prefix: /api/2.0/mlflow-artifacts/, methods: [PUT]}\n"
        + "        timeouts: {per_try: 5m, total: 10m, idle: 1m}\n"
        + "        retry: {max_retries: 0}\n"
    )
    out = io.StringIO()
    assert explain_command(str(path), None, out) == 0
    text = out.getvalue()
    assert "routes (first match wins; a request no route matches gets the policy above):" in text
    route = text.split("route artifacts: PUT path_prefix /api/2.0/mlflow-artifacts/", 1)[1]
    assert "per_try: 5m" in route and "idle: 60s" in route and "budget" not in route
    assert "A caller waits at most 5m for response headers: 1 attempt × 5m per_try = 5m, within total 10m" in route
    assert "Nothing is retried" in route
    # The timeout model, said once for the upstream and once per route with its numbers.
    assert "per_try 2s runs from the request's last byte sent to the response head" in text
    assert "silence longer than idle 60s in either direction" in route


def test_explain_flags_a_routes_own_contradictions() -> None:
    config, _ = load_text(HEAD + "      - {match: {path: /poll}, timeouts: {per_try: 10s}}\n", "p.yaml", environ={})
    assert config is not None
    ex = explain_upstream(config.upstream("mlflow"))
    assert ex.contradictions == []
    ((route, route_ex),) = ex.routes
    assert route.name == "routes[0]"
    assert any("retries are dead for timeouts" in c for c in route_ex.contradictions)


def _doc(routes: Any) -> dict[str, Any]:
    return {"upstreams": {"a": {"listen": "127.0.0.1:15001", "targets": ["http://a:80"], "routes": routes}}}


GOOD_ROUTES = [
    [{"match": {"path_prefix": "/api/"}}],
    [{"name": "up", "match": {"path": "/x", "methods": ["PUT"]}, "timeouts": {"per_try": "1m", "total": "2m"}}],
    [{"match": {"path": "/x"}, "retry": {"max_retries": 0, "methods": ["POST"]}}],
]
BAD_ROUTES = [
    [{"timeouts": {"per_try": "1s"}}],  # no match
    [{"match": {"path": "/a", "path_prefix": "/b"}}],
    [{"match": {}}],
    [{"match": {"path": "a"}}],
    [{"match": {"path": "/a?b"}}],
    [{"match": {"path": "/a", "methods": []}}],
    [{"match": {"path": "/a"}, "retry": {"budget": None}}],
    [{"match": {"path": "/a"}, "breaker": {}}],
]


@pytest.mark.parametrize("routes", GOOD_ROUTES)
def test_schema_and_loader_accept_the_same_routes(routes: Any) -> None:
    validator = jsonschema.Draft202012Validator(build_schema())
    assert list(validator.iter_errors(_doc(routes))) == []
    config, issues = load_text(yaml.safe_dump(_doc(routes)), "p.yaml", environ={})
    assert config is not None, [str(i) for i in issues]


@pytest.mark.parametrize("routes", BAD_ROUTES)
def test_schema_and_loader_reject_the_same_routes(routes: Any) -> None:
    validator = jsonschema.Draft202012Validator(build_schema())
    assert list(validator.iter_errors(_doc(routes))), "the schema accepted it"
    config, _ = load_text(yaml.safe_dump(_doc(routes)), "p.yaml", environ={})
    assert config is None, "the loader accepted it"


def test_the_schema_documents_routes_and_idle() -> None:
    defs = build_schema()["$defs"]
    assert defs["Upstream"]["properties"]["routes"]["items"] == {"$ref": "#/$defs/Route"}
    assert "routes" not in defs["Defaults"]["properties"]
    assert defs["Route"]["required"] == ["match"]
    assert "budget" not in defs["RouteRetry"]["properties"]
    assert defs["Timeouts"]["properties"]["idle"]["default"] == "5m"
