"""The policy loader: values, inheritance, and complaints that point at the exact file:line:column and key."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from proxy.policy.issues import ConfigError, ConfigIssue
from proxy.policy.loader import load_file, load_text
from proxy.policy.values import parse_duration

FILE = "policy.yaml"


def load(text: str, environ: dict[str, str] | None = None) -> tuple[object, list[ConfigIssue]]:
    return load_text(textwrap.dedent(text), FILE, environ or {})


def errors(text: str, environ: dict[str, str] | None = None) -> list[str]:
    config, issues = load(text, environ)
    assert config is None
    return [str(i) for i in issues if i.severity == "error"]


MINIMAL = """\
upstreams:
  a:
    listen: 127.0.0.1:15001
    targets: [http://a:8000]
"""

# -- durations -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("250ms", 0.25), ("1s", 1.0), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5), ("0", 0.0), (5, 5.0),
     (0.5, 0.5), (0, 0.0), ("3", 3.0)],
)  # fmt: skip
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value", ["-1s", -1, -0.001, "1d", "abc", "", "1S", "1e3", "s", True, None, math.nan, math.inf, [1]]
)
def test_bad_durations_are_rejected(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def test_a_negative_duration_in_a_file_names_the_key() -> None:
    text = MINIMAL + "    timeouts: {connect: -250ms}\n"
    assert errors(text) == [
        f"{FILE}:5:16: upstreams.a.timeouts.connect: expected a duration like 250ms, 1s or 2m, got '-250ms'"
    ]


# -- defaults and overrides ------------------------------------------------------------------------------------


def test_defaults_are_inherited_and_each_upstream_overrides_key_by_key() -> None:
    config, issues = load("""\
        defaults:
          timeouts: {connect: 250ms, per_try: 2s, total: 10s}
          breaker: {failure_threshold: 7, window: 2m}
          retry: {max_retries: 2, base_delay: 100ms, max_delay: 1s}
        upstreams:
          a:
            listen: 127.0.0.1:15001
            targets: [http://a:8000]
            breaker: {failure_threshold: 3}
          b:
            listen: 127.0.0.1:15002
            targets: [http://b]
            timeouts: {total: 20s}
            retry: {methods: [get, post], retry_on: [5xx, timeout]}
        """)
    assert issues == []
    assert config is not None
    a, b = config.upstream("a"), config.upstream("b")  # type: ignore[attr-defined]
    # a overrides one breaker key and keeps the rest of defaults.breaker
    assert (a.breaker.failure_threshold, a.breaker.window, a.breaker.open_duration) == (3, 120.0, 60.0)
    assert (a.timeouts.connect, a.timeouts.per_try, a.timeouts.total) == (0.25, 2.0, 10.0)
    assert (b.breaker.failure_threshold, b.breaker.window) == (7, 120.0)
    assert (b.timeouts.connect, b.timeouts.total) == (0.25, 20.0)
    assert (b.retry.max_retries, b.retry.base_delay, b.retry.max_delay) == (2, 0.1, 1.0)
    assert b.retry.methods == ("GET", "POST")
    assert 503 in b.retry.retry_statuses() and b.retry.retry_kinds() == {"timeout"}
    assert a.retry.methods == ("GET", "HEAD", "OPTIONS", "PUT", "DELETE")  # POST not retried by default
    assert str(b.targets[0]) == "http://b" and b.targets[0].port == 80


def test_built_in_defaults_are_the_original_designs_numbers() -> None:
    config, issues = load(MINIMAL)
    assert issues == []
    up = config.upstream("a")  # type: ignore[attr-defined]
    assert (up.breaker.failure_threshold, up.breaker.window, up.breaker.open_duration) == (5, 60.0, 60.0)
    assert (up.retry.max_retries, up.retry.base_delay, up.retry.max_delay) == (3, 1.0, 4.0)
    assert str(config.admin.listen) == "127.0.0.1:9901"  # type: ignore[attr-defined]


def test_listen_and_targets_belong_to_upstreams_not_defaults() -> None:
    text = "defaults:\n  listen: 127.0.0.1:1\n" + MINIMAL
    assert errors(text) == [f"{FILE}:2:3: defaults.listen: listen is set per upstream, not in defaults"]


# -- unknown keys ----------------------------------------------------------------------------------------------


def test_unknown_keys_are_errors_with_a_suggestion() -> None:
    text = MINIMAL + "    breaker: {failur_threshold: 3}\n    retyr: {}\n"
    assert errors(text) == [
        f"{FILE}:5:15: upstreams.a.breaker.failur_threshold: unknown key (did you mean 'failure_threshold'?)",
        f"{FILE}:6:5: upstreams.a.retyr: unknown key (did you mean 'retry'?)",
    ]


def test_an_unknown_key_in_defaults_points_at_defaults_and_a_top_level_typo_is_caught() -> None:
    text = "defaults:\n  breaker:\n    windw: 10s\n" + MINIMAL + "upstream: {}\n"
    assert errors(text) == [
        f"{FILE}:3:5: defaults.breaker.windw: unknown key (did you mean 'window'?)",
        f"{FILE}:8:1: upstream: unknown key (did you mean 'upstreams'?)",
    ]


def test_an_unknown_key_far_from_every_known_one_has_no_hint() -> None:
    (message,) = errors(MINIMAL + "    zzzzzz: 1\n")
    assert message == f"{FILE}:5:5: upstreams.a.zzzzzz: unknown key"


# -- several errors, one load ----------------------------------------------------------------------------------


def test_three_separate_errors_are_reported_in_one_load_in_file_order() -> None:
    text = """\
        upstreams:
          a:
            listen: 127.0.0.1:15001
            targets: [http://a:8000]
            breaker: {failure_threshold: 0}
          b:
            listen: 127.0.0.1:15002
            targets: [http://b:8000]
            retry: {jitter: maybe}
          c:
            listen: 127.0.0.1:70000
            targets: [http://c:8000]
        """
    assert errors(text) == [
        f"{FILE}:5:15: upstreams.a.breaker.failure_threshold: must be ≥ 1, got 0",
        f"{FILE}:9:13: upstreams.b.retry.jitter: expected true or false, got 'maybe'",
        f"{FILE}:11:5: upstreams.c.listen: port must be 1–65535, got 70000",
    ]


def test_load_file_raises_with_every_issue_and_the_real_path(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(MINIMAL + "    breaker: {window: 0}\n    retry: {max_retries: -1}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_file(path)
    issues = caught.value.issues
    assert [(i.file, i.line, i.column, i.path) for i in issues] == [
        (str(path), 5, 15, "upstreams.a.breaker.window"),
        (str(path), 6, 13, "upstreams.a.retry.max_retries"),
    ]
    assert str(caught.value).splitlines()[0] == f"{path}:5:15: upstreams.a.breaker.window: must be > 0, got 0"


def test_load_file_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_file(tmp_path / "missing.yaml")


# -- cross-field rules -----------------------------------------------------------------------------------------


def test_max_delay_shorter_than_base_delay() -> None:
    (message,) = errors(MINIMAL + "    retry: {base_delay: 2s, max_delay: 500ms}\n")
    assert message == f"{FILE}:5:29: upstreams.a.retry.max_delay: max_delay (500ms) is shorter than base_delay (2s)"


def test_max_delay_equal_to_base_delay_is_fine() -> None:
    config, issues = load(MINIMAL + "    retry: {base_delay: 2s, max_delay: 2s}\n")
    assert config is not None and issues == []


def test_per_try_longer_than_total() -> None:
    (message,) = errors(MINIMAL + "    timeouts: {per_try: 10s, total: 5s}\n")
    assert message == f"{FILE}:5:16: upstreams.a.timeouts.per_try: per_try (10s) is longer than total (5s)"


def test_per_try_equal_to_total_is_fine() -> None:
    config, _ = load(MINIMAL + "    timeouts: {per_try: 5s, total: 5s}\n")
    assert config is not None


def test_a_rule_broken_through_inheritance_is_reported_per_upstream() -> None:
    text = "defaults:\n  timeouts: {total: 1s}\n" + MINIMAL  # default per_try is 5s
    (message,) = errors(text)
    assert message.startswith(f"{FILE}:") and "upstreams.a.timeouts.per_try: per_try (5s) is longer" in message


def test_duplicate_listen_addresses() -> None:
    text = """\
        admin:
          listen: 127.0.0.1:9901
        upstreams:
          a:
            listen: 127.0.0.1:15001
            targets: [http://a:8000]
          b:
            listen: 127.0.0.1:15001
            targets: [http://b:8000]
          c:
            listen: 127.0.0.1:9901
            targets: [http://c:8000]
        """
    assert errors(text) == [
        f"{FILE}:8:5: upstreams.b.listen: 127.0.0.1:15001 is already used by upstreams.a.listen",
        f"{FILE}:11:5: upstreams.c.listen: 127.0.0.1:9901 is already used by admin.listen",
    ]


def test_non_loopback_listen_is_a_warning_not_an_error() -> None:
    text = MINIMAL + "  b:\n    listen: 0.0.0.0:15002\n    targets: [http://b:8000]\n"
    config, issues = load(text)
    assert config is not None
    assert [(i.severity, i.line, i.path) for i in issues] == [("warning", 6, "upstreams.b.listen")]
    assert "0.0.0.0:15002 is not a loopback address" in issues[0].message
    silenced, issues = load("allow_non_loopback: true\n" + text)
    assert silenced is not None and issues == []


@pytest.mark.parametrize("address", ["127.0.0.1:15001", "127.9.9.9:15001", "localhost:15001", '"[::1]:15001"'])
def test_loopback_forms_do_not_warn(address: str) -> None:
    _, issues = load(MINIMAL.replace("127.0.0.1:15001", address))
    assert issues == []


def test_protocol_and_target_scheme_must_agree() -> None:
    text = "upstreams:\n  db:\n    protocol: tcp\n    listen: 127.0.0.1:15432\n    targets: [http://db:5432]\n"
    (message,) = errors(text)
    assert message.startswith(f"{FILE}:5:5: upstreams.db.targets: http://db:5432 is not a tcp target")


# -- environment references ------------------------------------------------------------------------------------


def test_env_references_with_defaults_and_types() -> None:
    text = """\
        upstreams:
          a:
            listen: "127.0.0.1:${PORT:-15001}"
            targets: ["http://${HOST}:8000"]
            breaker:
              failure_threshold: ${THRESHOLD:-4}
              window: ${WINDOW:-30s}
        """
    config, issues = load(text, {"HOST": "data-service", "WINDOW": "2m"})
    assert issues == []
    up = config.upstream("a")  # type: ignore[attr-defined]
    assert str(up.listen) == "127.0.0.1:15001"
    assert str(up.targets[0]) == "http://data-service:8000"
    assert up.breaker.failure_threshold == 4  # an unquoted substitution is typed as YAML would type it
    assert up.breaker.window == 120.0


def test_colon_dash_default_applies_to_empty_and_dash_only_to_unset() -> None:
    # Block style: inside a flow mapping "{" would open a nested mapping.
    text = MINIMAL.replace("127.0.0.1:15001", "127.0.0.1:${PORT:-15009}") + "    retry:\n      max_retries: ${N-2}\n"
    config, _ = load(text, {"PORT": "", "N": "1"})
    up = config.upstream("a")  # type: ignore[attr-defined]
    assert (up.listen.port, up.retry.max_retries) == (15009, 1)


def test_an_unset_env_reference_without_default_is_an_error_at_its_line() -> None:
    text = MINIMAL.replace("http://a:8000", '"http://${UPSTREAM_HOST}:8000"')
    assert errors(text, {}) == [
        f"{FILE}:4:15: upstreams.a.targets[0]: environment variable UPSTREAM_HOST is not set "
        "(write ${UPSTREAM_HOST:-default} to give one)"
    ]


def test_double_dollar_is_a_literal_dollar() -> None:
    config, _ = load(MINIMAL + '    fallback: {body: "$${NOT_A_VAR}"}\n')
    assert config.upstream("a").fallback.body == "${NOT_A_VAR}"  # type: ignore[attr-defined]


# -- broken YAML -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (MINIMAL.replace("[http://a:8000]", "[http://a:8000") + "    retry: {}\n", 5),  # unclosed flow list
        (MINIMAL + '    fallback: {body: "unterminated}\n', 6),  # unclosed quote runs to the end
        (MINIMAL + "      oops: 1\n", 5),  # bad indentation under a scalar
    ],
)
def test_broken_yaml_is_one_clear_issue_with_its_line(text: str, line: int) -> None:
    config, issues = load(text)
    assert config is None
    assert len(issues) == 1
    (issue,) = issues
    assert issue.line == line and issue.column > 0
    assert issue.message.startswith("invalid YAML: ")
    assert str(issue).startswith(f"{FILE}:{line}:")


def test_duplicate_keys_are_an_error() -> None:
    text = MINIMAL + "    listen: 127.0.0.1:15002\n"
    assert f"{FILE}:5:5: upstreams.a.listen: duplicate key" in errors(text)


def test_an_empty_file_needs_upstreams() -> None:
    assert errors("") == [f"{FILE}:1:1: upstreams: at least one upstream is required"]
