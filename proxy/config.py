"""The policy file: a typed, frozen model, and a loader whose every complaint names file, line and key path.

The model below *is* the contract: each field's type, default and ``doc`` drive validation here, the JSON
Schema (``proxy.schema``) and ``sidecar explain``. Loading goes:

    text ──${ENV} substitution──▶ YAML nodes (with line marks) ──defaults merged per upstream──▶ dataclasses
                                                             └──▶ cross-field rules ──▶ SidecarConfig

Durations are ``"250ms"``, ``"1s"``, ``"2m"``, ``"1h"`` or a number of seconds. Unknown keys are errors (with a
"did you mean" hint), never ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import ipaddress
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from proxy.breaker import BreakerSettings

# ---------------------------------------------------------------------------------------------------------------
# Values


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """``"250ms"`` → 0.25; numbers are seconds. Negative or malformed values raise ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 250ms, 1s or 2m, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"expected a duration like 250ms, 1s or 2m, got {value!r}")
    if seconds < 0 or math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"a duration must be a finite number ≥ 0, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds >= 120 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_address(value: object) -> Address:
    """``host:port`` or ``[v6]:port``."""
    if not isinstance(value, str):
        raise ValueError(f"expected host:port, got {value!r}")
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9_.-]+):(\d{1,5})", value.strip())
    if not match:
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:15001), got {value!r}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise ValueError(f"port must be 1–65535, got {port}")
    return Address(host, port)


@dataclass(frozen=True, slots=True)
class Target:
    """One upstream endpoint. ``scheme`` is ``http`` or ``tcp``."""

    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.scheme == "http" and self.port == 80 else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"http://{self.authority}" if self.scheme == "http" else f"{self.host}:{self.port}"


def parse_target(value: object) -> Target:
    if not isinstance(value, str):
        raise ValueError(f"expected a target like http://host:port or host:port, got {value!r}")
    text = value.strip()
    if "://" in text:
        scheme, _, rest = text.partition("://")
        if scheme == "https":
            raise ValueError("https targets are not supported: TLS is terminated by the upstream's own proxy")
        if scheme != "http":
            raise ValueError(f"unsupported scheme {scheme!r} (use http://host:port, or host:port for tcp)")
        rest = rest.rstrip("/")
        if "/" in rest or "?" in rest:
            raise ValueError(f"a target is scheme://host:port, without a path: {value!r}")
        if not re.search(r":\d+$", rest):
            rest += ":80"
        address = parse_address(rest)
        return Target("http", address.host, address.port)
    address = parse_address(text)
    return Target("tcp", address.host, address.port)


_RETRY_KINDS = ("connect_error", "timeout", "reset", "bad_response")
_STATUS_GROUPS = {"5xx": range(500, 600), "gateway_error": (502, 503, 504), "retriable_4xx": (409,)}
_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "POST", "PATCH", "TRACE")


def parse_retry_on(value: object) -> str | int:
    if isinstance(value, int) and not isinstance(value, bool):
        if 100 <= value <= 599:
            return value
        raise ValueError(f"status codes are 100–599, got {value}")
    if isinstance(value, str):
        token = value.strip().lower().replace("-", "_")
        if token.isdigit():
            return parse_retry_on(int(token))
        if token in _RETRY_KINDS or token in _STATUS_GROUPS:
            return token
        hint = _did_you_mean(token, (*_RETRY_KINDS, *_STATUS_GROUPS))
        raise ValueError(f"unknown retry_on value {value!r}{hint}")
    raise ValueError(f"expected a failure kind or a status code, got {value!r}")


def parse_method(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z]+", value):
        raise ValueError(f"expected an HTTP method name, got {value!r}")
    return value.upper()


# ---------------------------------------------------------------------------------------------------------------
# The model. ``meta`` carries what the schema, the validator and ``explain`` need to know about a field.


def meta(
    doc: str,
    *,
    default: Any = dataclasses.MISSING,
    factory: Callable[[], Any] | None = None,
    duration: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: float | None = None,
    choices: tuple[str, ...] | None = None,
    parse: Callable[[object], Any] | None = None,
    schema: dict[str, Any] | None = None,
) -> Any:
    info = {
        "doc": doc,
        "duration": duration,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_minimum": exclusive_minimum,
        "choices": choices,
        "parse": parse,
        "schema": schema,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=info)
    return field(default=default, metadata=info)


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = meta("Time allowed to open a connection to a target.", default=1.0, duration=True)
    per_try: float = meta(
        "Time allowed for one attempt to produce response headers, and the longest silence between body chunks.",
        default=5.0,
        duration=True,
        exclusive_minimum=0,
    )
    total: float = meta(
        "Bound on all attempts and backoff together, until the response headers reach the client.",
        default=15.0,
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
        "Outcomes worth another try: connect_error, timeout, reset, bad_response, status codes, 5xx, "
        "gateway_error (502/503/504).",
        default=("connect_error", "reset", 502, 503, 504),
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

    def retry_kinds(self) -> frozenset[str]:
        return frozenset(v for v in self.retry_on if isinstance(v, str) and v in _RETRY_KINDS)

    def retry_statuses(self) -> frozenset[int]:
        statuses: set[int] = set()
        for value in self.retry_on:
            if isinstance(value, int):
                statuses.add(value)
            elif value in _STATUS_GROUPS:
                statuses.update(_STATUS_GROUPS[value])
        return frozenset(statuses)


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    path: str = meta("HTTP path probed with GET (http upstreams).", default="/health")
    interval: float = meta("Time between checks (with ±10% jitter).", default=10.0, duration=True, exclusive_minimum=0)
    timeout: float = meta("Time allowed for one check.", default=2.0, duration=True, exclusive_minimum=0)
    critical: bool = meta("A failing critical upstream makes /health answer 503 (unhealthy).", default=True)
    healthy_threshold: int = meta(
        "Consecutive passes before a failing upstream counts as healthy.", default=1, minimum=1
    )
    unhealthy_threshold: int = meta(
        "Consecutive failures before a healthy upstream counts as unhealthy.", default=2, minimum=1
    )
    probe: str = meta(
        "tcp upstreams: connect (a TCP connect), redis (PING → +PONG) or postgres (an SSLRequest answered).",
        default="connect",
        choices=("connect", "redis", "postgres"),
    )


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


@dataclass(frozen=True, slots=True)
class UpstreamPolicy:
    name: str
    listen: Address = meta(
        "Where this upstream's listener accepts connections.", default=Address("127.0.0.1", 0), parse=parse_address
    )
    targets: tuple[Target, ...] = meta(
        "Where requests go: http://host:port (http) or host:port (tcp).", default=(), parse=parse_target
    )
    protocol: str = meta(
        "http: L7 proxy with retries; tcp: byte relay with a connection-level breaker.",
        default="http",
        choices=("http", "tcp"),
    )
    balance: str = meta(
        "How a target is chosen among several.", default="round_robin", choices=("round_robin", "least_request")
    )
    preserve_host: bool = meta("Forward the client's Host header instead of the target's authority.", default=False)
    timeouts: Timeouts = meta("Connect, per-try and total deadlines.", factory=Timeouts)
    breaker: BreakerPolicy = meta("When to stop sending traffic, and for how long.", factory=BreakerPolicy)
    retry: RetryPolicy = meta("When and how to try again.", factory=RetryPolicy)
    health: HealthPolicy | None = meta("Active checks, run without traffic. Off when absent.", default=None)
    fallback: FallbackPolicy | None = meta("The answer given while the breaker is open (default: 503).", default=None)
    limits: LimitsPolicy = meta("Bulkhead: in-flight and pending bounds.", factory=LimitsPolicy)
    outlier: OutlierPolicy | None = meta(
        "Per-target ejection for upstreams with several targets.", factory=OutlierPolicy
    )


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
UPSTREAM_ONLY = ("name", "listen", "targets")


# ---------------------------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    file: str
    line: int  # 1-based; 0 when unknown
    column: int
    path: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        prefix = "warning: " if self.severity == "warning" else ""
        if not self.line and not self.path:  # about the file as a whole (missing, unreadable)
            return f"{self.file}: {prefix}{self.message}"
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        return f"{where}: {self.path or '<root>'}: {prefix}{self.message}"


class ConfigError(Exception):
    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = [i for i in issues if i.severity == "error"]
        self.warnings = [i for i in issues if i.severity == "warning"]
        super().__init__("\n".join(str(i) for i in self.issues))


# ---------------------------------------------------------------------------------------------------------------
# YAML with provenance


@dataclass(slots=True)
class Sourced:
    """A YAML value with where it was written: its mark and its key path."""

    value: Any  # scalar, dict[str, Sourced] or list[Sourced]
    line: int
    column: int
    path: str


_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


def substitute_env(text: str, environ: Mapping[str, str]) -> str:
    """``${VAR}``, ``${VAR:-default}`` (default when unset or empty), ``${VAR-default}`` (when unset), ``$$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, default = match.group(1), match.group(2), match.group(3)
        value = environ.get(name)
        if op == ":-" and not value:
            return default or ""
        if op == "-" and value is None:
            return default or ""
        if value is None:
            raise ValueError(f"environment variable {name} is not set (write ${{{name}:-default}} to give one)")
        return value

    return _ENV_REF.sub(replace, text)


class _Unresolved:
    """A value whose environment reference could not be resolved: already reported, judged no further."""

    def __repr__(self) -> str:
        return "<unresolved>"


UNRESOLVED: Any = _Unresolved()


class _Reader:
    def __init__(self, file: str, environ: Mapping[str, str]) -> None:
        self.file = file
        self.environ = environ
        self.issues: list[ConfigIssue] = []
        self._constructor = yaml.SafeLoader("")
        self._resolver = yaml.resolver.Resolver()

    def error(self, node: Sourced | None, path: str, message: str, severity: str = "error") -> None:
        line, column = (node.line, node.column) if node else (0, 0)
        issue = ConfigIssue(self.file, line, column, path, message, severity)
        if issue not in self.issues:
            self.issues.append(issue)

    def read(self, text: str) -> Sourced | None:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = " ".join(filter(None, [exc.context, exc.problem])) or str(exc)
            line, column = (mark.line + 1, mark.column + 1) if mark else (0, 0)
            self.issues.append(ConfigIssue(self.file, line, column, "", f"invalid YAML: {problem}"))
            return None
        except yaml.YAMLError as exc:
            self.issues.append(ConfigIssue(self.file, 0, 0, "", f"invalid YAML: {exc}"))
            return None
        if root is None:
            return Sourced({}, 1, 1, "")
        return self._node(root, "")

    def _node(self, node: yaml.Node, path: str) -> Sourced:
        line, column = node.start_mark.line + 1, node.start_mark.column + 1
        if isinstance(node, yaml.MappingNode):
            children: dict[str, Sourced] = {}
            for key_node, value_node in node.value:
                key = str(key_node.value)
                child_path = f"{path}.{key}" if path else key
                if key in children:
                    self.issues.append(
                        ConfigIssue(
                            self.file,
                            key_node.start_mark.line + 1,
                            key_node.start_mark.column + 1,
                            child_path,
                            "duplicate key",
                        )
                    )
                    continue
                child = self._node(value_node, child_path)
                # Point at the key, not the value: that is where an editor's eye goes.
                child.line, child.column = key_node.start_mark.line + 1, key_node.start_mark.column + 1
                children[key] = child
            return Sourced(children, line, column, path)
        if isinstance(node, yaml.SequenceNode):
            items = [self._node(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
            return Sourced(items, line, column, path)
        assert isinstance(node, yaml.ScalarNode)
        return Sourced(self._scalar(node, path, line, column), line, column, path)

    def _scalar(self, node: yaml.ScalarNode, path: str, line: int, column: int) -> Any:
        raw = node.value
        if "$" in raw:
            try:
                substituted = substitute_env(raw, self.environ)
            except ValueError as exc:
                self.issues.append(ConfigIssue(self.file, line, column, path, str(exc)))
                return UNRESOLVED
            if substituted != raw:
                if node.style is None:  # plain scalar: resolve the result as YAML would have ("3" → 3)
                    tag = self._resolver.resolve(yaml.ScalarNode, substituted, (True, False))  # type: ignore[no-untyped-call]
                    return self._constructor.construct_object(yaml.ScalarNode(tag, substituted))
                return substituted
        return self._constructor.construct_object(node)


def _merge(base: Sourced, override: Sourced) -> Sourced:
    """Defaults under an upstream: mappings merge key by key, anything else is replaced."""
    if not (isinstance(base.value, dict) and isinstance(override.value, dict)):
        return override
    merged = dict(base.value)
    for key, value in override.value.items():
        merged[key] = _merge(merged[key], value) if key in merged else value
    return Sourced(merged, override.line, override.column, override.path)


def _did_you_mean(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _key_hint(cls: type, key: str, known: typing.Iterable[str]) -> str:
    """A spelling hint, or else where the key belongs when it is a field of one of ``cls``'s sections."""
    hint = _did_you_mean(key, known)
    if hint:
        return hint
    for f, tp in model_fields(cls):
        inner, _ = _unwrap_optional(tp)
        if f.name in known and dataclasses.is_dataclass(inner):
            names = [g.name for g in dataclasses.fields(inner)]
            if key in names:
                return f" (it belongs under {f.name}: {f.name}.{key})"
    return ""


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True  # noqa: UP007
    return tp, False


def model_fields(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield f, hints[f.name]


class _Builder:
    """Turns sourced YAML into dataclasses, reporting every bad key and value rather than stopping at the first.

    A field whose value is bad is left at its default so the rest of the section is still checked; ``failed``
    remembers it (by logical path, e.g. ``upstreams.api.timeouts.per_try``) so cross-field rules do not judge
    a stand-in default.
    """

    def __init__(self, reader: _Reader) -> None:
        self.reader = reader
        self.failed: set[str] = set()

    def broken(self, where: str) -> bool:
        """True when ``where`` or any section containing it failed to convert."""
        parts = where.split(".")
        return any(".".join(parts[:n]) in self.failed for n in range(1, len(parts) + 1))

    def build(
        self, cls: type, node: Sourced, skip: tuple[str, ...] = (), where: str | None = None, **fixed: Any
    ) -> Any:
        where = node.path if where is None else where
        if not isinstance(node.value, dict):
            self.reader.error(node, node.path, "expected a mapping of keys")
            self.failed.add(where)
            return None
        known = {f.name for f in dataclasses.fields(cls)} - set(fixed) - set(skip)
        for key, child in node.value.items():
            if key not in known:
                self.reader.error(child, child.path, f"unknown key{_key_hint(cls, key, known)}")
        values: dict[str, Any] = dict(fixed)
        for f, tp in model_fields(cls):
            if f.name in fixed or f.name in skip:
                continue
            child = node.value.get(f.name)
            if child is None:
                continue  # dataclass default applies
            field_where = f"{where}.{f.name}" if where else f.name
            ok, value = self.convert(f, tp, child, field_where)
            if ok:
                values[f.name] = value
            else:
                self.failed.add(field_where)  # keep the default so the other keys are still checked
        try:
            return cls(**values)
        except TypeError as exc:  # a required field without a default
            self.reader.error(node, node.path, str(exc))
            self.failed.add(where)
            return None

    def convert(self, f: dataclasses.Field[Any], tp: Any, node: Sourced, where: str) -> tuple[bool, Any]:
        info = f.metadata
        tp, optional = _unwrap_optional(tp)
        value = node.value
        if value is UNRESOLVED:
            return False, None
        if value is None:
            if optional:
                return True, None
            self.reader.error(node, node.path, "a value is required here")
            return False, None
        if dataclasses.is_dataclass(tp) and not info.get("parse"):
            built = self.build(typing.cast(type, tp), node, where=where)
            return built is not None, built
        if typing.get_origin(tp) is tuple:
            items = value if isinstance(value, list) else None
            if items is None:
                self.reader.error(node, node.path, "expected a list")
                return False, None
            converted = []
            ok = True
            for item in items:
                good, item_value = self._scalar(info, typing.get_args(tp)[0], item)
                ok &= good
                converted.append(item_value)
            return ok, tuple(converted)
        return self._scalar(info, tp, node)

    def _scalar(self, info: Mapping[str, Any], tp: Any, node: Sourced) -> tuple[bool, Any]:
        value = node.value
        if value is UNRESOLVED:
            return False, None
        if isinstance(value, dict | list):
            self.reader.error(
                node, node.path, "expected a single value, not a " + ("mapping" if isinstance(value, dict) else "list")
            )
            return False, None
        try:
            if info.get("parse"):
                result = info["parse"](value)
            elif info.get("duration"):
                result = parse_duration(value)
            elif tp is bool:
                if not isinstance(value, bool):
                    raise ValueError(f"expected true or false, got {value!r}")
                result = value
            elif tp is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"expected an integer, got {value!r}")
                result = value
            elif tp is float:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"expected a number, got {value!r}")
                result = float(value)
            elif tp is str:
                if not isinstance(value, str):
                    raise ValueError(f"expected a string, got {value!r}")
                result = value
            else:
                raise ValueError(f"expected {_type_name(tp)}, got {value!r}")
        except ValueError as exc:
            self.reader.error(node, node.path, str(exc))
            return False, None
        choices = info.get("choices")
        if choices and result not in choices:
            self.reader.error(
                node, node.path, f"must be one of {', '.join(choices)}{_did_you_mean(str(result), choices)}"
            )
            return False, None
        if isinstance(result, int | float) and not isinstance(result, bool):
            low, high, above = info.get("minimum"), info.get("maximum"), info.get("exclusive_minimum")
            if low is not None and result < low:
                self.reader.error(node, node.path, f"must be ≥ {low:g}, got {value}")
                return False, None
            if above is not None and result <= above:
                self.reader.error(node, node.path, f"must be > {above:g}, got {value}")
                return False, None
            if high is not None and result > high:
                self.reader.error(node, node.path, f"must be ≤ {high:g}, got {value}")
                return False, None
        return True, result


def _check_upstream(builder: _Builder, up: UpstreamPolicy, node: Sourced) -> None:
    """Cross-field rules: things each key allows alone but that make no sense together.

    A rule is skipped when one of its keys was itself invalid: it would judge the stand-in default, not what
    the operator wrote, and the key already has its own error.
    """
    reader = builder.reader
    children = node.value if isinstance(node.value, dict) else {}

    def ok(*keys: str) -> bool:
        return not any(builder.broken(f"{node.path}.{key}") for key in keys)

    def at(*keys: str) -> Sourced:
        current: Sourced = node
        for key in keys:
            inner = current.value.get(key) if isinstance(current.value, dict) else None
            if inner is None:
                return current
            current = inner
        return current

    path = node.path
    if ok("targets") and ("targets" not in children or not up.targets):
        reader.error(node, f"{path}.targets", "at least one target is required")
    for target in up.targets if ok("protocol") else ():
        wanted = "tcp" if up.protocol == "tcp" else "http"
        if target.scheme != wanted:
            example = "host:port" if wanted == "tcp" else "http://host:port"
            reader.error(
                at("targets"),
                f"{path}.targets",
                f"{target} is not a {wanted} target (write {example} for protocol {up.protocol})",
            )
    if "listen" not in children:
        reader.error(node, f"{path}.listen", "a listen address is required")
    retry = up.retry
    if ok("retry.max_delay", "retry.base_delay") and retry.max_delay < retry.base_delay:
        reader.error(
            at("retry", "max_delay"),
            f"{path}.retry.max_delay",
            f"max_delay ({format_duration(retry.max_delay)}) is shorter than base_delay "
            f"({format_duration(retry.base_delay)})",
        )
    t = up.timeouts
    if ok("timeouts.per_try", "timeouts.total") and t.per_try > t.total:
        reader.error(
            at("timeouts", "per_try"),
            f"{path}.timeouts.per_try",
            f"per_try ({format_duration(t.per_try)}) is longer than total ({format_duration(t.total)})",
        )
    if ok("timeouts.connect", "timeouts.per_try") and t.connect > t.per_try:
        reader.error(
            at("timeouts", "connect"),
            f"{path}.timeouts.connect",
            f"connect ({format_duration(t.connect)}) is longer than per_try ({format_duration(t.per_try)})",
        )
    b = up.breaker
    if ok("breaker.slow_call_rate_threshold", "breaker.slow_call_duration") and (
        (b.slow_call_rate_threshold is None) != (b.slow_call_duration is None)
    ):
        reader.error(at("breaker"), f"{path}.breaker", "slow_call_duration and slow_call_rate_threshold go together")
    if (
        ok("outlier.max_ejection", "outlier.base_ejection")
        and up.outlier
        and (up.outlier.max_ejection < up.outlier.base_ejection)
    ):
        reader.error(
            at("outlier", "max_ejection"), f"{path}.outlier.max_ejection", "max_ejection is shorter than base_ejection"
        )
    if up.protocol == "tcp" and "fallback" in children:
        reader.error(at("fallback"), f"{path}.fallback", "a tcp upstream has no HTTP fallback answer")


def load_text(
    text: str, file: str = "<string>", environ: Mapping[str, str] | None = None
) -> tuple[SidecarConfig | None, list[ConfigIssue]]:
    """Parse and validate. Returns the config (None if any error) and every issue found, errors and warnings."""
    reader = _Reader(file, os.environ if environ is None else environ)
    root = reader.read(text)
    if root is None:
        return None, reader.issues
    builder = _Builder(reader)
    if not isinstance(root.value, dict):
        reader.error(root, "", "the policy file must be a mapping with admin, defaults and upstreams")
        return None, reader.issues
    top = root.value
    for key, child in top.items():
        if key not in TOP_LEVEL:
            reader.error(child, key, f"unknown key{_did_you_mean(key, TOP_LEVEL)}")

    def section(key: str, cls: type) -> Any:
        node = top.get(key)
        if node is None or node.value is None:
            return cls()
        return builder.build(cls, node)

    admin = section("admin", AdminPolicy)
    http = section("http", HttpServerPolicy)
    logging_policy = section("logging", LoggingPolicy)
    allow_non_loopback = False
    if "allow_non_loopback" in top:
        node = top["allow_non_loopback"]
        if isinstance(node.value, bool):
            allow_non_loopback = node.value
        elif node.value is not UNRESOLVED:
            reader.error(node, "allow_non_loopback", f"expected true or false, got {node.value!r}")

    defaults = top.get("defaults") or Sourced({}, 0, 0, "defaults")
    if defaults.value is None:
        defaults = Sourced({}, defaults.line, defaults.column, "defaults")
    if not isinstance(defaults.value, dict):
        reader.error(defaults, "defaults", "expected a mapping of keys")
        defaults = Sourced({}, defaults.line, defaults.column, "defaults")
    for key in UPSTREAM_ONLY:
        if key in defaults.value:
            reader.error(defaults.value[key], f"defaults.{key}", f"{key} is set per upstream, not in defaults")

    upstreams: list[UpstreamPolicy] = []
    ups_node = top.get("upstreams")
    if ups_node is None or not ups_node.value:
        reader.error(ups_node or root, "upstreams", "at least one upstream is required")
    elif not isinstance(ups_node.value, dict):
        reader.error(ups_node, "upstreams", "expected a mapping of upstream name → policy")
    else:
        for name, up_node in ups_node.value.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name):
                reader.error(up_node, up_node.path, "names are letters, digits, '-', '_' and '.' (≤ 63)")
                continue
            if not isinstance(up_node.value, dict):
                reader.error(up_node, up_node.path, "expected a mapping of keys")
                continue
            inherited = {k: v for k, v in defaults.value.items() if k not in UPSTREAM_ONLY}
            merged = _merge(Sourced(inherited, defaults.line, defaults.column, "defaults"), up_node)
            merged.path = up_node.path
            policy = builder.build(UpstreamPolicy, merged, name=name)
            if policy is not None:  # possibly partial (bad keys at defaults): its other rules still get checked
                _check_upstream(builder, policy, merged)
                upstreams.append(policy)

    if admin is not None:
        admin_node = top.get("admin")
        listens: list[tuple[str, Address, Sourced | None]] = []
        if not builder.broken("admin.listen"):
            listen_node = admin_node.value.get("listen") if admin_node and isinstance(admin_node.value, dict) else None
            listens.append(("admin.listen", admin.listen, listen_node or admin_node))
        for u in upstreams:
            up_value = ups_node.value[u.name].value if ups_node is not None else {}
            # An absent or invalid listen already has its error; its stand-in must not collide with others.
            if "listen" in up_value and not builder.broken(f"upstreams.{u.name}.listen"):
                listens.append((f"upstreams.{u.name}.listen", u.listen, up_value["listen"]))
        seen: dict[Address, str] = {}
        for path, address, node in listens:
            other = seen.get(address)
            if other is not None:
                reader.error(node, path, f"{address} is already used by {other}")
            seen[address] = path
        for path, address, node in listens:
            if not address.is_loopback and not allow_non_loopback:
                reader.error(
                    node,
                    path,
                    f"{address} is not a loopback address: reachable from other hosts "
                    "(set allow_non_loopback: true to silence this)",
                    severity="warning",
                )

    errors = [i for i in reader.issues if i.severity == "error"]
    if errors or admin is None or http is None or logging_policy is None:
        return None, sorted(reader.issues, key=lambda i: (i.line, i.column))
    config = SidecarConfig(
        admin=admin,
        http=http,
        logging=logging_policy,
        upstreams=tuple(upstreams),
        allow_non_loopback=allow_non_loopback,
        source=file,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
    )
    return config, sorted(reader.issues, key=lambda i: (i.line, i.column))


def load_file(path: str | Path, environ: Mapping[str, str] | None = None) -> SidecarConfig:
    """Load a policy file or raise ``ConfigError`` with every problem in it."""
    file = str(path)
    try:
        # Bytes decoded as-is (no newline translation), so ``sha256`` is the hash of the file on disk.
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(file, 0, 0, "", f"cannot read: {exc.strerror or exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigIssue(file, 0, 0, "", f"not UTF-8 text: {exc.reason}")]) from exc
    config, issues = load_text(text, file, environ)
    if config is None:
        raise ConfigError(issues)
    return config
