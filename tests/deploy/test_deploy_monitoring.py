"""Prometheus (scrape config, alert rules and their promtool unit tests) and the provisioned Grafana
dashboard."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tests.support.deploy import APP_SERVICES, COMPOSE_DIR, RUNBOOK, load_yaml, run_tool
from tests.support.tools import require_tool

PROM_DIR = COMPOSE_DIR / "prometheus"
RULES = sorted((PROM_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM_DIR / "tests").glob("*.test.yml"))
DASHBOARD = COMPOSE_DIR / "grafana" / "dashboards" / "seawall.json"

# The alerts the deployment promises (issue: breaker open > 1 min, flapping, retry budget exhausted,
# critical upstream unhealthy, cleanup not successful in 26 h, container restarts).
REQUIRED_ALERTS = {
    "SidecarBreakerOpen",
    "SidecarBreakerFlapping",
    "SidecarRetryBudgetExhausted",
    "SidecarCriticalUpstreamUnhealthy",
    "CheckpointCleanupNotSuccessful",
    "ContainerRestarting",
}


def _alerts() -> dict[str, dict[str, Any]]:
    alerts = {}
    for path in RULES:
        for group in load_yaml(path)["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    alerts[rule["alert"]] = rule
    return alerts


def test_promtool_check_rules() -> None:
    tool = require_tool("promtool")
    result = run_tool(tool, "check", "rules", *map(str, RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config() -> None:
    tool = require_tool("promtool")
    result = run_tool(tool, "check", "config", str(PROM_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    tool = require_tool("promtool")
    result = run_tool(tool, "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_shown_firing_by_a_unit_test() -> None:
    alerts = _alerts()
    assert alerts.keys() >= REQUIRED_ALERTS
    fired: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for case in load_yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check["exp_alerts"] else silent).add(check["alertname"])
    assert fired == alerts.keys(), f"alerts never shown firing: {alerts.keys() - fired}"
    # …and shown silent before their threshold, so a rule that always fires would fail too.
    assert silent >= REQUIRED_ALERTS


def _github_anchor(heading: str) -> str:
    """GitHub's heading anchor: lower-case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_every_alert_points_to_an_existing_runbook_section() -> None:
    anchors = {
        _github_anchor(line.lstrip("#"))
        for line in RUNBOOK.read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    }
    for name, rule in _alerts().items():
        runbook = rule["annotations"]["runbook"]
        assert runbook.startswith("RUNBOOK.md#"), name
        assert runbook.split("#", 1)[1] in anchors, f"{name}: no section {runbook}"
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), name


def _critical_pairs_from_policies() -> set[str]:
    pairs = set()
    for service in APP_SERVICES:
        policy = load_yaml(COMPOSE_DIR.parent / "config" / "services" / f"{service}.yaml")
        for upstream, spec in policy["upstreams"].items():
            # The sidecar's default for health.critical is true, so only an explicit false is not critical.
            health = spec.get("health")
            if health is not None and health.get("critical", True):
                pairs.add(f"{service};{upstream}")
    return pairs


def test_scrape_config_covers_every_sidecar_and_cleanup() -> None:
    config = load_yaml(PROM_DIR / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {t for sc in jobs["seawall-sidecar"]["static_configs"] for t in sc["targets"]}
    assert targets == {f"{app}:9901" for app in APP_SERVICES}
    for sc in jobs["seawall-sidecar"]["static_configs"]:
        assert sc["labels"]["service"] == sc["targets"][0].split(":")[0]
    assert jobs["checkpoint-cleanup"]["static_configs"][0]["targets"] == ["checkpoint-cleanup:9102"]


def test_critical_label_mirrors_the_policies() -> None:
    config = load_yaml(PROM_DIR / "prometheus.yml")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "seawall-sidecar")
    (relabel,) = [r for r in job["metric_relabel_configs"] if r.get("target_label") == "critical"]
    assert relabel["source_labels"] == ["service", "upstream"]
    listed = set(relabel["regex"].strip("()").split("|"))
    assert listed == _critical_pairs_from_policies()


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    tool = require_tool("promtool")
    exprs = _dashboard_exprs()
    assert exprs
    # promtool has no "check expression"; a recording-rule file made of the queries gets them parsed.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": e.replace("$service", ".*").replace("$upstream", ".*")}
        for i, e in enumerate(exprs)
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = run_tool(tool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_covers_breakers_rejections_latency_retries_cleanup() -> None:
    text = " ".join(_dashboard_exprs())
    for metric in (
        "sidecar_breaker_state",
        "sidecar_rejected_total",
        "sidecar_request_duration_seconds_bucket",
        "sidecar_retries_total",
        "checkpoint_cleanup_runs_deleted_total",
        "checkpoint_cleanup_bytes_freed_total",
        "checkpoint_cleanup_errors_total",
        "checkpoint_cleanup_last_success_timestamp_seconds",
    ):
        assert metric in text, metric


def test_grafana_provisioning_matches_the_dashboard() -> None:
    datasources = load_yaml(COMPOSE_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    (prometheus,) = datasources["datasources"]
    assert prometheus["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert uids == {prometheus["uid"]}
    providers = load_yaml(COMPOSE_DIR / "grafana" / "provisioning" / "dashboards" / "seawall.yml")
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
