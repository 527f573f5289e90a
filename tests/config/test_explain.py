"""``sidecar explain``: the arithmetic of a policy's consequences, and the contradictions it flags."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from proxy.policy.explain import explain_command, explain_upstream
from proxy.policy.loader import load_text
from proxy.policy.model import UpstreamPolicy


def policy(upstream: str = "", defaults: str = "") -> UpstreamPolicy:
    text = (
        "defaults:\n  retry: {jitter: false}\n"
        + defaults
        + "upstreams:\n  api:\n    listen: 127.0.0.1:15001\n    targets: [http://api:8000]\n"
        + upstream
    )
    config, issues = load_text(text, "p.yaml", environ={})
    assert config is not None, [str(i) for i in issues]
    return config.upstream("api")


def test_the_original_design_numbers() -> None:
    """3 retries, 1s → 2s → 4s, per_try 5s, total 15s: 27s unbounded, 15s worst case, 3 tries fit."""
    ex = explain_upstream(policy())
    assert ex.attempts == 4
    assert ex.backoffs == [1.0, 2.0, 4.0]
    assert ex.unbounded_wait == 27.0
    assert ex.worst_wait == 15.0
    assert ex.attempts_when_timing_out == 3
    assert ex.amplification == 4.0
    text = "\n".join(ex.consequences)
    assert "waits at most 15s" in text and "4 attempts × 5s per_try + backoff 1s + 2s + 4s = 27s" in text
    assert "caps it to about 1.2×" in text
    assert "The breaker opens after 5 failures within 60s. It then stays open 60s" in text
    assert "Counted as failures by the breaker: connect_error, timeout, reset, bad_response, 5xx" in text
    assert ex.contradictions == []


def test_passing_checks_end_the_open_interval_into_half_open_and_calls_decide() -> None:
    text = "\n".join(explain_upstream(policy("    health: {path: /health}\n")).consequences)
    assert (
        "A passing check after the breaker opened ends the open interval early (half-open, health_check_passed) "
        "instead of after 60s: the next request is the probe that closes or re-opens it. Once such a probe fails"
    ) in text, text
    assert "closes it (health_check_passed)" not in text
    config, issues = load_text(
        "upstreams:\n  db:\n    protocol: tcp\n    listen: 127.0.0.1:15432\n    targets: [db:5432]\n"
        "    health: {probe: connect, healthy_threshold: 3}\n",
        "p.yaml",
    )
    assert config is not None, [str(i) for i in issues]
    text = "\n".join(explain_upstream(config.upstream("db")).consequences)
    assert "3 passing checks in a row after the breaker opened end the open interval early" in text
    assert "the next connection is the probe" in text


def test_backoff_is_capped_by_max_delay() -> None:
    ex = explain_upstream(
        policy(
            "    retry: {max_retries: 5, base_delay: 250ms, max_delay: 1s}\n    timeouts: {per_try: 1s, total: 30s}\n"
        )
    )
    assert ex.backoffs == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert ex.worst_wait == ex.unbounded_wait == 6 * 1.0 + 3.75


def test_total_shorter_than_a_try_and_a_backoff_makes_retries_dead() -> None:
    ex = explain_upstream(policy("    timeouts: {per_try: 5s, total: 5500ms}\n"))
    assert ex.attempts_when_timing_out == 1
    assert any("retries are dead for timeouts" in c for c in ex.contradictions)


def test_post_in_methods_is_flagged() -> None:
    ex = explain_upstream(policy("    retry: {methods: [GET, POST]}\n"))
    assert any(c.startswith("POST is in retry.methods") for c in ex.contradictions)


def test_a_closed_budget_disables_retries() -> None:
    ex = explain_upstream(policy("    retry: {budget: {ratio: 0, min_per_second: 0}}\n"))
    assert ex.amplification == 1.0
    assert any("no retry is ever allowed" in c for c in ex.contradictions)


def test_no_budget_means_full_amplification() -> None:
    ex = explain_upstream(policy("    retry: {budget: null}\n"))
    assert any("4× the client traffic" in c and "no retry budget" in c for c in ex.consequences)


def test_slow_calls_longer_than_per_try_are_never_seen() -> None:
    ex = explain_upstream(policy("    breaker: {slow_call_duration: 6s, slow_call_rate_threshold: 50}\n"))
    assert any("before it can count as slow" in c for c in ex.contradictions)


def test_per_try_shorter_than_connect_is_flagged() -> None:
    """The loader rejects this, but explain's rule stands alone for policies built in code."""
    import dataclasses

    base = policy()
    odd = dataclasses.replace(base, timeouts=dataclasses.replace(base.timeouts, connect=3.0, per_try=2.0))
    assert any("connect never applies" in c for c in explain_upstream(odd).contradictions)


def test_tcp_upstreams_are_not_retried() -> None:
    config, _ = load_text(
        "upstreams:\n  db:\n    protocol: tcp\n    listen: 127.0.0.1:15432\n    targets: [db:5432]\n", "p.yaml"
    )
    assert config is not None
    ex = explain_upstream(config.upstream("db"))
    assert ex.attempts == 1 and ex.amplification == 1.0
    assert any("Nothing is retried" in c for c in ex.consequences)


def test_command_for_one_upstream_and_for_an_unknown_one(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "upstreams:\n  api:\n    listen: 127.0.0.1:15001\n    targets: [http://api:8000]\n"
        "  db:\n    protocol: tcp\n    listen: 127.0.0.1:15432\n    targets: [db:5432]\n"
    )
    out = io.StringIO()
    assert explain_command(str(path), "db", out) == 0
    text = out.getvalue()
    assert text.startswith("upstream db (tcp): 127.0.0.1:15432 → db:5432")
    assert "effective policy:" in text and "upstream api" not in text
    out = io.StringIO()
    assert explain_command(str(path), "apo", out) == 1
    assert "no upstream named 'apo' (did you mean 'api'?)" in out.getvalue()


def test_command_on_a_broken_file_prints_the_errors(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "upstreams:\n  api:\n    listen: 127.0.0.1:15001\n    targets: [http://api:8000]\n"
        "    breaker: {failure_threshold: 0}\n"
    )
    out = io.StringIO()
    assert explain_command(str(path), None, out) == 1
    assert out.getvalue().startswith(f"{path}:5:15: upstreams.api.breaker.failure_threshold: must be ≥ 1")


@pytest.mark.parametrize(
    "name",
    [
        "minimal.yaml",
        "risk-manager-strict.yaml",
        "training-orchestrator-shadow.yaml",
        "exchange-api-mtls.yaml",
        "exchange-api.yaml",
        "grpc-model-server.yaml",
    ],
)
def test_the_examples_explain_without_contradictions(name: str) -> None:
    path = Path(__file__).resolve().parents[2] / "config" / "examples" / name
    out = io.StringIO()
    assert explain_command(str(path), None, out, environ={}) == 0
    assert "contradictions:" not in out.getvalue()
