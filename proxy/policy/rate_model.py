"""The model of ``rate_limit``: an upstream's outbound limits, as the upstream counts them, and a route's own."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.policy.fields import meta
from proxy.policy.values import parse_cooldown_status, parse_header_name, parse_redis_url, parse_shared_key

RATE_WINDOWS = ("sliding", "fixed")


@dataclass(frozen=True, slots=True)
class RateLimitWindow:
    """One limit: at most `requests` (weighted) sent upstream per `per`."""

    requests: int = meta(
        "Weighted requests allowed per window (a route's weight is what each of its requests costs).", minimum=1
    )
    per: float = meta("The window's length.", duration=True, exclusive_minimum=0)
    window: str = meta(
        "sliding: no span of `per` ever holds more than `requests` sends (an exchange's rolling count); fixed: "
        "counted per calendar window aligned to the epoch (per: 1m = each wall-clock minute, as Binance counts).",
        default="sliding",
        choices=RATE_WINDOWS,
    )

    @property
    def fixed(self) -> bool:
        return self.window == "fixed"


@dataclass(frozen=True, slots=True)
class RateLimitObserve:
    """Upstream answer headers that report usage; the local count of one limit is corrected from them."""

    used: str | None = meta(
        "Header carrying the weight used in the upstream's current window (Binance: X-MBX-USED-WEIGHT-1M).",
        default=None,
        parse=parse_header_name,
    )
    remaining: str | None = meta(
        "Header carrying the weight left in the upstream's current window.", default=None, parse=parse_header_name
    )
    reset: str | None = meta(
        "Header carrying the seconds until that window resets (with remaining).", default=None, parse=parse_header_name
    )
    limit: int = meta(
        "Which entry of rate_limit.limits the reported usage is about (0: the first).", default=0, minimum=0
    )
    standard: bool = meta(
        "Read the IETF RateLimit / RateLimit-Policy headers and X-RateLimit-Remaining / X-RateLimit-Reset "
        "(`observe: standard` is short for this).",
        default=False,
    )


@dataclass(frozen=True, slots=True)
class SharedRateLimit:
    """One budget for every sidecar using the same Redis key (limits counted per IP, services on one host)."""

    redis: str = meta(
        "redis://host:port/db, rediss:// (TLS) or unix:///path of the Redis holding the windows.", parse=parse_redis_url
    )
    key: str = meta(
        "Names the budget: every sidecar with this key (and the same limits) counts against one limit.",
        parse=parse_shared_key,
    )
    fallback_share: int = meta(
        "Redis unreachable: each sidecar counts 1/fallback_share of the limits locally (set it to the number of "
        "sidecars sharing the key to stay under the limit together).",
        default=1,
        minimum=1,
    )
    timeout: float = meta(
        "Longest a request waits for Redis before the fallback is used.",
        default=0.01,
        duration=True,
        exclusive_minimum=0,
    )


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    """Outbound rate limit: never send the upstream more than it allows, counted as it counts."""

    limits: tuple[RateLimitWindow, ...] = meta(
        "Every limit must allow a request; its weight is spent on all of them. Empty: no limit of our own, only "
        "the cool-down on the upstream's Retry-After.",
        default=(),
    )
    margin: float = meta(
        "Sliding windows: each send counts for per + margin, so network jitter cannot put two sends that left "
        "`per` apart into one of the upstream's windows.",
        default=0.02,
        duration=True,
    )
    max_wait: float = meta(
        "A request waits in a first-come line for its tokens (or for a cool-down to end) up to this long; "
        "otherwise the sidecar answers 429 rate_limited (or upstream_cooldown) with Retry-After, sending nothing.",
        default=0.0,
        duration=True,
    )
    cooldown_on: tuple[int, ...] = meta(
        "Upstream statuses that, with a Retry-After, pause the whole upstream until then (never retried, never "
        "a breaker failure).",
        default=(429, 418),
        parse=parse_cooldown_status,
    )
    max_cooldown: float = meta(
        "Cap on the pause a Retry-After asks for.", default=3600.0, duration=True, exclusive_minimum=0
    )
    observe: RateLimitObserve | None = meta(
        "Usage the upstream reports in its answers (`standard` or named headers), so the sidecar slows down "
        "before the upstream has to answer 429. Off when absent.",
        default=None,
        shorthand={"standard": RateLimitObserve(standard=True)},
    )
    shared: SharedRateLimit | None = meta(
        "Count the windows and the cool-down in Redis, together with every sidecar using the same key. Local "
        "to this sidecar when absent.",
        default=None,
    )


@dataclass(frozen=True, slots=True)
class RouteRateLimit:
    """A route's own limits, counted for its requests only, on top of the upstream's."""

    limits: tuple[RateLimitWindow, ...] = meta(
        "Limits counted for this route's requests only; they must allow a request as well as the upstream's.",
        default=(),
    )
    max_wait: float | None = meta(
        "This route's wait for tokens (absent: the upstream's rate_limit.max_wait).", default=None, duration=True
    )
