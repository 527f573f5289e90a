"""The rules of ``rate_limit`` (an upstream's) and of a route's ``weight`` and ``rate_limit``.

Each key alone is judged by the builder (durations, bounds, status codes, the Redis URL); here is what only
makes sense together: a weight no limit could ever let through, an ``observe`` pointing at no limit, a wait
longer than the caller's deadline, and rate-limit keys where nothing would count them.
"""

from __future__ import annotations

import dataclasses

from proxy.policy.build import ModelBuilder
from proxy.policy.model import RoutePolicy, UpstreamPolicy
from proxy.policy.rate_model import RateLimitWindow
from proxy.policy.source import Sourced
from proxy.policy.values import format_duration


def child(node: Sourced | None, *keys: str) -> Sourced | None:
    """The node at ``keys`` under ``node``, or None when one of them is not written."""
    current = node
    for key in keys:
        if current is None or not isinstance(current.value, dict):
            return None
        current = current.value.get(key)
    return current


def describe_limit(limit: RateLimitWindow) -> str:
    return f"{limit.requests} requests per {format_duration(limit.per)}" + (" (fixed)" if limit.fixed else "")


def check_upstream_rate_limit(builder: ModelBuilder, up: UpstreamPolicy, node: Sourced) -> None:
    """An upstream's ``rate_limit`` (its own or inherited from ``defaults``)."""
    reader, path = builder.reader, f"{node.path}.rate_limit"
    rl_node = child(node, "rate_limit")
    rate = up.rate_limit
    if rl_node is None or rate is None or builder.broken(path):
        return
    if up.protocol == "tcp":
        # Inherited from defaults (for the http upstreams) it is simply not used; written here it is a mistake.
        if not rl_node.path.startswith("defaults") and not builder.broken(f"{node.path}.protocol"):
            reader.error(rl_node, path, "a tcp upstream relays bytes: there are no requests to count")
        return
    observe = rate.observe
    observe_node = child(rl_node, "observe")
    if observe is not None and observe_node is not None and not builder.broken(f"{path}.observe"):
        if not (observe.used or observe.remaining or observe.standard):
            reader.error(
                observe_node, f"{path}.observe", "name a header to read: used or remaining (or write standard)"
            )
        if not builder.broken(f"{path}.limits") and observe.limit >= len(rate.limits):
            reader.error(
                child(observe_node, "limit") or observe_node,
                f"{path}.observe.limit",
                f"limit {observe.limit} is not an entry of rate_limit.limits "
                f"({'it is empty' if not rate.limits else f'0 to {len(rate.limits) - 1}'})",
            )
    if not builder.broken(f"{path}.max_wait") and not builder.broken(f"{node.path}.timeouts.total"):
        _warn_long_wait(builder, rate.max_wait, up.timeouts.total, child(rl_node, "max_wait"), f"{path}.max_wait")


def _warn_long_wait(builder: ModelBuilder, wait: float, total: float, node: Sourced | None, path: str) -> None:
    """A wait for tokens longer than ``timeouts.total``: not wrong (a batch caller may wait that long), but the
    callers sized to ``total`` will have given up before their turn comes."""
    if node is not None and wait > total:
        builder.reader.error(
            node,
            path,
            f"max_wait ({format_duration(wait)}) is longer than timeouts.total ({format_duration(total)}): callers "
            "sized to total give up before their turn comes",
            severity="warning",
        )


def check_route_rate_limit(
    builder: ModelBuilder, up: UpstreamPolicy, up_node: Sourced, route: RoutePolicy, item: Sourced, where: str
) -> None:
    """A route's ``weight`` and ``rate_limit``: counted against the upstream's rate limit, so they need one, and a
    weight must fit every limit that applies to the route."""
    reader = builder.reader
    weight_node, rl_node = child(item, "weight"), child(item, "rate_limit")
    up_path = f"{up_node.path}.rate_limit"
    if builder.broken(up_path):
        return  # the upstream's own error says it; judging against a stand-in would add false ones
    if up.rate_limit is None:
        needs = f"nothing counts it: {up_node.path} has no rate_limit"
        if weight_node is not None and route.weight != 1 and not builder.broken(f"{where}.weight"):
            reader.error(weight_node, f"{where}.weight", needs)
        if rl_node is not None and route.rate_limit is not None:
            reader.error(rl_node, f"{where}.rate_limit", needs)
        return
    if route.rate_limit is not None and not builder.broken(f"{where}.rate_limit.max_wait"):
        own_wait = route.rate_limit.max_wait
        wait_node = child(rl_node, "max_wait")
        if own_wait is not None and not builder.broken(f"{where}.timeouts"):
            _warn_long_wait(builder, own_wait, route.timeouts.total, wait_node, f"{where}.rate_limit.max_wait")
    if weight_node is None or builder.broken(f"{where}.weight") or builder.broken(f"{where}.rate_limit.limits"):
        return
    applying = [(f"{up_path}.limits[{i}]", limit) for i, limit in enumerate(up.rate_limit.limits)]
    if route.rate_limit is not None:
        applying += [(f"{where}.rate_limit.limits[{i}]", lim) for i, lim in enumerate(route.rate_limit.limits)]
    for limit_path, limit in applying:
        if route.weight > limit.requests:
            reader.error(
                weight_node,
                f"{where}.weight",
                f"can never be sent: weight {route.weight} > {describe_limit(limit)} ({limit_path})",
            )
            return


def without_unused_rate_limit(up: UpstreamPolicy) -> UpstreamPolicy:
    """A tcp upstream has no requests to count: a rate_limit it inherits from ``defaults`` is dropped, so the
    data plane only ever sees ``rate_limit`` where it applies."""
    if up.protocol == "tcp" and up.rate_limit is not None:
        return dataclasses.replace(up, rate_limit=None)
    return up


def check_shared_keys(builder: ModelBuilder, upstreams: list[UpstreamPolicy], nodes: dict[str, Sourced]) -> None:
    """Upstreams of one file on the same Redis key count one budget (an exchange's limit per IP, whichever of its
    APIs is called), so they must count it alike: the same limits and margin."""
    first: dict[tuple[str, str], UpstreamPolicy] = {}
    for up in upstreams:
        rate = up.rate_limit
        judged = ("limits", "margin", "shared")
        if (
            rate is None
            or rate.shared is None
            or any(builder.broken(f"upstreams.{up.name}.rate_limit.{key}") for key in judged)
        ):
            continue
        where = (rate.shared.redis, rate.shared.key)
        other = first.setdefault(where, up)
        if other is up or other.rate_limit is None:
            continue
        if (other.rate_limit.limits, other.rate_limit.margin) != (rate.limits, rate.margin):
            node = child(nodes.get(up.name), "rate_limit", "shared", "key") or nodes.get(up.name)
            builder.reader.error(
                node,
                f"upstreams.{up.name}.rate_limit.shared.key",
                f"{rate.shared.key!r} is also upstreams.{other.name}'s budget, counted with other limits or margin: "
                "every sidecar and upstream on a key must count the same limits",
            )
