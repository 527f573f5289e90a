"""``protocol: grpc``: the grpc block, what other keys mean there, explain's words, and the shipped example."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from proxy.policy.explain import explain_command, explain_upstream
from proxy.policy.loader import load_text
from proxy.policy.model import UpstreamPolicy
from proxy.resilience.grpc import GrpcRules, GrpcStatus

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "examples" / "grpc-model-server.yaml"


def issues(text: str) -> list[str]:
    _, found = load_text(text, "p.yaml", environ={})
    return [str(i) for i in found]


def grpc_upstream(extra: str = "", defaults: str = "", target: str = "http://model:50051") -> str:
    body = "".join(f"    {line}\n" for line in extra.splitlines())
    top = f"defaults:\n{''.join(f'  {line}' + chr(10) for line in defaults.splitlines())}" if defaults else ""
    return (
        f"{top}upstreams:\n  model:\n    protocol: grpc\n    listen: 127.0.0.1:15100\n    targets: [{target}]\n{body}"
    )


def load(extra: str = "", defaults: str = "") -> UpstreamPolicy:
    config, found = load_text(grpc_upstream(extra, defaults), "p.yaml", environ={})
    assert config is not None, [str(i) for i in found]
    return config.upstream("model")


def test_the_defaults_follow_the_issue_table() -> None:
    up = load()
    assert up.grpc.retry_on == ("unavailable",)
    assert up.grpc.failure_on == ("unavailable", "deadline_exceeded", "internal", "unknown", "data_loss")
    assert up.grpc.rules() == GrpcRules()
    assert (up.grpc.timeout_offset, up.grpc.max_timeout) == (0.0, None)


def test_statuses_by_name_any_case_or_number_become_rules() -> None:
    up = load(
        "grpc: {retry_on: [UNAVAILABLE, 4, '13', resource-exhausted], failure_on: [14, not_found], "
        "timeout_offset: 50ms, max_timeout: 30s}"
    )
    assert up.grpc.retry_on == ("unavailable", "deadline_exceeded", "internal", "resource_exhausted")
    rules = up.grpc.rules()
    assert rules.retry_codes == {GrpcStatus(4), GrpcStatus(8), GrpcStatus(13), GrpcStatus(14)}
    assert rules.failure_codes == {GrpcStatus.UNAVAILABLE, GrpcStatus.NOT_FOUND}
    assert (rules.timeout_offset, rules.max_timeout) == (0.05, 30.0)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("unknown", "unknown cannot be retried: unknown says nothing of whether the server applied the call"),
        ("data_loss", "data_loss cannot be retried"),
        ("ok", "ok cannot be retried: ok is a success"),
        ("invalid_argument", "invalid_argument cannot be retried: invalid_argument is the server's answer"),
        ("0", "ok cannot be retried"),
        ("17", "gRPC status codes are 0–16, got 17"),
        ("unavailabel", "unknown gRPC status 'unavailabel' (did you mean 'unavailable'?)"),
    ],
)
def test_retry_on_refuses_statuses_outside_the_table_with_a_reason(value: str, message: str) -> None:
    found = issues(grpc_upstream(f"grpc: {{retry_on: [{value}]}}"))
    assert len(found) == 1
    assert found[0].startswith(f"p.yaml:6:23: upstreams.model.grpc.retry_on[0]: {message}")


def test_failure_on_refuses_ok_and_warns_about_resource_exhausted() -> None:
    assert issues(grpc_upstream("grpc: {failure_on: [ok]}")) == [
        "p.yaml:6:25: upstreams.model.grpc.failure_on[0]: ok is a success, never a failure"
    ]
    found = issues(grpc_upstream("grpc: {failure_on: [unavailable, resource_exhausted]}"))
    assert len(found) == 1
    assert found[0].startswith("p.yaml:6:12: upstreams.model.grpc.failure_on: warning: resource_exhausted is also")


def test_an_offset_not_shorter_than_the_cap_is_an_error() -> None:
    assert issues(grpc_upstream("grpc: {max_timeout: 1s, timeout_offset: 1s}")) == [
        "p.yaml:6:29: upstreams.model.grpc.timeout_offset: timeout_offset (1s) is not shorter than max_timeout "
        "(1s): every call with a deadline would be out of time at once"
    ]


@pytest.mark.parametrize("target", ["model:50051", "tcp://model:50051"])
def test_a_grpc_target_is_an_http_or_https_url(target: str) -> None:
    found = issues(grpc_upstream(target=target))
    assert len(found) == 1
    assert "upstreams.model.targets" in found[0]
    if "tcp://" not in target:
        assert "is not a grpc target (write http://host:port (h2c, prior knowledge) or https://host:port" in found[0]


def test_https_targets_are_grpc_over_tls() -> None:
    config, found = load_text(grpc_upstream(target="https://model:443"), "p.yaml", environ={})
    assert config is not None and found == []
    assert config.upstream("model").targets[0].is_tls


def test_the_grpc_block_on_another_protocol_is_an_error_unless_inherited() -> None:
    text = (
        "defaults:\n  grpc: {retry_on: [internal]}\nupstreams:\n  web:\n    listen: 127.0.0.1:15101\n"
        "    targets: [http://web:80]\n    grpc: {retry_on: [unavailable]}\n"
    )
    assert issues(text) == ["p.yaml:7:5: upstreams.web.grpc: grpc settings apply to protocol: grpc, not http"]
    inherited = text.rsplit("    grpc:", 1)[0]
    assert issues(inherited) == []


def test_http_retry_on_and_methods_point_at_grpc_retry_on_unless_inherited() -> None:
    found = issues(grpc_upstream("retry: {retry_on: [503], methods: [POST], max_retries: 1}"))
    assert [f.split(": ", 2)[1] for f in found] == ["upstreams.model.retry.retry_on", "upstreams.model.retry.methods"]
    assert "write grpc.retry_on" in found[0]
    up = load(defaults="retry: {retry_on: [503], methods: [GET], max_retries: 1}\nfallback: {body: x}")
    assert up.retry.max_retries == 1
    assert up.fallback is None  # inherited for the http upstreams; not this one's


def test_a_route_of_a_grpc_upstream_cannot_set_http_retry_keys() -> None:
    routes = "routes:\n  - match: {path: /pkg.Svc/Get}\n    retry: {retry_on: [503], max_retries: 0}"
    assert issues(grpc_upstream(routes)) == [
        "p.yaml:8:17: upstreams.model.routes[0].retry.retry_on: a grpc upstream retries by gRPC status (its "
        "grpc.retry_on): retry.retry_on does not apply"
    ]
    fine = load(
        "routes:\n  - match: {path_prefix: /pkg.Svc/}\n    timeouts: {per_try: 1s}\n    retry: {max_retries: 0}"
    )
    assert fine.routes[0].retry.max_retries == 0


def test_a_fallback_body_is_an_error_on_a_grpc_upstream() -> None:
    found = issues(grpc_upstream("fallback: {body: '{}'}"))
    assert found == [
        "p.yaml:6:5: upstreams.model.fallback: a grpc caller cannot read a fallback body: while the breaker is "
        "open it gets grpc-status 14 UNAVAILABLE with grpc-retry-pushback-ms"
    ]


def test_rate_limit_works_on_grpc_upstreams() -> None:
    up = load("rate_limit: {limits: [{requests: 100, per: 1s}]}")
    assert up.rate_limit is not None


def test_health_of_a_grpc_upstream_is_a_grpc_probe_unless_it_says_connect() -> None:
    health = load("health: {service: pkg.Svc}").health
    assert health is not None and (health.probe, health.service) == ("grpc", "pkg.Svc")
    health = load("health: {interval: 5s}").health
    assert health is not None and (health.probe, health.service) == ("grpc", "")
    health = load("health: {probe: connect}").health
    assert health is not None and health.probe == "connect"
    health = load("health: {interval: 5s}", defaults="health: {path: /healthz}").health  # inherited path: unused
    assert health is not None and health.probe == "grpc"


def test_health_keys_that_mean_nothing_for_grpc_are_errors() -> None:
    assert issues(grpc_upstream("health: {path: /healthz, probe: redis}")) == [
        "p.yaml:6:14: upstreams.model.health.path: a grpc upstream is probed with grpc.health.v1.Health/Check, "
        "not an HTTP path: name the service with service (empty: the server as a whole)",
        "p.yaml:6:30: upstreams.model.health.probe: a grpc upstream is probed with grpc or connect, not redis",
    ]
    assert issues(grpc_upstream("health: {probe: connect, service: x}")) == [
        "p.yaml:6:30: upstreams.model.health.service: service is the name a grpc probe asks about: it needs probe: grpc"
    ]


def test_a_grpc_probe_on_another_protocol_is_an_error() -> None:
    text = "upstreams:\n  db:\n    protocol: tcp\n    listen: 127.0.0.1:15432\n    targets: [db:5432]\n"
    assert issues(text + "    health: {probe: grpc}\n") == [
        "p.yaml:6:14: upstreams.db.health.probe: probe: grpc is for protocol: grpc upstreams, not tcp"
    ]


def test_explain_says_what_a_failure_is_what_is_retried_and_the_deadline_rule() -> None:
    up = load(
        "grpc: {retry_on: [unavailable, deadline_exceeded, resource_exhausted], timeout_offset: 50ms, "
        "max_timeout: 30s}\nretry: {max_retries: 2}"
    )
    said = " ".join(explain_upstream(up).consequences)
    assert "Counted as failures by the breaker: grpc-status unavailable, deadline_exceeded, internal" in said
    assert "Not counted: ok, cancelled" in said and "resource_exhausted" in said
    assert "Retried, before anything reached the client: grpc-status unavailable, deadline_exceeded" in said
    assert "REFUSED_STREAM" in said and "a stream lost after the upstream took it" in said
    assert "deadline_exceeded is retried only while the caller's deadline leaves time" in said
    assert "grpc-retry-pushback-ms up to max_delay" in said
    assert "The caller's grpc-timeout, capped at max_timeout 30s, less timeout_offset 50ms, bounds" in said
    assert "trailers-only grpc-status 14 UNAVAILABLE (breaker_open)" in said
    assert explain_upstream(up).attempts == 3


def test_the_example_checks_and_explains_without_contradictions() -> None:
    out = io.StringIO()
    assert explain_command(str(EXAMPLE), None, out, environ={}) == 0
    text = out.getvalue()
    assert "contradictions:" not in text
    assert "upstream model-server (grpc)" in text and "upstream feature-store (grpc)" in text
    assert "retry_on:\n      - unavailable\n      - resource_exhausted" in text
    config, found = load_text(EXAMPLE.read_text(encoding="utf-8"), str(EXAMPLE), environ={})
    assert config is not None and found == []
    model = config.upstream("model-server")
    assert model.health is not None and model.health.probe == "grpc"
    assert model.routes[0].timeouts.per_try == 25.0
