"""Reading the admin plane from a test: JSON and /metrics, fresh reports, breaker transition logs.

The admin server may answer from a report published up to a few hundred ms ago when the data plane's loop is
slow to respond (``x-seawall-report: cached``); a test checking what just happened uses ``fresh``/``fresh_text``,
which ask again until the answer is not a cached one.
"""

from __future__ import annotations

import datetime
import json
import re
import urllib.error
import urllib.request
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.server import Sidecar
from tests.support.eventually import eventually, eventually_sync
from tests.support.sidecar import admin_url

TOKEN = "s3cret-test-token"  # the admin token the admin tests put in SEAWALL_TEST_TOKEN

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- async (aiohttp), for in-process sidecars ----------------------------------------------------------------


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        return response.status, await response.json()


async def scrape(session: aiohttp.ClientSession, admin: str) -> Samples:
    """/metrics as {(sample name, sorted labels): value}."""
    async with session.get(f"{admin}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def fresh_text(session: aiohttp.ClientSession, url: str, timeout: float = 5.0) -> str:
    """An admin report (as text) reflecting the data plane now, not a cached one."""

    async def look() -> str | None:
        async with session.get(url) as response:
            text = await response.text()
            return None if response.headers.get("x-seawall-report") == "cached" else text

    text = await eventually(look, until=lambda t: t is not None, timeout=timeout, what=f"{url}: a fresh report")
    assert text is not None
    return text


async def breakers(session: aiohttp.ClientSession, sidecar: Sidecar) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(await fresh_text(session, admin_url(sidecar) + "/breakers"))
    return body


async def metrics(session: aiohttp.ClientSession, sidecar: Sidecar) -> str:
    return await fresh_text(session, admin_url(sidecar) + "/metrics")


# -- blocking (urllib), for sidecar processes ----------------------------------------------------------------


def fresh(admin: str, path: str, timeout: float = 5.0) -> bytes:
    """GET an admin report that reflects the data plane *now* (blocking; /health's 503 body counts too)."""

    def look() -> bytes | None:
        try:
            with urllib.request.urlopen(admin + path, timeout=5) as response:
                body: bytes = response.read()
                cached = response.headers.get("x-seawall-report") == "cached"
        except urllib.error.HTTPError as exc:  # /health answers 503 when unhealthy, with the same body
            body = exc.read()
            cached = exc.headers.get("x-seawall-report") == "cached"
        return None if cached else body

    body = eventually_sync(look, until=lambda b: b is not None, timeout=timeout, what=f"{path}: a fresh report")
    assert body is not None
    return body


def admin_json(admin: str, path: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(fresh(admin, path))
    return body


def metric(admin: str, name: str, **labels: str) -> float:
    """One sample from the sidecar's /metrics, matched on name and labels in any order (0 when absent)."""
    text = fresh(admin, "/metrics").decode()
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    return 0.0


def seconds_open(admin: str, name: str) -> float:
    """From the breaker's own transition log: time from its last opening to its last closing."""
    transitions = admin_json(admin, "/breakers")[name]["recent_transitions"]

    def last(to_state: str) -> datetime.datetime:
        at = next(t["at"] for t in transitions if t["to"] == to_state)  # newest first
        return datetime.datetime.fromisoformat(at.replace("Z", "+00:00"))

    return (last("closed") - last("open")).total_seconds()


def assert_recovered(admin: str, name: str) -> str:
    """The breaker is closed again by a probe that succeeded; returns what ended the open interval before it:
    passing active checks (``health_check_passed``, as soon as the upstream answers them) or ``open_duration``
    (``open_duration_elapsed``), whichever came first."""
    breaker = admin_json(admin, "/breakers")[name]
    assert breaker["state"] == "closed", breaker
    closed, half_opened = breaker["recent_transitions"][:2]  # newest first
    assert (closed["from"], closed["reason"]) == ("half_open", "probe_succeeded"), closed
    reason: str = half_opened["reason"]
    assert reason in ("health_check_passed", "open_duration_elapsed"), half_opened
    if reason == "open_duration_elapsed":
        assert seconds_open(admin, name) >= 0.999  # open_duration, in whole ms
    return reason
