"""The rules of ``protocol: grpc``: the ``grpc`` block, and the keys that mean something else (or nothing) there.

A key written in ``defaults`` serves every upstream, http and grpc alike: one a grpc upstream cannot use (an HTTP
``retry_on``, a fallback body, a health ``path``) is then simply not used by it. Written on the upstream itself
it is a mistake, reported at its line with what to write instead.
"""

from __future__ import annotations

import dataclasses

from proxy.policy.build import ModelBuilder
from proxy.policy.model import HealthPolicy, UpstreamPolicy
from proxy.policy.rates import child
from proxy.policy.source import Sourced
from proxy.policy.values import format_duration

GRPC_PROBES = ("grpc", "connect")


def _own(node: Sourced | None) -> Sourced | None:
    """``node`` when the upstream wrote it itself, None when it is absent or inherited from ``defaults``."""
    return node if node is not None and not node.path.startswith("defaults") else None


def check_grpc_upstream(builder: ModelBuilder, up: UpstreamPolicy, node: Sourced) -> None:
    reader, path = builder.reader, node.path
    if builder.broken(f"{path}.protocol"):
        return
    if up.protocol != "grpc":
        grpc_node = _own(child(node, "grpc"))
        if grpc_node is not None:
            reader.error(grpc_node, f"{path}.grpc", f"grpc settings apply to protocol: grpc, not {up.protocol}")
        _check_not_grpc_probe(builder, up, node)
        return
    for key in ("retry_on", "methods"):
        written = _own(child(node, "retry", key))
        if written is not None:
            reader.error(
                written,
                f"{path}.retry.{key}",
                f"a grpc upstream retries by gRPC status: write grpc.retry_on (e.g. [unavailable]); every call is "
                f"a POST and retry.{key} does not apply",
            )
    fallback = _own(child(node, "fallback"))
    if fallback is not None:
        reader.error(
            fallback,
            f"{path}.fallback",
            "a grpc caller cannot read a fallback body: while the breaker is open it gets grpc-status 14 "
            "UNAVAILABLE with grpc-retry-pushback-ms",
        )
    _check_grpc_block(builder, up, node)
    _check_grpc_health(builder, up, node)


def _check_grpc_block(builder: ModelBuilder, up: UpstreamPolicy, node: Sourced) -> None:
    reader, path, grpc = builder.reader, f"{node.path}.grpc", up.grpc
    grpc_node = child(node, "grpc")
    if grpc_node is None or builder.broken(path):
        return
    failure_node = child(grpc_node, "failure_on")
    if (
        failure_node is not None
        and "resource_exhausted" in grpc.failure_on
        and not builder.broken(f"{path}.failure_on")
    ):
        reader.error(
            failure_node,
            f"{path}.failure_on",
            "resource_exhausted is also what gRPC answers a message over its size limit: a client's oversized "
            "requests would open the breaker for everyone",
            severity="warning",
        )
    judged = not builder.broken(f"{path}.max_timeout") and not builder.broken(f"{path}.timeout_offset")
    if judged and grpc.max_timeout is not None and grpc.timeout_offset >= grpc.max_timeout:
        reader.error(
            child(grpc_node, "timeout_offset") or grpc_node,
            f"{path}.timeout_offset",
            f"timeout_offset ({format_duration(grpc.timeout_offset)}) is not shorter than max_timeout "
            f"({format_duration(grpc.max_timeout)}): every call with a deadline would be out of time at once",
        )


def _check_grpc_health(builder: ModelBuilder, up: UpstreamPolicy, node: Sourced) -> None:
    reader, path, health = builder.reader, f"{node.path}.health", up.health
    health_node = child(node, "health")
    if health is None or health_node is None or builder.broken(path):
        return
    probe = child(health_node, "probe")
    if probe is not None and health.probe not in GRPC_PROBES:
        reader.error(probe, f"{path}.probe", f"a grpc upstream is probed with grpc or connect, not {health.probe}")
    written_path = _own(child(health_node, "path"))
    if written_path is not None:
        reader.error(
            written_path,
            f"{path}.path",
            "a grpc upstream is probed with grpc.health.v1.Health/Check, not an HTTP path: name the service "
            "with service (empty: the server as a whole)",
        )
    service = child(health_node, "service")
    if service is not None and probe is not None and health.probe != "grpc":
        reader.error(service, f"{path}.service", "service is the name a grpc probe asks about: it needs probe: grpc")


def _check_not_grpc_probe(builder: ModelBuilder, up: UpstreamPolicy, node: Sourced) -> None:
    reader, path, health = builder.reader, f"{node.path}.health", up.health
    health_node = child(node, "health")
    if health is None or health_node is None or builder.broken(path):
        return
    probe = child(health_node, "probe")
    if probe is not None and health.probe == "grpc":
        reader.error(probe, f"{path}.probe", f"probe: grpc is for protocol: grpc upstreams, not {up.protocol}")
    service = _own(child(health_node, "service"))
    if service is not None:
        reader.error(service, f"{path}.service", "service is the name a grpc probe asks about: it needs probe: grpc")


def with_grpc_defaults(up: UpstreamPolicy, node: Sourced) -> UpstreamPolicy:
    """What a grpc upstream's keys mean once checked: its health checks are gRPC ones unless ``probe`` says
    otherwise, and a fallback inherited from ``defaults`` (for the http upstreams) is not its own."""
    if up.protocol != "grpc":
        return up
    health: HealthPolicy | None = up.health
    if health is not None and child(node, "health", "probe") is None:
        health = dataclasses.replace(health, probe="grpc")
    return dataclasses.replace(up, health=health, fallback=None)
