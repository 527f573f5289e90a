"""What an upstream's ``rate_limit`` does, in words, for ``sidecar explain``.

"at most 10 req/s sustained (sliding, +20ms margin) and 1200 per calendar minute; a caller waits ≤ 500ms,
else 429 rate_limited; 429/418 + Retry-After pause the upstream (≤ 1h); route depth costs 10; …"
"""

from __future__ import annotations

import dataclasses
import re

from proxy.policy.model import RoutePolicy, UpstreamPolicy
from proxy.policy.rate_model import RateLimitPolicy, RateLimitWindow
from proxy.policy.values import format_duration
from proxy.resilience.ratelimit import Refusal

_PER_UNIT = {1.0: "s", 60.0: "min", 3600.0: "h"}
_CALENDAR = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day"}
_PASSWORD = re.compile(r"(://[^:@/]*):[^@/]*@")


def _d(seconds: float) -> str:
    return format_duration(round(seconds, 6))


def without_password(url: str) -> str:
    """A Redis URL fit for a terminal or a CI log: its password replaced by ***."""
    return _PASSWORD.sub(r"\1:***@", url)


def describe_rate(limit: RateLimitWindow, margin: float) -> str:
    """``10 req/s sustained (sliding, +20ms margin)``, ``1200 per calendar minute``."""
    n, per = limit.requests, limit.per
    if limit.fixed:
        unit = _CALENDAR.get(per)
        return f"{n} per calendar {unit}" if unit else f"{n} per fixed {_d(per)} window (aligned to the epoch)"
    unit = _PER_UNIT.get(per)
    rate = f"{n} req/{unit}" if unit else f"{n} per {_d(per)}"
    return f"{rate} sustained (sliding{f', +{_d(margin)} margin' if margin else ''})"


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _waiting(rate: RateLimitPolicy) -> str:
    if rate.max_wait > 0:
        return (
            f"A caller waits ≤ {_d(rate.max_wait)} for its tokens, first come first served, else is answered 429 "
            f"{Refusal.RATE_LIMITED} with Retry-After; nothing is sent upstream."
        )
    return f"A request without tokens is answered 429 {Refusal.RATE_LIMITED} with Retry-After at once (max_wait 0)."


def _cooldown(rate: RateLimitPolicy) -> str:
    if not rate.cooldown_on:
        return "The upstream's Retry-After answers pause nothing (cooldown_on is empty)."
    statuses = "/".join(str(s) for s in rate.cooldown_on)
    return (
        f"{statuses} + Retry-After pause the upstream (≤ {_d(rate.max_cooldown)}): meanwhile requests get 429 "
        f"{Refusal.UPSTREAM_COOLDOWN} with the time left (or wait, when max_wait covers it). Such an answer is "
        "delivered as it came, never retried and never a breaker failure."
    )


def _observe(rate: RateLimitPolicy) -> str | None:
    observe = rate.observe
    if observe is None:
        return None
    if observe.standard:
        source = "the IETF RateLimit/RateLimit-Policy and X-RateLimit-Remaining/-Reset headers"
    else:
        named = [f"{h} ({what})" for what, h in (("used", observe.used), ("remaining", observe.remaining)) if h]
        source = _and(named) + (f" with {observe.reset} (reset)" if observe.reset else "")
    about = (
        f"limit {observe.limit} ({describe_rate(rate.limits[observe.limit], rate.margin)})"
        if observe.limit < len(rate.limits)
        else f"limit {observe.limit}"
    )
    return (
        f"Usage the upstream reports in {source} corrects the count of {about} after every answer, so the sidecar "
        "slows down before the upstream has to answer 429 when others spend the same budget."
    )


def _shared(rate: RateLimitPolicy) -> str | None:
    shared = rate.shared
    if shared is None:
        return None
    return (
        f"Shared through redis key {shared.key} ({without_password(shared.redis)}) with every sidecar using it: "
        f"one budget and one cool-down. Redis unreachable or slower than {_d(shared.timeout)}: each sidecar "
        f"counts 1/{shared.fallback_share} of the limits locally (fallback) until it is back."
    )


def _route_label(route: RoutePolicy) -> str:
    if route.name is not None and not route.name.startswith("routes["):
        return route.name
    m = route.match
    return f"{route.name} ({m.path if m.path is not None else m.path_prefix})"


def route_costs(policy: UpstreamPolicy) -> str | None:
    """``route depth costs 10; route orders also counts 10 req/s …``: the routes that differ from weight 1."""
    rate = policy.rate_limit
    if rate is None:
        return None
    words: list[str] = []
    for route in policy.routes:
        own = route.rate_limit
        if route.weight == 1 and (own is None or not own.limits):
            continue
        text = f"route {_route_label(route)}"
        text += f" costs {route.weight}" if route.weight != 1 else ""
        if own is not None and own.limits:
            text += (" and" if route.weight != 1 else "") + " also counts against "
            text += _and([describe_rate(w, rate.margin) for w in own.limits]) + " of its own"
        words.append(text)
    return ("Weights: " + "; ".join(words) + " (every other request costs 1).") if words else None


def rate_limit_words(policy: UpstreamPolicy) -> tuple[list[str], list[str]]:
    """What the rate limit does (consequences) and what in it cancels something else out (contradictions)."""
    rate = policy.rate_limit
    if rate is None or policy.protocol == "tcp":
        return [], []
    if rate.limits:
        rates = _and([describe_rate(w, rate.margin) for w in rate.limits])
        weighted = any(route.weight != 1 for route in policy.routes)
        head = f"Rate limit: at most {rates}{', in weight' if weighted else ''}; every limit must allow a request."
    else:
        head = "Rate limit: no limit of its own; only the upstream's Retry-After pauses it."
    said = [head, _waiting(rate), _cooldown(rate), route_costs(policy), _observe(rate), _shared(rate)]
    flags: list[str] = []
    retried = sorted(policy.retry.retry_statuses() & set(rate.cooldown_on))
    if retried and policy.retry.max_retries > 0:
        flags.append(
            f"retry.retry_on covers {', '.join(map(str, retried))}, which rate_limit.cooldown_on turns into a "
            "cool-down: such an answer with Retry-After is never retried."
        )
    if rate.max_wait >= policy.timeouts.total > 0:
        flags.append(
            f"rate_limit.max_wait ({_d(rate.max_wait)}) is not shorter than total ({_d(policy.timeouts.total)}): "
            "callers sized to total give up before their turn comes."
        )
    return [s for s in said if s], flags


def for_route(policy: UpstreamPolicy, route: RoutePolicy) -> UpstreamPolicy:
    """The upstream as one route's requests see it: its timeouts and retry, its wait for tokens, no routes."""
    rate = policy.rate_limit
    if rate is not None:
        rate = dataclasses.replace(rate, max_wait=policy.rate_limit_max_wait(route))
    return dataclasses.replace(policy, timeouts=route.timeouts, retry=route.retry, routes=(), rate_limit=rate)


def route_words(policy: UpstreamPolicy, route: RoutePolicy) -> list[str]:
    """What differs for one route's requests: their cost and their own limits."""
    rate = policy.rate_limit
    if rate is None or (route.weight == 1 and route.rate_limit is None):
        return []
    text = f"Each request of this route costs {route.weight} against the upstream's rate limit"
    if route.rate_limit is not None and route.rate_limit.limits:
        own = _and([describe_rate(w, rate.margin) for w in route.rate_limit.limits])
        text += f", and counts against {own} of this route's own"
    return [text + "."]
