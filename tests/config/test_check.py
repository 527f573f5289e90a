"""``sidecar check``: every problem in one run, each on its own line with file:line:column and key path."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.policy.check import check_command
from proxy.policy.loader import load_text

GOOD = """\
admin:
  listen: 127.0.0.1:9901
defaults:
  timeouts: {connect: 1s, per_try: 5s, total: 15s}
upstreams:
  demo:
    listen: 127.0.0.1:15000
    targets: [http://127.0.0.1:18080]
"""

# Three unrelated mistakes: a typo'd key, a negative threshold, a cross-field contradiction.
THREE_ERRORS = """\
admin:
  listen: 127.0.0.1:9901
upstreams:
  api:
    listen: 127.0.0.1:15001
    targets: [http://api:8000]
    breaker:
      failure_treshold: 3
  db:
    protocol: tcp
    listen: 127.0.0.1:15432
    targets: [db:5432]
    breaker: {failure_threshold: -1}
    retry: {base_delay: 5s, max_delay: 1s}
"""


def run(*paths: Path | str) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = check_command([str(p) for p in paths], out)
    return code, out.getvalue().splitlines()


def test_valid_file_prints_one_summary_line(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(GOOD)
    assert run(path) == (0, [f"{path}: OK (1 upstream: demo)"])


def test_three_errors_in_one_file_in_one_run(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(THREE_ERRORS)
    code, lines = run(path)
    assert code == 1
    assert lines == [
        f"{path}:8:7: upstreams.api.breaker.failure_treshold: unknown key (did you mean 'failure_threshold'?)",
        f"{path}:13:15: upstreams.db.breaker.failure_threshold: must be ≥ 1, got -1",
        f"{path}:14:29: upstreams.db.retry.max_delay: max_delay (1s) is shorter than base_delay (5s)",
        f"{path}: 3 errors",
    ]


def test_the_real_command_exits_1_and_prints_every_error(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(THREE_ERRORS)
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check", str(path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 1
    assert [line.split(": ")[1] for line in done.stdout.splitlines()[:3]] == [
        "upstreams.api.breaker.failure_treshold",
        "upstreams.db.breaker.failure_threshold",
        "upstreams.db.retry.max_delay",
    ]
    assert "Traceback" not in done.stderr


def test_errors_inside_an_upstream_do_not_hide_its_other_errors(tmp_path: Path) -> None:
    """A bad value in defaults used to make every upstream's build fail before its own rules ran."""
    text = """\
defaults:
  retry: {max_retries: -1}
upstreams:
  a:
    listen: 127.0.0.1:15001
    targets: [http://a:80]
    timeouts: {per_try: 20s, total: 10s}
    protocl: http
  b:
    listen: 127.0.0.1:15001
    targets: [http://b:80]
"""
    _, issues = load_text(text, "p.yaml")
    assert [(i.line, i.path) for i in issues] == [
        (2, "defaults.retry.max_retries"),
        (7, "upstreams.a.timeouts.per_try"),
        (8, "upstreams.a.protocl"),
        (10, "upstreams.b.listen"),
    ]
    assert "already used by upstreams.a.listen" in issues[-1].message


def test_a_bad_value_does_not_trigger_rules_about_its_stand_in_default() -> None:
    """per_try is invalid; judging 'default per_try 5s > total 2s' would be a second, false error."""
    text = (
        "upstreams:\n  a:\n    listen: 127.0.0.1:15001\n    targets: [http://a:80]\n"
        "    timeouts: {per_try: -1s, total: 2s}\n"
    )
    _, issues = load_text(text, "p.yaml")
    assert [i.path for i in issues] == ["upstreams.a.timeouts.per_try"]
    assert "expected a duration" in issues[0].message


def test_a_key_at_the_wrong_level_says_where_it_belongs() -> None:
    text = "upstreams:\n  a:\n    listen: 127.0.0.1:15001\n    targets: [http://a:80]\n    open_duration: 5s\n"
    _, issues = load_text(text, "p.yaml")
    assert [str(i) for i in issues] == [
        "p.yaml:5:5: upstreams.a.open_duration: unknown key (it belongs under breaker: breaker.open_duration)"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("admin: {listen: [\n", "p.yaml:2:1: <root>: invalid YAML:"),
        (
            "upstreams:\n  a: {listen: 127.0.0.1:1, targets: [http://a:80]}\n  a: {}\n",
            "p.yaml:3:3: upstreams.a: duplicate key",
        ),
        ("upstreams: [a, b]\n", "p.yaml:1:1: upstreams: expected a mapping"),
        ("- just\n- a list\n", "p.yaml:1:1: <root>: the policy file must be a mapping"),
    ],
)
def test_broken_documents_are_one_line_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    code, lines = run(path)
    assert code == 1
    assert lines[0].startswith(str(tmp_path / expected)), lines


def test_missing_and_undecodable_files_are_clear_errors(tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00junk")
    code, lines = run(tmp_path / "absent.yaml", binary)
    assert code == 1
    assert lines[0] == f"{tmp_path / 'absent.yaml'}: no such file"
    assert lines[1].startswith(f"{binary}: not UTF-8 text")


def test_warnings_are_printed_but_exit_0(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(GOOD.replace("127.0.0.1:15000", "0.0.0.0:15000"))
    code, lines = run(path)
    assert code == 0
    assert lines[0].startswith(f"{path}:7:5: upstreams.demo.listen: warning: 0.0.0.0:15000 is not a loopback")
    assert lines[1] == f"{path}: OK (1 upstream: demo), 1 warning"


def test_env_references_resolve_and_an_unset_one_without_default_is_an_error(tmp_path: Path) -> None:
    text = GOOD.replace("http://127.0.0.1:18080", '"${SEAWALL_TEST_TARGET:-http://fallback:9000}"').replace(
        "127.0.0.1:15000", "${SEAWALL_TEST_UNSET_LISTEN}"
    )
    config, issues = load_text(text, "p.yaml", environ={"SEAWALL_TEST_TARGET": "http://api:8080"})
    assert config is None
    assert [str(i) for i in issues] == [
        "p.yaml:7:13: upstreams.demo.listen: environment variable SEAWALL_TEST_UNSET_LISTEN is not set "
        "(write ${SEAWALL_TEST_UNSET_LISTEN:-default} to give one)"
    ]
    config, _ = load_text(text, "p.yaml", environ={"SEAWALL_TEST_UNSET_LISTEN": "127.0.0.1:15009"})
    assert config is not None
    assert str(config.upstream("demo").targets[0]) == "http://fallback:9000"  # unset → the default
    assert config.upstream("demo").listen.port == 15009


def test_directories_expand_to_their_policy_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yml").write_text(GOOD)
    (tmp_path / "notes.txt").write_text("not a policy")
    code, lines = run(tmp_path)
    assert code == 0
    assert lines == [f"{tmp_path / 'a.yaml'}: OK (1 upstream: demo)", f"{tmp_path / 'b.yml'}: OK (1 upstream: demo)"]
