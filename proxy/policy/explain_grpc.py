"""``sidecar explain`` for grpc upstreams: what a failure is, what is retried, and the deadline rule, in words.

The words follow ``proxy.resilience.grpc`` (``classify`` and ``GrpcRules``), which the exchange runs.
"""

from __future__ import annotations

from proxy.policy.model import UpstreamPolicy
from proxy.policy.values import GRPC_STATUS_WORDS, format_duration


def _words(statuses: tuple[str, ...]) -> str:
    return ", ".join(statuses) if statuses else "none"


def grpc_failure_words(policy: UpstreamPolicy) -> str:
    grpc = policy.grpc
    others = [w for w in GRPC_STATUS_WORDS if w not in grpc.failure_on and w != "ok"]
    return (
        f"Counted as failures by the breaker: grpc-status {_words(grpc.failure_on)}; a stream reset or a "
        "connection lost before its grpc-status; connect_error and timeout. A status that comes in trailers "
        "after the response started is counted then. Not counted: ok, "
        + (", ".join(others) if others else "nothing else")
        + " (the upstream answered), the client's own cancels, and calls the sidecar refused itself."
    )


def grpc_retry_words(policy: UpstreamPolicy) -> list[str]:
    grpc, retry = policy.grpc, policy.retry
    said = [
        f"Retried, before anything reached the client: grpc-status {_words(grpc.retry_on)}, connect errors and "
        "streams the upstream refused (REFUSED_STREAM, or above a GOAWAY's last stream id: never processed) — up "
        f"to {retry.max_retries} time{'s' if retry.max_retries > 1 else ''}, on another target when there is one. "
        "Never retried: a stream lost after the upstream took it (it may have been processed), and any status "
        "once the response has started (the client then sees RST_STREAM, never a silent OK)."
    ]
    if "deadline_exceeded" in grpc.retry_on:
        said.append("deadline_exceeded is retried only while the caller's deadline leaves time for another try.")
    if "resource_exhausted" in grpc.retry_on:
        said.append(
            f"resource_exhausted waits the server's grpc-retry-pushback-ms up to max_delay "
            f"{format_duration(retry.max_delay)}; a negative or longer pushback stops retries."
        )
    return said


def grpc_deadline_words(policy: UpstreamPolicy) -> list[str]:
    if policy.protocol != "grpc":
        return []
    grpc = policy.grpc
    caller = "The caller's grpc-timeout"
    if grpc.max_timeout is not None:
        caller += f", capped at max_timeout {format_duration(grpc.max_timeout)}"
    if grpc.timeout_offset:
        caller += f", less timeout_offset {format_duration(grpc.timeout_offset)}"
    return [
        f"{caller}, bounds the attempts together with total {format_duration(policy.timeouts.total)} (the sooner "
        "wins); each attempt forwards what is left of it as grpc-timeout (rounded down). When it has run out, "
        "the caller gets grpc-status 4 DEADLINE_EXCEEDED (timeout); every other answer of the sidecar's own is "
        "trailers-only grpc-status 14 UNAVAILABLE with the reason in grpc-message."
    ]
