"""One gRPC call through the sidecar: an HTTP/2 stream from the client, relayed to an upstream stream.

    request headers → route, deadline (the caller's grpc-timeout less ``grpc.timeout_offset``, within total)
    admit (proxy.http.admission: bulkhead → breaker → rate limit) ── refused → trailers-only, grpc-status 14
    attempt: breaker permit → pick target → upstream stream (grpc-timeout: the time left) → request DATA pumped
        response head within per_try ── trailers-only? its grpc-status decides: deliver, or retry
        otherwise the head goes to the client (committed: no retry from here); DATA relayed as it comes and
        acknowledged upstream only once the client took it; the trailers' grpc-status settles the breaker
        (the permit is held until then) and the trailers go on
        a fault after the head went out → RST_STREAM to the client: never a silent OK
    the client resets its stream (its deadline, a cancel) → the attempt is cancelled, settled as ignored

What an ending means to the breaker and to retries is ``proxy.resilience.grpc``'s decision; the retry itself is
``decide_retry``'s, as for HTTP. Answers of the sidecar's own are ``proxy.http.answers.OwnAnswer`` written as
trailers-only responses (``proxy.grpc_wire``), counted and logged as every other answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.grpc.body import RequestPump
from proxy.grpc_wire import (
    format_grpc_timeout,
    own_answer_status,
    parse_grpc_status,
    parse_grpc_timeout,
    parse_pushback,
    pushback_ms,
    trailers_only,
)
from proxy.h2.engine import H2Stream, StreamReset
from proxy.http.admission import BREAKER_OPEN, PIPELINE, WAIT, Refusal
from proxy.http.answers import OwnAnswer, log_answer
from proxy.resilience.failures import FailureKind
from proxy.resilience.grpc import GRPC_METHOD, GrpcOutcome, GrpcRules, GrpcStatus, StreamEnd, Verdict, classify
from proxy.resilience.retry import NoRetry, RetryDecision, backoff_delays, decide_retry
from proxy.runtime import Outcome
from proxy.upstream.errors import UpstreamError

if TYPE_CHECKING:
    from proxy.resilience.breaker import Permit
    from proxy.runtime import Route, UpstreamRuntime
    from proxy.upstream.balancer import TargetState

log = logging.getLogger("seawall.request")

Headers = list[tuple[bytes, bytes]]

REPLAY_BYTES = 64 * 1024  # a request longer than this is not kept for a retry (the call is then never retried)
_TIMED_OUT = GrpcOutcome(Verdict.FAILURE, GrpcStatus.DEADLINE_EXCEEDED, False, FailureKind.TIMEOUT, None, "timeout")
# The caller's own deadline ran out (its grpc-timeout, sooner than the sidecar's bounds): the caller chose it, as it
# chooses to cancel, so it is no verdict on the upstream; the sidecar's own per_try and total are.
_CALLER_DEADLINE = GrpcOutcome(Verdict.IGNORED, GrpcStatus.DEADLINE_EXCEEDED, False)
_CANCELLED = classify(GrpcRules(), grpc_status=None, end=StreamEnd.CLIENT_CANCELLED)


@dataclass(slots=True)
class Attempt:
    """What one attempt came to."""

    outcome: GrpcOutcome
    reason: str = ""  # x-sidecar-reason of the sidecar's own answer, if it must make one (no head to deliver)
    detail: str = ""
    committed: bool = False  # the response head reached the client: the call's fate is this attempt's
    head: Headers | None = None  # the upstream's own trailers-only answer, delivered as it came if not retried
    pushback: float | None = None  # grpc-retry-pushback-ms in seconds (inf: the server said not to retry)


def _local(kind: FailureKind, reason: str, detail: str) -> Attempt:
    """A failure the sidecar saw itself before any answer: connect error, timeout."""
    status = GrpcStatus.DEADLINE_EXCEEDED if kind is FailureKind.TIMEOUT else GrpcStatus.UNAVAILABLE
    retry_kind = FailureKind.CONNECT_ERROR if kind is FailureKind.CONNECT_ERROR else None
    return Attempt(GrpcOutcome(Verdict.FAILURE, status, True, kind, retry_kind, reason), reason, detail)


class GrpcCall:
    """One call (one client stream). The admission pipeline's ticket (``rt``, ``route``, ``passed``)."""

    __slots__ = (
        "answered",
        "attempts",
        "caller_bound",
        "client",
        "deadline",
        "log_requests",
        "passed",
        "path",
        "permit",
        "pump",
        "route",
        "rt",
        "started",
        "upstream",
    )

    def __init__(self, rt: UpstreamRuntime, client: H2Stream, log_requests: bool) -> None:
        self.rt = rt
        self.client = client
        headers = client.headers or []
        self.path = _header(headers, b":path") or b"/"
        self.route: Route = rt.route_for(self.path, GRPC_METHOD) if rt.routes else rt.default_route
        self.passed = 0
        self.attempts = 0
        self.answered = False  # the call's one answer is counted and logged
        self.permit: Permit | None = None
        self.upstream: H2Stream | None = None  # the attempt's stream, reset if the call ends before it does
        self.log_requests = log_requests
        self.started = rt.clock.monotonic()
        timeout = _header(headers, b"grpc-timeout")
        caller = rt.grpc_rules.caller_deadline(self.started, parse_grpc_timeout(timeout) if timeout else None)
        self.deadline = rt.grpc_rules.attempts_deadline(self.started, self.route.timeouts.total, caller)
        self.caller_bound = caller is not None and caller < self.started + self.route.timeouts.total
        self.pump = RequestPump(client, REPLAY_BYTES)

    # -- entry -----------------------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            refusal = PIPELINE.try_admit(self)
            if refusal is WAIT:
                refusal = await PIPELINE.admit(self)
            if refusal is not None:
                await self._refuse(refusal)
                return
            await self._attempts()
        except asyncio.CancelledError:
            # The client reset its stream (its deadline, a cancel) or its connection went: nobody's failure.
            self._settle(None, _CANCELLED)
            if not self.answered:
                self._answered(GrpcStatus.CANCELLED, "client_cancelled")
            raise
        finally:
            self.pump.stop()
            upstream, self.upstream = self.upstream, None
            if upstream is not None:
                upstream.reset()  # nothing if it ended: else the upstream stops working on a call nobody awaits
            PIPELINE.release(self)
            if self.permit is not None:
                self._settle(None, _CANCELLED)

    async def _attempts(self) -> None:
        rt, retry = self.rt, self.route.retry
        if rt.budget is not None:
            rt.budget.record_request(self.started)
        delays: Iterator[float] | None = None
        exclude: TargetState | None = None
        while True:
            permit = rt.breaker.try_acquire(rt.clock.monotonic())
            if permit is None and rt.enforce:
                await self._breaker_open()
                return
            if permit is None:
                rt.stats.reject("breaker_open_shadow")
            self.permit = permit
            state = rt.balancer.pick(rt.clock.monotonic(), exclude)
            self.attempts += 1
            attempt = await self._attempt(state)
            self._settle(state, attempt.outcome)
            if attempt.committed:
                return  # delivered, or cut off on the way: the call's fate either way
            if delays is None:
                delays = backoff_delays(retry.base_delay, retry.max_delay, retry.jitter, rt.rng)
            decision = self._retry_decision(attempt, delays)
            if decision.reason is not None:
                await self._give_up(attempt, decision.reason)
                return
            if rt.budget is not None:
                rt.budget.try_spend(rt.clock.monotonic())
            rt.stats.retries += 1
            exclude = state
            if decision.delay > 0:
                await rt.clock.sleep(decision.delay)

    def _retry_decision(self, attempt: Attempt, delays: Iterator[float]) -> RetryDecision:
        rt, outcome = self.rt, attempt.outcome
        now = rt.clock.monotonic()
        return decide_retry(
            rt.grpc_rules.retry_rules(self.route.retry.max_retries),
            attempts=self.attempts,
            method=GRPC_METHOD,
            kind=outcome.retry_kind,
            status=outcome.status,
            body_replayable=self.pump.replayable,
            backoff=delays,
            retry_after=attempt.pushback,
            max_delay=self.route.retry.max_delay,
            now=now,
            deadline=self.deadline,
            budget_allows=rt.budget is None or rt.budget.allows(now),
            breaker_retry_in=rt.breaker.retry_in(now) if rt.enforce else 0.0,
            breaker_enforced=rt.enforce,
        )

    # -- one attempt -----------------------------------------------------------------------------------------

    async def _attempt(self, state: TargetState) -> Attempt:
        """One try on ``state``: open a stream, send the request, relay the answer unless it may be retried."""
        clock, timeouts = self.rt.clock, self.route.timeouts
        left = self.deadline - clock.monotonic()
        if left <= 0:
            if self.caller_bound:
                return Attempt(_CALLER_DEADLINE, "timeout", "the caller's deadline passed")
            return _local(FailureKind.TIMEOUT, "timeout", "timeouts.total ran out")
        state.outstanding += 1
        try:
            async with asyncio.timeout(min(timeouts.per_try, left)):
                upstream = await state.h2.open_stream(self._headers(left), False, min(timeouts.connect, left))
                self.upstream = upstream
                await self.pump.send(upstream)
                head = await upstream.wait_headers()
        except UpstreamError as exc:
            return _local(exc.kind, exc.reason, str(exc))
        except StreamReset as exc:
            self._drop()
            if self.client.error is not None:  # it was the client's stream that went (its deadline, a cancel)
                self._answered(GrpcStatus.CANCELLED, "client_cancelled")
                return Attempt(_CANCELLED, committed=True)
            end = StreamEnd.REFUSED if exc.never_processed else StreamEnd.LOST
            outcome = classify(self.rt.grpc_rules, grpc_status=None, http_status=None, end=end)
            return Attempt(outcome, "reset", str(exc))
        except TimeoutError:
            self._drop()
            if self.caller_bound and left <= timeouts.per_try:
                return Attempt(_CALLER_DEADLINE, "timeout", f"the caller's deadline ({left:.3g}s) passed")
            return _local(FailureKind.TIMEOUT, "timeout", f"no response within {min(timeouts.per_try, left):g}s")
        finally:
            state.outstanding -= 1
        grpc_status = parse_grpc_status(_header(head, b"grpc-status"))
        http_status = int(_header(head, b":status") or b"0")
        if grpc_status is None and http_status == 200:
            return Attempt(await self._relay(upstream, head), committed=True)
        # Trailers-only, or an HTTP answer that is no gRPC answer: nothing to relay, judged now.
        self._drop()
        outcome = classify(self.rt.grpc_rules, grpc_status=grpc_status, http_status=http_status)
        pushback = parse_pushback(_header(head, b"grpc-retry-pushback-ms"))
        if grpc_status is None:
            return Attempt(outcome, "bad_response", f"the upstream answered HTTP {http_status}", pushback=pushback)
        return Attempt(outcome, head=head, pushback=pushback)

    def _headers(self, left: float) -> Headers:
        """The client's request headers, with the deadline the upstream has left."""
        headers = [(k, v) for k, v in self.client.headers or [] if k != b"grpc-timeout"]
        headers.append((b"grpc-timeout", format_grpc_timeout(left)))
        return headers

    async def _relay(self, upstream: H2Stream, head: Headers) -> GrpcOutcome:
        """The answer's head, messages and trailers to the client; the trailers' grpc-status is the outcome."""
        client, rules = self.client, self.rt.grpc_rules
        if self.attempts > 1:
            head = [*head, (b"x-sidecar-attempts", b"%d" % self.attempts)]
        try:
            async with asyncio.timeout(max(0.0, self.deadline - self.rt.clock.monotonic())):
                await client.send_headers(head)
                while chunk := await upstream.read():
                    await client.send_data(chunk)
                    upstream.consumed(len(chunk))
        except StreamReset:
            self._drop()
            if client.error is not None:
                self._answered(GrpcStatus.CANCELLED, "client_cancelled")
                return _CANCELLED  # the client went away (its deadline, a cancel): nobody's failure
            client.reset(2)  # the upstream broke off: INTERNAL_ERROR to the client, never a silent OK
            self._answered(GrpcStatus.INTERNAL, "reset")
            return classify(rules, grpc_status=None, http_status=200, end=StreamEnd.LOST)
        except TimeoutError:
            self._drop()
            await self._end_client([(b"grpc-status", b"4"), (b"grpc-message", b"deadline exceeded (seawall)")])
            self._answered(GrpcStatus.DEADLINE_EXCEEDED, "timeout")
            return _CALLER_DEADLINE if self.caller_bound else _TIMED_OUT
        self.upstream = None
        trailers = upstream.trailers or []
        grpc_status = parse_grpc_status(_header(trailers, b"grpc-status"))
        if grpc_status is None:
            client.reset(2)  # an answer without grpc-status: INTERNAL_ERROR to the caller, never a made-up OK
            self._answered(GrpcStatus.INTERNAL, "bad_response")
            return classify(rules, grpc_status=None, http_status=200, end=StreamEnd.LOST)
        await self._end_client(trailers)
        self._answered(grpc_status, None)
        return classify(rules, grpc_status=grpc_status)

    async def _end_client(self, trailers: Headers) -> None:
        client = self.client
        try:
            await client.send_trailers(trailers)
        except StreamReset:
            return  # the client is gone already
        if not client.ended:
            client.reset(0)  # answered whole before the request ended: the rest is not wanted (NO_ERROR)

    def _drop(self) -> None:
        """Let go of the attempt's upstream stream (reset unless it ended) and stop sending to it."""
        self.pump.stop()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.reset()

    # -- answers ---------------------------------------------------------------------------------------------

    async def _give_up(self, attempt: Attempt, why_not: NoRetry) -> None:
        """No retry: the upstream's trailers-only answer as it came, or the sidecar's own for its failure."""
        if why_not is NoRetry.RETRY_BUDGET:
            self.rt.stats.reject("retry_budget")
        if attempt.head is not None:
            head = attempt.head
            if self.attempts > 1:
                head = [*head, (b"x-sidecar-attempts", b"%d" % self.attempts)]
            with contextlib.suppress(StreamReset):  # the client is gone: still counted and logged
                await self.client.send_headers(head, end_stream=True)
            self._answered(attempt.outcome.status, None)
            return
        reason = "retry_budget" if why_not is NoRetry.RETRY_BUDGET else attempt.reason
        detail = f"{attempt.detail} (attempts={self.attempts}, not retried: {why_not.value})"
        await self._own(OwnAnswer(502, reason, detail))

    async def _refuse(self, refusal: Refusal) -> None:
        if refusal.reason == BREAKER_OPEN.reason:
            await self._breaker_open()
            return
        await self._own(refusal)

    async def _breaker_open(self) -> None:
        rt = self.rt
        retry_in = max(1, math.ceil(rt.breaker.retry_in(rt.clock.monotonic())))
        detail = f"circuit breaker for {rt.name} is open"
        await self._own(OwnAnswer(503, "breaker_open", detail, retry_after=retry_in, rejected="breaker_open"))

    async def _own(self, answer: OwnAnswer) -> None:
        """An answer of the sidecar's own, as gRPC callers read one: trailers-only, counted and logged once."""
        status = own_answer_status(answer.reason)
        message = f"{answer.reason}: {answer.detail} (seawall, upstream {self.rt.name})"
        with contextlib.suppress(StreamReset):  # the client is gone: still counted and logged
            await self.client.send_headers(trailers_only(status, message, pushback_ms(answer.retry_after)), True)
        if answer.rejected is not None:
            self.rt.stats.reject(answer.rejected)
        self._answered(status, answer.reason)

    def _answered(self, status: int, reason: str | None) -> None:
        """Count the call's answer (HTTP 200 on the stream, its grpc-status beside) and log its one line."""
        rt = self.rt
        self.answered = True
        duration = rt.clock.monotonic() - self.started
        rt.stats.answered(200, duration)
        rt.stats.grpc_answered(status)
        if self.log_requests:
            log_answer(rt.name, GRPC_METHOD, self.path, self.route.name, 200, reason, self.attempts, duration, status)

    def _settle(self, target: TargetState | None, outcome: GrpcOutcome) -> None:
        permit, self.permit = self.permit, None
        now = self.rt.clock.monotonic()
        kind = outcome.kind.value if outcome.kind is not None else (outcome.label or "")
        self.rt.settle(
            permit, target, Outcome(outcome.verdict.value), now, now - self.started, kind, outcome.label, log
        )


def _header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None
