"""Answers the sidecar makes while a breaker is open: built once per second of ``Retry-After``, then reused."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from proxy.http import wire

if TYPE_CHECKING:
    from proxy.runtime import UpstreamRuntime

_JSON = b"application/json"


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


def fail_fast(rt: UpstreamRuntime, keep_alive: bool, http11: bool = True) -> bytes | None:
    """Refuse a request without a body at once if the breaker is open; None when it must be forwarded.

    The admission order is bulkhead → breaker (``proxy.http.admission``): only when the bulkhead has a free slot
    (it would admit the request and take the slot back at once) may the breaker answer here, on the spot;
    otherwise the request goes through the pipeline and waits in line or is answered ``overload``."""
    if not rt.enforce or not rt.bulkhead.has_room():
        return None
    breaker = rt.breaker
    now = rt.clock.monotonic()
    if not breaker.rejecting(now) or breaker.try_acquire(now) is not None:
        return None
    return refuse_breaker_open(rt, now, keep_alive, http11)


def refuse_breaker_open(rt: UpstreamRuntime, now: float, keep_alive: bool, http11: bool = True) -> bytes:
    """Count one request refused by the open breaker; the answer to send it."""
    rt.stats.reject("breaker_open")
    rt.stats.answered(rt.fallback.status if rt.fallback else 503, 0.0)
    return breaker_open_answer(rt, now, keep_alive, http11)
