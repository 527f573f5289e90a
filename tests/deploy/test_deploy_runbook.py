"""RUNBOOK.md: the scenarios, escalation and routine tasks the original runbook had, and commands a test can
find (tests/deploy/test_runbook_commands.py runs them against a live sidecar)."""

from __future__ import annotations

import re

from tests.support.deploy import RUNBOOK

from .test_runbook_commands import RUNBOOK_COMMANDS, extract_commands

SCENARIOS = (
    "1. TimescaleDB connection loss",
    "2. Kafka broker failure",
    "3. GPU out of memory",
    "4. Model stability failure",
    "5. Redis memory exhaustion",
    "6. Disk space exhaustion",
    "7. Circuit breaker open",
    "8. Policy reload rejected",
    "9. Retry budget exhausted",
    "10. Checkpoint cleanup failing",
)


def _text() -> str:
    return RUNBOOK.read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    start = text.index(f"### {heading}\n")
    following = text.find("\n### ", start + 1)
    following2 = text.find("\n## ", start + 1)
    ends = [e for e in (following, following2) if e != -1]
    return text[start : min(ends) if ends else len(text)]


def test_every_scenario_has_symptoms_diagnosis_three_recovery_levels_prevention() -> None:
    text = _text()
    for heading in SCENARIOS:
        body = _section(text, heading)
        for part in ("#### Symptoms", "#### Diagnosis", "#### Recovery", "#### Prevention"):
            assert part in body, f"{heading}: {part}"
        for level in ("**Level 1**", "**Level 2**", "**Level 3**"):
            assert level in body, f"{heading}: {level}"
        diagnosis = body[body.index("#### Diagnosis") : body.index("#### Recovery")]
        assert "```bash" in diagnosis, f"{heading}: diagnosis has no commands"


def test_kafka_scenario_checks_zookeeper_and_restarts_sequentially() -> None:
    body = _section(_text(), "2. Kafka broker failure")
    assert "zookeeper-shell" in body and "srvr" in body
    assert "sequential restart" in body.lower()


def test_architecture_resource_table_and_alert_mapping() -> None:
    text = _text()
    assert "## Architecture" in text and "### Resource table" in text
    assert "| training-orchestrator | 4.0 | 8G | 4G | 1 (nvidia) |" in text
    assert "## Alert → scenario" in text


def test_escalation_and_routine_tasks() -> None:
    text = _text()
    escalation = text[text.index("## Escalation") : text.index("## Routine tasks")]
    for who, when in (
        ("on-call engineer", "15 min"),
        ("infrastructure lead", "30 min"),
        ("engineering manager + CTO", "1 h"),
    ):
        assert re.search(rf"{re.escape(who)}.*{re.escape(when)}", escalation), who
    routine = text[text.index("## Routine tasks") :]
    for cron in ("0    2    *", "0    3    *", "0    */6  *", "0    *    *"):
        assert cron in routine, cron
    assert "≥ 90 %" in routine or "90" in routine
    for heading in ("### Daily", "### Weekly", "### Monthly"):
        assert heading in routine


def test_sidecar_commands_target_the_configurable_admin() -> None:
    commands = extract_commands(_text())
    for command in commands:
        if command.startswith("curl"):
            assert "http://${SIDECAR_ADMIN:-127.0.0.1:9901}/" in command, command
            assert "--fail-with-body" in command, command
        if "-X POST" in command:
            assert "Authorization: Bearer ${SIDECAR_ADMIN_TOKEN}" in command, command


def test_no_runnable_command_hides_outside_a_bash_block() -> None:
    """Lines that start with a runbook program must sit in ```bash fences, or the command test misses them."""
    fence = None
    for number, line in enumerate(_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip() if fence is None else None
            continue
        if fence != "bash" and stripped.split(" ", 1)[0] in RUNBOOK_COMMANDS:
            raise AssertionError(f"RUNBOOK.md:{number}: {stripped}")


def test_extractor() -> None:
    markdown = "x\n```bash\ncurl -s a\ndocker ps\n  sidecar check p\n```\ncurl outside\n```text\ncurl no\n```\n"
    assert extract_commands(markdown) == ["curl -s a", "sidecar check p"]
