"""Policy values: durations, addresses, targets, failure kinds and methods, each parsed in one place."""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import typing
from dataclasses import dataclass

from proxy.resilience.failures import FailureKind
from proxy.resilience.grpc import GrpcStatus, why_not_retryable

# Each value's syntax, written once: the loader matches it and the JSON Schema publishes it, so the patterns
# stay within what both Python's re and ECMA-262 (JSON Schema's dialect) read alike.
DURATION_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$"
ADDRESS_PATTERN = r"^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9_.-]+)):(\d{1,5})$"
HTTP_TARGET_PATTERN = r"^https?://(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::\d{1,5})?/?$"
METHOD_PATTERN = r"^[A-Za-z]+$"
UPSTREAM_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
ROUTE_PATH_PATTERN = r'^/[!-"$->@-~]*$'  # visible ASCII but '?' and '#': matching ignores the query string
HEADER_NAME_PATTERN = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"  # an HTTP token (RFC 9110)
REDIS_URL_PATTERN = r"^(?:rediss?://[^\s/?#]+(?:/\d*)?(?:\?\S*)?|unix:///\S+)$"
SHARED_KEY_PATTERN = r"^[!-~]{1,200}$"  # visible ASCII: the Redis keys are built from it

_DURATION = re.compile(DURATION_PATTERN)
_ADDRESS = re.compile(ADDRESS_PATTERN)
_METHOD = re.compile(METHOD_PATTERN)
UPSTREAM_NAME = re.compile(UPSTREAM_NAME_PATTERN)
_ROUTE_PATH = re.compile(ROUTE_PATH_PATTERN)
_HEADER_NAME = re.compile(HEADER_NAME_PATTERN)
_REDIS_URL = re.compile(REDIS_URL_PATTERN)
_SHARED_KEY = re.compile(SHARED_KEY_PATTERN)
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
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
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
    match = _ADDRESS.match(value.strip())
    if not match:
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:15001), got {value!r}")
    host = match.group(1) or match.group(2)
    port = int(match.group(3))
    if not 0 < port < 65536:
        raise ValueError(f"port must be 1–65535, got {port}")
    return Address(host, port)


_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Target:
    """One upstream endpoint. ``scheme`` is ``http``, ``https`` or ``tcp``."""

    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if _DEFAULT_PORTS.get(self.scheme) == self.port else f"{host}:{self.port}"

    @property
    def is_tls(self) -> bool:
        return self.scheme == "https"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}" if self.scheme != "tcp" else f"{self.host}:{self.port}"


def parse_target(value: object) -> Target:
    if not isinstance(value, str):
        raise ValueError(f"expected a target like http://host:port, https://host:port or host:port, got {value!r}")
    text = value.strip()
    if "://" in text:
        scheme, _, rest = text.partition("://")
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(
                f"unsupported scheme {scheme!r} (use http://host:port, https://host:port, or host:port for tcp)"
            )
        rest = rest.rstrip("/")
        if "/" in rest or "?" in rest:
            raise ValueError(f"a target is scheme://host:port, without a path: {value!r}")
        if not re.search(r":\d+$", rest):
            rest += f":{_DEFAULT_PORTS[scheme]}"
        address = parse_address(rest)
        return Target(scheme, address.host, address.port)
    address = parse_address(text)
    return Target("tcp", address.host, address.port)


RETRY_KINDS: tuple[str, ...] = tuple(kind.value for kind in FailureKind)  # plain strings, as written in YAML
STATUS_GROUPS = {"5xx": range(500, 600), "gateway_error": (502, 503, 504), "retriable_4xx": (409,)}
METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "POST", "PATCH", "TRACE")


def parse_retry_on(value: object) -> str | int:
    if isinstance(value, int) and not isinstance(value, bool):
        if 100 <= value <= 599:
            return value
        raise ValueError(f"status codes are 100–599, got {value}")
    if isinstance(value, str):
        token = value.strip().lower().replace("-", "_")
        if token.isdigit():
            return parse_retry_on(int(token))
        if token in RETRY_KINDS or token in STATUS_GROUPS:
            return token
        hint = did_you_mean(token, (*RETRY_KINDS, *STATUS_GROUPS))
        raise ValueError(f"unknown retry_on value {value!r}{hint}")
    raise ValueError(f"expected a failure kind or a status code, got {value!r}")


GRPC_STATUS_WORDS: tuple[str, ...] = tuple(status.word for status in GrpcStatus)


def _grpc_status(value: object) -> GrpcStatus:
    """A gRPC status as a policy writes it: its lower-case name (``unavailable``) or its number 0–16."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value <= 16:
            return GrpcStatus(value)
        raise ValueError(f"gRPC status codes are 0–16, got {value}")
    if isinstance(value, str):
        token = value.strip().lower().replace("-", "_")
        if token in GRPC_STATUS_WORDS:
            return GrpcStatus[token.upper()]
        raise ValueError(f"unknown gRPC status {value!r}{did_you_mean(token, GRPC_STATUS_WORDS)}")
    raise ValueError(f"expected a gRPC status such as unavailable, got {value!r}")


def parse_grpc_retry_on(value: object) -> str:
    """A status ``grpc.retry_on`` may name: unavailable, deadline_exceeded, internal or resource_exhausted."""
    status = _grpc_status(value)
    why = why_not_retryable(status)
    if why is not None:
        raise ValueError(f"{status.word} cannot be retried: {why}")
    return status.word


def parse_grpc_failure_on(value: object) -> str:
    """A status ``grpc.failure_on`` may name: any but ok."""
    status = _grpc_status(value)
    if status is GrpcStatus.OK:
        raise ValueError("ok is a success, never a failure")
    return status.word


def parse_method(value: object) -> str:
    if not isinstance(value, str) or not _METHOD.match(value):
        raise ValueError(f"expected an HTTP method name, got {value!r}")
    return value.upper()


def parse_route_path(value: object) -> str:
    """A route's path or path prefix: starts with '/', visible ASCII, no query string."""
    if not isinstance(value, str):
        raise ValueError(f"expected a path starting with '/', got {value!r}")
    if not value.startswith("/"):
        raise ValueError(f"a path starts with '/', got {value!r}")
    if "?" in value or "#" in value:
        raise ValueError(f"routes match the path without its query string: {value!r} has '?' or '#'")
    if not _ROUTE_PATH.match(value):
        raise ValueError(f"a path is visible ASCII without spaces (percent-encode the rest), got {value!r}")
    return value


def parse_route_name(value: object) -> str:
    if not isinstance(value, str) or not UPSTREAM_NAME.match(value):
        raise ValueError(f"route names are letters, digits, '-', '_' and '.' (≤ 63), got {value!r}")
    return value


def parse_cooldown_status(value: object) -> int:
    """A status an upstream says "slow down" with: 4xx or 5xx (429, 418, 503…)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a status code, got {value!r}")
    if not 400 <= value <= 599:
        raise ValueError(f"a cool-down status is a 4xx or 5xx, got {value}")
    return value


def parse_header_name(value: object) -> str:
    """An HTTP header name, lower-cased: names match case-insensitively."""
    if not isinstance(value, str) or not _HEADER_NAME.match(value):
        raise ValueError(f"expected a header name such as X-MBX-USED-WEIGHT-1M, got {value!r}")
    return value.lower()


def parse_redis_url(value: object) -> str:
    """redis://[user:password@]host[:port][/db], rediss:// (TLS) or unix:///path/to/socket."""
    text = value.strip() if isinstance(value, str) else ""
    if text.startswith("unix://") and not text.startswith("unix:///"):
        raise ValueError(f"a unix:// URL names an absolute socket path (unix:///run/redis.sock), got {value!r}")
    if not _REDIS_URL.match(text):
        raise ValueError(f"expected a Redis URL (redis://host:6379/0, rediss://… or unix:///path), got {value!r}")
    host = text.partition("://")[2].split("/", 1)[0].rpartition("@")[2]
    if not text.startswith("unix://") and not re.fullmatch(
        r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::\d{1,5})?", host
    ):
        raise ValueError(f"expected redis://host[:port][/db], got {value!r}")
    return text


def parse_shared_key(value: object) -> str:
    if not isinstance(value, str) or not _SHARED_KEY.match(value):
        raise ValueError(f"a shared key is 1–200 visible ASCII characters without spaces, got {value!r}")
    return value


def did_you_mean(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
