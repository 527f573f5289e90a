"""The policy model: typed, frozen dataclasses whose field ``meta`` drives validation, the schema and explain."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.policy.fields import meta
from proxy.policy.rate_model import RateLimitPolicy, RateLimitWindow, RouteRateLimit
from proxy.policy.values import (
    RETRY_KINDS,
    STATUS_GROUPS,
    Address,
    Target,
    parse_address,
    parse_grpc_failure_on,
    parse_grpc_retry_on,
    parse_method,
    parse_retry_on,
    parse_route_name,
    parse_route_path,
    parse_target,
)
from proxy.resilience.breaker import BreakerSettings
from proxy.resilience.failures import FailureKind
from proxy.resilience.grpc import DEFAULT_FAILURE_ON, DEFAULT_RETRY_ON, GrpcRules, GrpcStatus
from proxy.resilience.ratelimit import LimitSpec

# ---------------------------------------------------------------------------------------------------------------
# The model. ``meta`` (proxy.policy.fields) carries what the schema, the validator and ``explain`` need to know
# about a field. The rate-limit sections live in proxy.policy.rate_model.


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = meta("Time allowed to open a connection to a target.", default=1.0, duration=True)
    per_try: float = meta(
        "Time allowed for one attempt to produce response headers, counted from the request's last byte sent.",
        default=5.0,
        duration=True,
        exclusive_minimum=0,
    )
    total: float = meta(
        "Bound on all attempts and backoff together, until a response head is chosen. The time a client takes to "
        "send its body is not counted, and bodies are not bounded by it (idle is).",
        default=15.0,
        duration=True,
        exclusive_minimum=0,
    )
    idle: float = meta(
        "Longest silence in either direction once a request or response body (or an upgraded connection) is "
        "flowing. An upstream that falls silent is a timeout of the upstream's; a client that does is the client's.",
        default=300.0,
        duration=True,
        exclusive_minimum=0,
    )


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    failure_threshold: int = meta("Failures within `window` that open the breaker.", default=5, minimum=1)
    window: float = meta(
        "The sliding window failures are counted in.", default=60.0, duration=True, exclusive_minimum=0
    )
    open_duration: float = meta(
        "How long an open breaker rejects before it lets a probe through.", default=60.0, duration=True
    )
    half_open_max_calls: int = meta("Probes allowed at once while half-open.", default=1, minimum=1)
    failure_rate_threshold: float | None = meta(
        "Also open when this percentage of the calls in `window` failed (needs `minimum_calls`). Off when null.",
        default=None,
        exclusive_minimum=0,
        maximum=100,
    )
    slow_call_duration: float | None = meta(
        "A call taking at least this long counts as slow. Off when null.", default=None, duration=True
    )
    slow_call_rate_threshold: float | None = meta(
        "Also open when this percentage of the calls in `window` were slow. Off when null.",
        default=None,
        exclusive_minimum=0,
        maximum=100,
    )
    minimum_calls: int = meta("Calls in `window` before the rate thresholds are judged.", default=10, minimum=1)
    enforce: bool = meta(
        "false = shadow mode: the breaker evaluates and reports as usual but never rejects a request.",
        default=True,
    )

    def settings(self) -> BreakerSettings:
        return BreakerSettings(
            failure_threshold=self.failure_threshold,
            window=self.window,
            open_duration=self.open_duration,
            half_open_max_calls=self.half_open_max_calls,
            failure_rate_threshold=self.failure_rate_threshold,
            slow_call_duration=self.slow_call_duration,
            slow_call_rate_threshold=self.slow_call_rate_threshold,
            minimum_calls=self.minimum_calls,
        )


@dataclass(frozen=True, slots=True)
class RetryBudgetPolicy:
    ratio: float = meta(
        "Retries may add at most this share of the requests in the last 10 s.", default=0.2, minimum=0, maximum=10
    )
    min_per_second: float = meta(
        "A floor of retries per second allowed regardless of traffic.", default=10.0, minimum=0
    )


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = meta("Retries after the first attempt.", default=3, minimum=0, maximum=20)
    base_delay: float = meta("Backoff before the first retry; doubles each time.", default=1.0, duration=True)
    max_delay: float = meta("Cap on one backoff delay.", default=4.0, duration=True)
    jitter: bool = meta("Full jitter: wait a uniform random time in [0, delay].", default=True)
    retry_on: tuple[str | int, ...] = meta(
        f"Outcomes worth another try: {', '.join(FailureKind)}, status codes, 5xx, gateway_error (502/503/504).",
        default=(FailureKind.CONNECT_ERROR.value, FailureKind.RESET.value, 502, 503, 504),
        parse=parse_retry_on,
    )
    methods: tuple[str, ...] = meta(
        "Methods that may be retried. POST and PATCH are never retried unless listed.",
        default=("GET", "HEAD", "OPTIONS", "PUT", "DELETE"),
        parse=parse_method,
    )
    budget: RetryBudgetPolicy | None = meta(
        "Caps retries to a share of recent traffic, so a failing upstream cannot cause a retry storm. "
        "null turns it off.",
        factory=RetryBudgetPolicy,
    )

    def retry_kinds(self) -> frozenset[FailureKind]:
        return frozenset(FailureKind(v) for v in self.retry_on if isinstance(v, str) and v in RETRY_KINDS)

    def retry_statuses(self) -> frozenset[int]:
        statuses: set[int] = set()
        for value in self.retry_on:
            if isinstance(value, int):
                statuses.add(value)
            elif value in STATUS_GROUPS:
                statuses.update(STATUS_GROUPS[value])
        return frozenset(statuses)


@dataclass(frozen=True, slots=True)
class GrpcPolicy:
    """How a grpc upstream's calls are judged: which statuses are failures, which are retried, and deadlines."""

    retry_on: tuple[str, ...] = meta(
        "gRPC statuses retried (before anything reached the client), by name or number: unavailable, "
        "deadline_exceeded (only while the caller's deadline leaves time), internal, resource_exhausted (after "
        "grpc-retry-pushback-ms when the server sends it; a negative one stops retries). Others are refused: the "
        "server answered the call itself. Streams the upstream refused (REFUSED_STREAM, or above a GOAWAY's last "
        "stream id) were never processed and are always retried; streams lost after it took them never are.",
        default=tuple(s.word for s in DEFAULT_RETRY_ON),
        parse=parse_grpc_retry_on,
    )
    failure_on: tuple[str, ...] = meta(
        "gRPC statuses the breaker counts as failures (any but ok). A reset or lost stream without a status always "
        "is one; the client's own cancel never is. resource_exhausted is warned about: gRPC also sends it for "
        "oversized messages, so a client's mistake would open the breaker.",
        default=tuple(s.word for s in DEFAULT_FAILURE_ON),
        parse=parse_grpc_failure_on,
    )
    timeout_offset: float = meta(
        "Subtracted from the caller's grpc-timeout before it bounds the attempts and is forwarded, so the sidecar's "
        "answer reaches the caller in time (Envoy's grpc_timeout_header_offset).",
        default=0.0,
        duration=True,
    )
    max_timeout: float | None = meta(
        "Cap on a caller's grpc-timeout (Envoy's max_grpc_timeout). None: the caller's own, and timeouts.total "
        "bounds the attempts either way (the sooner wins).",
        default=None,
        duration=True,
        exclusive_minimum=0,
    )

    def rules(self) -> GrpcRules:
        """The pure core's view (``proxy.resilience.grpc``) for the exchange."""
        return GrpcRules(
            failure_codes=frozenset(GrpcStatus[w.upper()] for w in self.failure_on),
            retry_codes=frozenset(GrpcStatus[w.upper()] for w in self.retry_on),
            timeout_offset=self.timeout_offset,
            max_timeout=self.max_timeout,
        )


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    path: str = meta("HTTP path probed with GET (http upstreams).", default="/health")
    interval: float = meta("Time between checks (with ±10% jitter).", default=10.0, duration=True, exclusive_minimum=0)
    timeout: float = meta("Time allowed for one check.", default=2.0, duration=True, exclusive_minimum=0)
    critical: bool = meta("A failing critical upstream makes /health answer 503 (unhealthy).", default=True)
    healthy_threshold: int = meta(
        "Consecutive passes before a failing upstream counts as healthy; after a breaker opened, before its open "
        "interval ends early (half-open: real calls then close or re-open it).",
        default=1,
        minimum=1,
    )
    unhealthy_threshold: int = meta(
        "Consecutive failures before a healthy upstream counts as unhealthy.", default=2, minimum=1
    )
    probe: str = meta(
        "tcp upstreams: connect (a TCP connect), redis (PING → +PONG) or postgres (an SSLRequest answered). grpc "
        "upstreams: grpc (grpc.health.v1.Health/Check, passing only on SERVING; what they get when probe is not "
        "written) or connect.",
        default="connect",
        choices=("connect", "redis", "postgres", "grpc"),
    )
    service: str = meta("The service a grpc probe asks about; empty: the server as a whole.", default="")


@dataclass(frozen=True, slots=True)
class FallbackPolicy:
    status: int = meta("Status of the answer given while the breaker is open.", default=503, minimum=200, maximum=599)
    body: str = meta("Body of that answer.", default="")
    content_type: str = meta("Its Content-Type.", default="text/plain; charset=utf-8")


@dataclass(frozen=True, slots=True)
class LimitsPolicy:
    max_concurrent: int = meta(
        "Requests (tcp: connections) in flight to the upstream at once.", default=1024, minimum=1
    )
    max_pending: int = meta(
        "Requests waiting for a slot; more are answered 503 overload at once.", default=1024, minimum=0
    )
    pending_timeout: float = meta("Longest wait for a slot before 503 overload.", default=1.0, duration=True)


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    consecutive_failures: int = meta("Consecutive failures of one target that eject it.", default=5, minimum=1)
    interval: float = meta(
        "Each interval a target stays in, its ejection multiplier decays by one.",
        default=10.0,
        duration=True,
        exclusive_minimum=0,
    )
    base_ejection: float = meta("First ejection time; grows with each repeat ejection.", default=30.0, duration=True)
    max_ejection: float = meta("Cap on one ejection time.", default=300.0, duration=True)
    max_ejected_percent: int = meta(
        "Never eject more than this share of the targets.", default=50, minimum=0, maximum=100
    )


TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")


@dataclass(frozen=True, slots=True)
class TlsPolicy:
    """How the sidecar speaks TLS to ``https://`` targets. Paths are relative to the policy file's directory."""

    ca_file: str | None = meta(
        "PEM file of the CAs trusted for the upstream's certificate. It replaces the system trust store (as "
        "curl --cacert and Envoy's trusted_ca do). Absent: the system trust store.",
        default=None,
    )
    cert_file: str | None = meta(
        "PEM client certificate (chain) presented to upstreams that ask for one (mTLS).", default=None
    )
    key_file: str | None = meta("PEM private key of cert_file (absent: the key is in cert_file).", default=None)
    server_name: str | None = meta(
        "SNI and the name the certificate is verified against (absent: the target's host; an IP target's "
        "certificate needs that IP among its subject alternative names).",
        default=None,
    )
    verify: bool = meta(
        "Verify the upstream's certificate and name. false accepts any certificate (warned at load).", default=True
    )
    min_version: str = meta("Lowest TLS version offered.", default="TLSv1.2", choices=TLS_VERSIONS)


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """Which requests a route takes: exactly one of path and path_prefix, optionally only some methods."""

    path_prefix: str | None = meta(
        "Requests whose path (without the query string) starts with this. A plain string prefix, like Envoy's "
        "`prefix`: /api matches /apiary too; end it with / to match whole segments.",
        default=None,
        parse=parse_route_path,
    )
    path: str | None = meta(
        "Requests for exactly this path (without the query string).", default=None, parse=parse_route_path
    )
    methods: tuple[str, ...] | None = meta(
        "Only requests with one of these methods; any method when absent.", default=None, parse=parse_method
    )


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """One entry of an upstream's ``routes``: the requests it matches get its timeouts and retry.

    ``timeouts`` and ``retry`` hold the effective values: the route's keys over the upstream's, merged key by key
    as an upstream's keys are over ``defaults``. The breaker, the retry budget and the limits stay the upstream's.
    """

    match: RouteMatch = meta("Which requests this route takes (required).", factory=RouteMatch)
    name: str | None = meta(
        "Shown by explain, in x-sidecar-decision and in request logs; routes[N] (its position) when absent.",
        default=None,
        parse=parse_route_name,
    )
    timeouts: Timeouts = meta("Overrides the upstream's timeouts key by key, for these requests.", factory=Timeouts)
    retry: RetryPolicy = meta(
        "Overrides the upstream's retry key by key, for these requests (the retry budget stays the upstream's).",
        factory=RetryPolicy,
    )
    weight: int = meta(
        "Tokens each request of this route costs against the upstream's rate limits (an exchange's endpoint "
        "weight). Needs rate_limit on the upstream.",
        default=1,
        minimum=1,
    )
    rate_limit: RouteRateLimit | None = meta(
        "Limits counted for this route only, on top of the upstream's rate_limit, and its own max_wait.",
        default=None,
    )


@dataclass(frozen=True, slots=True)
class UpstreamPolicy:
    name: str
    listen: Address = meta(
        "Where this upstream's listener accepts connections.", default=Address("127.0.0.1", 0), parse=parse_address
    )
    targets: tuple[Target, ...] = meta(
        "Where requests go: http://host:port or https://host:port (http; grpc: h2c with prior knowledge, or TLS "
        "with ALPN h2), or host:port (tcp).",
        default=(),
        parse=parse_target,
    )
    protocol: str = meta(
        "http: L7 proxy with retries; grpc: gRPC calls over HTTP/2, judged by grpc-status (see grpc); tcp: byte "
        "relay with a connection-level breaker.",
        default="http",
        choices=("http", "grpc", "tcp"),
    )
    balance: str = meta(
        "How a target is chosen among several.", default="round_robin", choices=("round_robin", "least_request")
    )
    preserve_host: bool = meta("Forward the client's Host header instead of the target's authority.", default=False)
    timeouts: Timeouts = meta("Connect, per-try and total deadlines.", factory=Timeouts)
    breaker: BreakerPolicy = meta("When to stop sending traffic, and for how long.", factory=BreakerPolicy)
    retry: RetryPolicy = meta(
        "When and how to try again. grpc upstreams use max_retries, delays, jitter and budget; what is retried "
        "is grpc.retry_on.",
        factory=RetryPolicy,
    )
    grpc: GrpcPolicy = meta(
        "grpc upstreams: which statuses are failures and retried, and the caller's deadline.", factory=GrpcPolicy
    )
    health: HealthPolicy | None = meta("Active checks, run without traffic. Off when absent.", default=None)
    fallback: FallbackPolicy | None = meta("The answer given while the breaker is open (default: 503).", default=None)
    limits: LimitsPolicy = meta("Bulkhead: in-flight and pending bounds.", factory=LimitsPolicy)
    outlier: OutlierPolicy | None = meta(
        "Per-target ejection for upstreams with several targets.", factory=OutlierPolicy
    )
    tls: TlsPolicy = meta("TLS to https:// targets: trust, client certificate (mTLS), SNI.", factory=TlsPolicy)
    rate_limit: RateLimitPolicy | None = meta(
        "Outbound rate limit: weighted limits counted as the upstream counts them, a cool-down on its "
        "429/418 + Retry-After, optionally shared through Redis. Off when absent.",
        default=None,
    )
    routes: tuple[RoutePolicy, ...] = meta(
        "Per-path timeouts, retry and rate-limit weight, first match wins; a request no route matches gets the "
        "upstream's own. Set per upstream (like Envoy's routes per virtual host), not in defaults.",
        default=(),
        schema={"$ref": "#/$defs/Route"},
    )

    def rate_limit_specs(self) -> tuple[LimitSpec, ...]:
        """The rate-limit engine's limits: the upstream's own (scope None, every request), then each route's own
        (scope: the route's name, ``routes[N]`` when unnamed). () without ``rate_limit``."""
        rate = self.rate_limit
        if rate is None:
            return ()
        scoped: list[tuple[str | None, RateLimitWindow]] = [(None, w) for w in rate.limits]
        for route in self.routes:
            if route.rate_limit is not None:
                scoped += [(route.name, w) for w in route.rate_limit.limits]
        return tuple(
            LimitSpec(w.requests, w.per, fixed=w.fixed, scope=scope, margin=0.0 if w.fixed else rate.margin)
            for scope, w in scoped
        )

    def rate_limit_max_wait(self, route: RoutePolicy | None) -> float:
        """How long a request of ``route`` (None: a request no route matches) may wait for its tokens."""
        if self.rate_limit is None:
            return 0.0
        own = route.rate_limit.max_wait if route is not None and route.rate_limit is not None else None
        return self.rate_limit.max_wait if own is None else own


@dataclass(frozen=True, slots=True)
class AdminPolicy:
    listen: Address = meta(
        "Admin server: /health /ready /live /metrics /breakers /dashboard.",
        default=Address("127.0.0.1", 9901),
        parse=parse_address,
    )
    token_env: str | None = meta(
        "Environment variable holding the bearer token that mutating admin calls need.",
        default="SIDECAR_ADMIN_TOKEN",
    )


@dataclass(frozen=True, slots=True)
class HttpServerPolicy:
    header_timeout: float = meta(
        "A client must send a whole request head within this time (slowloris).",
        default=10.0,
        duration=True,
        exclusive_minimum=0,
    )
    keepalive_timeout: float = meta(
        "Idle client connections are closed after this.", default=75.0, duration=True, exclusive_minimum=0
    )
    max_header_bytes: int = meta("Largest request head accepted (431 above).", default=65536, minimum=1024)
    max_headers: int = meta("Most header fields in a request (431 above).", default=100, minimum=8)
    max_url_bytes: int = meta("Longest request target (414 above).", default=8192, minimum=256)
    max_response_header_bytes: int = meta(
        "Largest response head accepted from an upstream; a larger one is answered 502 bad_response.",
        default=65536,
        minimum=1024,
    )
    replay_buffer_bytes: int = meta(
        "Request bodies up to this size are kept so they can be replayed on retry; larger ones are streamed "
        "and not retried.",
        default=65536,
        minimum=0,
    )
    drain_timeout: float = meta(
        "On SIGTERM, how long in-flight requests may take to finish.", default=20.0, duration=True
    )
    upstream_idle_timeout: float = meta(
        "Pooled upstream connections idle longer than this are closed.",
        default=30.0,
        duration=True,
        exclusive_minimum=0,
    )


@dataclass(frozen=True, slots=True)
class LoggingPolicy:
    level: str = meta("Log level.", default="info", choices=("debug", "info", "warning", "error"))
    requests: bool = meta("One JSON line per proxied request (costs throughput).", default=False)


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    admin: AdminPolicy
    http: HttpServerPolicy
    logging: LoggingPolicy
    upstreams: tuple[UpstreamPolicy, ...]
    allow_non_loopback: bool = False
    source: str = "<string>"
    sha256: str = ""
    # Where each upstream's TLS file keys were written: ``upstreams.NAME.tls.KEY`` → (line, column, key path as
    # written, e.g. ``defaults.tls.cert_file``). The files are read when the sidecar builds its TLS contexts,
    # outside this I/O-free layer, and a missing one must still be reported at its line.
    positions: Mapping[str, tuple[int, int, str]] = field(default_factory=dict, compare=False)

    def upstream(self, name: str) -> UpstreamPolicy:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        raise KeyError(name)


# Top-level keys: (doc, model or None for special handling).
TOP_LEVEL: dict[str, str] = {
    "admin": "The admin server.",
    "http": "Limits on the client side of every http listener.",
    "logging": "Structured JSON logs.",
    "defaults": "Every upstream inherits these and may override any key.",
    "upstreams": "One listener per dependency, by name.",
    "allow_non_loopback": "Allow listen addresses off loopback without a warning (containers, pods).",
}
# Keys an upstream may have that ``defaults`` may not.
UPSTREAM_ONLY = ("name", "listen", "targets", "routes")


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True  # noqa: UP007
    return tp, False


def model_fields(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield f, hints[f.name]
