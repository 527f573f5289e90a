"""Answers the sidecar makes itself, written, counted and logged in one place.

Every one carries ``x-sidecar-reason`` (and ``x-sidecar-decision`` where an upstream's policy decided it), a
small JSON body ``{"error", "upstream", "detail"}``, and ``Retry-After`` where the caller should come back
later (``breaker_open``, ``rate_limited``, ``upstream_cooldown``); each is counted in ``sidecar_requests_total``
(and ``sidecar_rejected_total`` under its label where it is a refusal) and gets the request log's one line.

The open breaker's answer is the hot one (every request while it is open): it is built once per second of
``Retry-After`` and reused.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.http import wire

if TYPE_CHECKING:
    from proxy.metrics import UpstreamStats
    from proxy.runtime import UpstreamRuntime

log = logging.getLogger("seawall.request")

_JSON = b"application/json"


@dataclass(frozen=True, slots=True)
class OwnAnswer:
    """An answer the sidecar gives instead of (or after) forwarding."""

    status: int
    reason: str  # x-sidecar-reason
    detail: str  # the JSON body's detail
    decision: str | None = None  # x-sidecar-decision
    retry_after: int | None = None  # whole seconds
    rejected: str | None = None  # the sidecar_rejected_total label, when it is a refusal
    extra: tuple[tuple[bytes, bytes], ...] = ()


def encode(answer: OwnAnswer, upstream: str | None, keep_alive: bool, http11: bool = True) -> bytes:
    headers: wire.Headers = [(b"x-sidecar-reason", answer.reason.encode())]
    if answer.decision is not None:
        headers.append((b"x-sidecar-decision", answer.decision.encode()))
    if answer.retry_after is not None:
        headers.append((b"retry-after", b"%d" % answer.retry_after))
    headers.extend(answer.extra)
    body = wire.error_body(answer.reason, upstream, answer.detail)
    return wire.local_response(answer.status, body, _JSON, headers, keep_alive, http11=http11)


def count(stats: UpstreamStats, answer: OwnAnswer, duration: float) -> None:
    if answer.rejected is not None:
        stats.reject(answer.rejected)
    stats.answered(answer.status, duration)


def log_answer(
    upstream: str,
    method: str,
    path: bytes,
    route: str | None,
    status: int,
    reason: str | None,
    attempts: int,
    duration: float,
    grpc_status: int | None = None,
) -> None:
    """The request log's one line for an answer, proxied (``reason`` None) or the sidecar's own (its
    ``x-sidecar-reason``), like Envoy's access log with its response flags; a gRPC call's with its grpc-status."""
    extra: dict[str, object] = {
        "event": "request",
        "upstream": upstream,
        "status": status,
        "attempts": attempts,
        "duration_ms": round(duration * 1000, 3),
    }
    if route is not None:
        extra["route"] = route
    if reason is not None:
        extra["reason"] = reason
    if grpc_status is not None:
        extra["grpc_status"] = grpc_status
    log.info("%s %s -> %d", method, path.decode("latin-1"), status, extra=extra)


_ANSWER_CACHE_SIZE = 64


def breaker_open_answer(rt: UpstreamRuntime, now: float, keep_alive: bool, http11: bool = True) -> bytes:
    """The whole fail-fast answer, built once per (transition, override, seconds left, keep-alive).

    While a breaker is open every refused request gets the same bytes for a second at a time, so the fail-fast
    path is a dictionary lookup and one write instead of formatting headers per request.
    """
    breaker = rt.breaker
    retry_in = max(1, math.ceil(breaker.retry_in(now)))
    last = breaker.last_transition
    override = breaker.override
    key = (last, override, retry_in, keep_alive, http11)
    cache = rt.answer_cache
    answer = cache.get(key)
    if answer is not None:
        return answer
    why = "forced_open" if override is not None else (last.reason if last else "open")
    decision = f"upstream={rt.name} state=open reason={why} retry_in={retry_in}s"
    headers = [
        (b"x-sidecar-reason", b"breaker_open"),
        (b"x-sidecar-decision", decision.encode()),
        (b"retry-after", b"%d" % retry_in),
    ]
    fallback = rt.fallback
    if fallback is not None:
        status, body, content_type = fallback.status, fallback.body.encode(), fallback.content_type.encode()
    else:
        status, content_type = 503, _JSON
        body = wire.error_body("breaker_open", rt.name, f"circuit breaker for {rt.name} is open")
    answer = wire.local_response(status, body, content_type, headers, keep_alive, http11=http11)
    if len(cache) >= _ANSWER_CACHE_SIZE:
        cache.clear()
    cache[key] = answer
    return answer


def refuse_breaker_open(rt: UpstreamRuntime, now: float, keep_alive: bool, http11: bool = True) -> bytes:
    """Count one request refused by the open breaker; the answer to send it."""
    rt.stats.reject("breaker_open")
    rt.stats.answered(rt.fallback.status if rt.fallback else 503, 0.0)
    return breaker_open_answer(rt, now, keep_alive, http11)
