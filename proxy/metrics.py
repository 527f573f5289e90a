"""Every metric the sidecar exports, declared once in ``METRICS``, and the plain counters behind them.

The data path never touches prometheus-client objects: it bumps integers on an ``UpstreamStats`` (a few
nanoseconds, no locks, no label lookups), and ``SidecarCollector`` turns them into metric families only when
``/metrics`` is scraped. Label sets are bounded: upstream names come from the policy file, codes are the
status codes (at most 500 values), reasons and states are fixed vocabularies.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.resilience.failures import FAILED_ANSWER, FailureKind
from proxy.upstream.errors import TLS_ERROR


@dataclass(frozen=True, slots=True)
class MetricSpec:
    kind: str  # counter | gauge | histogram
    labels: tuple[str, ...]
    help: str


METRICS: dict[str, MetricSpec] = {
    "sidecar_requests_total": MetricSpec(
        "counter", ("upstream", "code"), "Answers given to clients, by status code (proxied and local)."
    ),
    "sidecar_request_duration_seconds": MetricSpec(
        "histogram", ("upstream",), "Time from request head received to response complete."
    ),
    "sidecar_breaker_state": MetricSpec(
        "gauge", ("upstream", "state"), "1 for the breaker's current state, 0 for the others."
    ),
    "sidecar_breaker_transitions_total": MetricSpec(
        "counter", ("upstream", "from_state", "to_state"), "Breaker state changes."
    ),
    "sidecar_breaker_health_recoveries_total": MetricSpec(
        "counter",
        ("upstream",),
        "Open intervals ended early by passing active checks (open -> half_open, health_check_passed); "
        "the next real calls then close the breaker or re-open it.",
    ),
    "sidecar_retries_total": MetricSpec("counter", ("upstream",), "Retries sent (attempts after the first)."),
    "sidecar_rejected_total": MetricSpec(
        "counter",
        ("upstream", "reason"),
        "Requests answered or cut short by the sidecar itself: breaker_open, overload, retry_budget, "
        "bad_request (refused before forwarding: 400, 405, 408, 414, 431, 501), client_timeout (the client's "
        "request body fell silent for timeouts.idle: 408), internal_error, "
        "breaker_open_shadow (would have been rejected in shadow mode).",
    ),
    "sidecar_upstream_failures_total": MetricSpec(
        "counter", ("upstream", "kind"), f"Failed attempts: {', '.join([*FailureKind, TLS_ERROR, FAILED_ANSWER])}."
    ),
    "sidecar_grpc_responses_total": MetricSpec(
        "counter",
        ("upstream", "grpc_status"),
        "gRPC calls answered (protocol: grpc), by the grpc-status the caller got (0-16; proxied and the sidecar's "
        "own trailers-only answers; 1 CANCELLED also for calls the client cancelled).",
    ),
    "sidecar_http2_abuse_total": MetricSpec(
        "counter",
        ("upstream", "kind"),
        "HTTP/2 client connections told to go away or streams refused for abuse (grpc listeners): rapid_reset, "
        "continuation_flood, header_list_too_large, refused_stream, protocol_error, max_streams_per_connection. "
        "Counted when the connection ends.",
    ),
    "sidecar_inflight_requests": MetricSpec("gauge", ("upstream",), "Requests (tcp: connections) in flight."),
    "sidecar_upgraded_connections": MetricSpec(
        "gauge", ("upstream",), "Upgraded connections (WebSocket) open: relaying after a 101."
    ),
    "sidecar_pending_requests": MetricSpec("gauge", ("upstream",), "Requests waiting for a concurrency slot."),
    "sidecar_upstream_connections": MetricSpec(
        "gauge", ("upstream", "state"), "Pooled upstream connections, idle or active."
    ),
    "sidecar_health_check_up": MetricSpec(
        "gauge", ("upstream",), "1 if the upstream passes its active check, 0 if not (absent: no check)."
    ),
    "sidecar_health_check_duration_seconds": MetricSpec("gauge", ("upstream",), "Latency of the last active check."),
    "sidecar_health_checks_total": MetricSpec("counter", ("upstream", "result"), "Active checks run."),
    "sidecar_target_ejected": MetricSpec(
        "gauge", ("upstream", "target"), "1 while outlier detection keeps the target out of rotation."
    ),
    "sidecar_retry_budget_remaining": MetricSpec(
        "gauge", ("upstream",), "Retries the budget still allows in its window."
    ),
    "sidecar_rate_limited_total": MetricSpec(
        "counter",
        ("upstream", "reason"),
        "Requests the outbound rate limit answered 429 itself: rate_limited (no tokens within max_wait) or "
        "upstream_cooldown (the upstream asked for a pause with Retry-After).",
    ),
    "sidecar_rate_limit_tokens": MetricSpec(
        "gauge", ("upstream", "limit"), "Weight each rate limit could still send now without waiting."
    ),
    "sidecar_rate_limit_waiting": MetricSpec("gauge", ("upstream",), "Requests waiting in line for tokens."),
    "sidecar_rate_limit_cooldown_seconds": MetricSpec(
        "gauge", ("upstream",), "Seconds until the upstream's cool-down (its Retry-After) ends; 0 when none."
    ),
    "sidecar_rate_limit_cooldowns_total": MetricSpec(
        "counter", ("upstream",), "Cool-downs started by an upstream answer in cooldown_on with Retry-After."
    ),
    "sidecar_rate_limit_shared": MetricSpec(
        "gauge",
        ("upstream", "state"),
        "1 for where the rate limit is counted now: local, shared (Redis) or fallback (Redis unreachable: a "
        "local share of the limits).",
    ),
    "sidecar_config_reloads_total": MetricSpec("counter", ("result",), "Policy reloads: success or failure."),
    "sidecar_config_last_reload_success_timestamp_seconds": MetricSpec(
        "gauge", (), "When the running policy was loaded (Unix time)."
    ),
}

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BREAKER_STATES = ("closed", "open", "half_open")


@dataclass(slots=True)
class UpstreamStats:
    """Plain counters for one upstream, bumped on the data path."""

    requests: dict[int, int] = field(default_factory=dict)
    duration_counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    duration_sum: float = 0.0
    retries: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    transitions: dict[tuple[str, str], int] = field(default_factory=dict)
    health_recoveries: int = 0
    inflight: int = 0
    pending: int = 0
    upgraded: int = 0  # connections relaying after a 101 (also in ``inflight``: each holds its bulkhead slot)
    checks: dict[str, int] = field(default_factory=dict)
    grpc: dict[int, int] = field(default_factory=dict)  # calls answered by grpc-status (protocol: grpc)
    h2_abuse: dict[str, int] = field(default_factory=dict)  # HTTP/2 limits a client ran into, by kind

    def answered(self, status: int, duration: float) -> None:
        self.requests[status] = self.requests.get(status, 0) + 1
        self.duration_counts[bisect.bisect_left(DURATION_BUCKETS, duration)] += 1
        self.duration_sum += duration

    def grpc_answered(self, status: int) -> None:
        self.grpc[status] = self.grpc.get(status, 0) + 1

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def failed(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1

    def transition(self, from_state: str, to_state: str) -> None:
        key = (from_state, to_state)
        self.transitions[key] = self.transitions.get(key, 0) + 1


RATE_COUNTED = ("local", "shared", "fallback")


@dataclass(frozen=True, slots=True)
class RateView:
    """An upstream's outbound rate limit, at scrape time."""

    refused: dict[str, int]  # by reason
    cooldowns: int
    tokens: list[tuple[str, int]]  # (limit label, weight left)
    waiting: int
    cooldown_left: float
    counted: str  # one of RATE_COUNTED


@dataclass(frozen=True, slots=True)
class UpstreamView:
    """What the collector needs to read from one running upstream, at scrape time."""

    name: str
    stats: UpstreamStats
    breaker_state: Callable[[], str]
    connections: Callable[[], tuple[int, int]]  # (idle, active)
    health_up: Callable[[], tuple[bool, float] | None]  # (up, latency) of the last check, None without checks
    ejected_targets: Callable[[], Iterable[tuple[str, bool]]]
    budget_remaining: Callable[[], float | None]
    rate_limit: Callable[[], RateView | None] = lambda: None


@dataclass(slots=True)
class ProcessStats:
    reloads: dict[str, int] = field(default_factory=lambda: {"success": 0, "failure": 0})
    last_reload: float = 0.0


class SidecarCollector(Collector):
    """Builds the metric families of ``METRICS`` from the live upstreams on each scrape."""

    def __init__(self, upstreams: Callable[[], Iterable[UpstreamView]], process: ProcessStats) -> None:
        self._upstreams = upstreams
        self._process = process

    def describe(self) -> Iterable[Metric]:
        return []  # families are built at collect time; nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for name, spec in METRICS.items():
            plain = name.removesuffix("_total") if spec.kind == "counter" else name
            cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}[
                spec.kind
            ]
            families[name] = cls(plain, spec.help, labels=list(spec.labels))

        def add(name: str, labels: list[str], value: float) -> None:
            families[name].add_metric(labels, value)  # type: ignore[attr-defined]

        # Each family belongs to one group, so the order of the groups does not change the output.
        for view in self._upstreams():
            families["sidecar_request_duration_seconds"].add_metric(  # type: ignore[attr-defined]
                [view.name], _duration_buckets(view.stats), view.stats.duration_sum
            )
            _add_outcomes(add, view)
            _add_breaker(add, view)
            _add_load(add, view)
            _add_health(add, view)
            rate = view.rate_limit()
            if rate is not None:
                _add_rate(add, view.name, rate)
        for result, count in self._process.reloads.items():
            add("sidecar_config_reloads_total", [result], count)
        if self._process.last_reload:
            add("sidecar_config_last_reload_success_timestamp_seconds", [], self._process.last_reload)
        yield from families.values()


_Add = Callable[[str, list[str], float], None]


def _duration_buckets(stats: UpstreamStats) -> list[tuple[str, int]]:
    """The histogram's cumulative buckets, from the per-bucket counts the data path keeps."""
    buckets, running = [], 0
    for bound, count in zip((*DURATION_BUCKETS, float("inf")), stats.duration_counts, strict=True):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return buckets


def _add_outcomes(add: _Add, view: UpstreamView) -> None:
    """What became of requests: answers by code, retries and their budget, rejections, failed attempts."""
    up, stats = view.name, view.stats
    for code, count in sorted(stats.requests.items()):
        add("sidecar_requests_total", [up, str(code)], count)
    add("sidecar_retries_total", [up], stats.retries)
    for reason, count in sorted(stats.rejected.items()):
        add("sidecar_rejected_total", [up, reason], count)
    for kind, count in sorted(stats.failures.items()):
        add("sidecar_upstream_failures_total", [up, kind], count)
    for status, count in sorted(stats.grpc.items()):
        add("sidecar_grpc_responses_total", [up, str(status)], count)
    for kind, count in sorted(stats.h2_abuse.items()):
        add("sidecar_http2_abuse_total", [up, kind], count)
    remaining = view.budget_remaining()
    if remaining is not None:
        add("sidecar_retry_budget_remaining", [up], remaining)


def _add_breaker(add: _Add, view: UpstreamView) -> None:
    up, stats = view.name, view.stats
    current = view.breaker_state()
    for state in BREAKER_STATES:
        add("sidecar_breaker_state", [up, state], 1.0 if state == current else 0.0)
    for (from_state, to_state), count in sorted(stats.transitions.items()):
        add("sidecar_breaker_transitions_total", [up, from_state, to_state], count)
    add("sidecar_breaker_health_recoveries_total", [up], stats.health_recoveries)


def _add_load(add: _Add, view: UpstreamView) -> None:
    """What is open now: requests in flight and waiting, upgraded connections, pooled upstream connections."""
    up, stats = view.name, view.stats
    add("sidecar_inflight_requests", [up], stats.inflight)
    add("sidecar_pending_requests", [up], stats.pending)
    add("sidecar_upgraded_connections", [up], stats.upgraded)
    idle, active = view.connections()
    add("sidecar_upstream_connections", [up, "idle"], idle)
    add("sidecar_upstream_connections", [up, "active"], active)


def _add_health(add: _Add, view: UpstreamView) -> None:
    """Active checks and outlier detection: what the sidecar thinks of the upstream's targets."""
    up = view.name
    health = view.health_up()
    if health is not None:
        add("sidecar_health_check_up", [up], 1.0 if health[0] else 0.0)
        add("sidecar_health_check_duration_seconds", [up], health[1])
    for result, count in sorted(view.stats.checks.items()):
        add("sidecar_health_checks_total", [up, result], count)
    for target, ejected in view.ejected_targets():
        add("sidecar_target_ejected", [up, target], 1.0 if ejected else 0.0)


def _add_rate(add: _Add, up: str, rate: RateView) -> None:
    for reason, count in sorted(rate.refused.items()):
        add("sidecar_rate_limited_total", [up, reason], count)
    add("sidecar_rate_limit_cooldowns_total", [up], rate.cooldowns)
    for label, left in rate.tokens:
        add("sidecar_rate_limit_tokens", [up, label], left)
    add("sidecar_rate_limit_waiting", [up], rate.waiting)
    add("sidecar_rate_limit_cooldown_seconds", [up], rate.cooldown_left)
    for state in RATE_COUNTED:
        add("sidecar_rate_limit_shared", [up, state], 1.0 if state == rate.counted else 0.0)
