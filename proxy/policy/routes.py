"""An upstream's ``routes:``: each entry's keys merged over the upstream's, built, and judged.

A route's ``timeouts`` and ``retry`` are merged key by key over the upstream's (after ``defaults``), exactly as
an upstream's are over ``defaults``, so a route holds its effective values and an error in what it inherits is
reported once, where it was written. Rules that tie keys together (per_try ≤ total, connect ≤ per_try,
base_delay ≤ max_delay) are judged on the effective values, but only for a route that wrote one of the keys:
an upstream that breaks a rule on its own has its own error, not one more per route.
"""

from __future__ import annotations

import dataclasses

from proxy.policy.build import ModelBuilder
from proxy.policy.model import RoutePolicy, UpstreamPolicy
from proxy.policy.rates import check_route_rate_limit
from proxy.policy.rules import check_timing
from proxy.policy.source import Sourced, merge

# Keys a route may override; everything else (breaker, budget, limits, targets) is the upstream's alone. A route's
# weight and rate_limit are its own (its cost and extra limits), not overrides of the upstream's rate_limit.
OVERRIDES = ("timeouts", "retry")


def build_routes(builder: ModelBuilder, up_node: Sourced, policy: UpstreamPolicy) -> tuple[RoutePolicy, ...]:
    """The upstream's routes, in order, or () when it has none. Every problem is reported on ``builder``."""
    reader = builder.reader
    node = up_node.value.get("routes") if isinstance(up_node.value, dict) else None
    if node is None or node.value is None:
        return ()
    path = f"{up_node.path}.routes"
    if policy.protocol == "tcp":
        reader.error(node, path, "a tcp upstream has no HTTP routes")
        return ()
    if not isinstance(node.value, list):
        reader.error(node, path, "expected a list of routes, each with a match")
        return ()
    routes: list[RoutePolicy] = []
    named: dict[str, str] = {}
    for index, item in enumerate(node.value):
        where = f"{path}[{index}]"
        route = _build_one(builder, up_node, item, where)
        if route is None:
            continue
        name = route.name or f"routes[{index}]"
        if policy.protocol == "grpc":
            _check_grpc_route(builder, item, where)
        check_route_rate_limit(builder, policy, up_node, route, item, where)
        if route.name is not None:
            if route.name in named:
                reader.error(
                    item.value["name"], f"{where}.name", f"{route.name!r} is already the name of {named[route.name]}"
                )
            named[route.name] = where
        routes.append(dataclasses.replace(route, name=name))
        _warn_if_shadowed(builder, routes, item, where)
    return tuple(routes)


def _build_one(builder: ModelBuilder, up_node: Sourced, item: Sourced, where: str) -> RoutePolicy | None:
    reader = builder.reader
    if not isinstance(item.value, dict):
        reader.error(item, where, "expected a route: a mapping with match, and timeouts or retry to override")
        return None
    own = dict(item.value)
    retry_node = own.get("retry")
    if retry_node is not None and isinstance(retry_node.value, dict) and "budget" in retry_node.value:
        budget = retry_node.value["budget"]
        reader.error(budget, f"{where}.retry.budget", "the retry budget is the upstream's, shared by its routes")
        kept = {k: v for k, v in retry_node.value.items() if k != "budget"}
        own["retry"] = Sourced(kept, retry_node.line, retry_node.column, retry_node.path)
    inherited = up_node.value
    merged = dict(own)
    for key in OVERRIDES:
        if key in inherited:
            merged[key] = merge(inherited[key], own[key]) if key in own else inherited[key]
    route: RoutePolicy | None = builder.build(RoutePolicy, Sourced(merged, item.line, item.column, where), where=where)
    if route is None:
        return None
    match_node = own.get("match")
    if match_node is None:
        reader.error(item, f"{where}.match", "a route needs a match: {path_prefix: /…} or {path: /…}")
    else:
        m = route.match
        judged = not any(builder.broken(f"{where}.match.{key}") for key in ("path", "path_prefix"))
        if judged and (m.path is None) == (m.path_prefix is None):
            reader.error(match_node, f"{where}.match", "give exactly one of path and path_prefix")
        if m.methods is not None and not m.methods:
            methods = match_node.value.get("methods") if isinstance(match_node.value, dict) else None
            reader.error(
                methods or match_node,
                f"{where}.match.methods",
                "an empty list matches nothing (leave it out for any method)",
            )

    def ok(*keys: str) -> bool:
        return any(_written(own, key) for key in keys) and not any(builder.broken(f"{where}.{k}") for k in keys)

    def at(*keys: str) -> Sourced:
        for key in keys:
            found = _written(own, key)
            if found is not None:
                return found
        return item

    check_timing(reader, where, route.timeouts, route.retry, ok, at)
    return route


def _check_grpc_route(builder: ModelBuilder, item: Sourced, where: str) -> None:
    """A grpc upstream's route retries by its ``grpc.retry_on``: HTTP's retry_on and methods mean nothing there."""
    own = item.value if isinstance(item.value, dict) else {}
    for key in ("retry_on", "methods"):
        written = _written(own, f"retry.{key}")
        if written is not None:
            builder.reader.error(
                written,
                f"{where}.retry.{key}",
                f"a grpc upstream retries by gRPC status (its grpc.retry_on): retry.{key} does not apply",
            )


def _written(own: dict[str, Sourced], dotted: str) -> Sourced | None:
    """The node of ``section.key`` if the route itself wrote it."""
    section, _, key = dotted.partition(".")
    node = own.get(section)
    if node is None or not isinstance(node.value, dict):
        return None
    return node.value.get(key)


def _covers(earlier: RoutePolicy, later: RoutePolicy) -> bool:
    """Every request ``later`` matches, ``earlier`` matches first."""
    a, b = earlier.match, later.match
    if a.methods is not None and (b.methods is None or not set(b.methods) <= set(a.methods)):
        return False
    if a.path_prefix is not None:
        target = b.path if b.path is not None else b.path_prefix
        return target is not None and target.startswith(a.path_prefix)
    return a.path is not None and b.path == a.path


def _warn_if_shadowed(builder: ModelBuilder, routes: list[RoutePolicy], item: Sourced, where: str) -> None:
    later = routes[-1]
    if later.match.path is None and later.match.path_prefix is None:
        return  # already an error
    for earlier in routes[:-1]:
        if _covers(earlier, later):
            builder.reader.error(
                item,
                where,
                f"never used: {earlier.name} comes first and matches every request this route would",
                severity="warning",
            )
            return
