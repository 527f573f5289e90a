"""The attempt loop: the only place that does upstream I/O for HTTP requests.

    admit (proxy.http.admission: bulkhead → breaker → rate limit) → breaker.try_acquire → pick target
        → pooled connection → send → await response head
        an answer in the rate limit's cooldown_on with Retry-After → pause the upstream, deliver it as it came
        failure? (connect_error | timeout | reset | bad_response | 5xx) → breaker + outlier records it
            retryable for this method and outcome, body replayable, budget allows, total allows
            → backoff (clock.sleep) → again, on another target if there is one
        otherwise → stream the answer (or make one) to the client
        a 101 to an upgrade request → a success; both connections become a byte relay (``proxy.http.upgrade``)

A stale pooled connection (closed by the upstream while idle) is retried once on a fresh connection without
counting as an attempt when nothing of the request can have been processed.

Two ways through, one set of steps. The common case — no body to wait for (none, or a small one already whole),
every admission stage answering at once, a pooled connection, a whole answer — runs on callbacks end to end
(``Exchange.start``): no task, no future, no timer of its own. Whatever has to wait (a connect, a body, a queue,
a retry's backoff, a streamed answer) goes on in a task, from the same step: the attempt loop takes the callback
path's first result as it is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

from proxy.http.admission import PIPELINE, WAIT, Refusal, rate_refusal
from proxy.http.answers import OwnAnswer, encode, log_answer, refuse_breaker_open
from proxy.http.body import DISCARD_BYTES, BodyAborted
from proxy.http.heads import request_head, response_head
from proxy.http.pump import BodyPump
from proxy.http.sink import in_task, serving_failed
from proxy.http.upgrade import relay
from proxy.resilience.failures import FAILED_ANSWER
from proxy.resilience.retry import NoRetry, RetryDecision, backoff_delays, decide_retry, parse_retry_after
from proxy.runtime import Outcome
from proxy.upstream.connection import HeadReceiver, ResponseHead, UpstreamConnection
from proxy.upstream.errors import ConnectionReset, OutOfResources, UpstreamError, UpstreamTimedOut

if TYPE_CHECKING:
    from proxy.http.request import Request
    from proxy.http.sink import InFlight, ResponseSink
    from proxy.resilience.breaker import Permit
    from proxy.runtime import UpstreamRuntime
    from proxy.upstream.balancer import TargetState

log = logging.getLogger("seawall.request")

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class Verdict(enum.Enum):
    """What an attempt's result says to do next (``Exchange._judge``)."""

    REPLAY = "replay"  # a stale pooled connection: the same send again on a fresh one, not a new attempt
    STOP = "stop"  # the client failed (stalled or broke off its body): answered, nothing recorded
    SUCCESS = "success"  # deliver it: a success
    COOLDOWN = "cooldown"  # deliver it as it came: the upstream asked for a pause, no verdict on its health
    FAILED = "failed"  # a failure, recorded: retry, or give up


class Tried(NamedTuple):
    """One attempt, judged."""

    state: TargetState
    head: ResponseHead | None
    error: UpstreamError | None
    verdict: Verdict


def _delivered_as(verdict: Verdict) -> Outcome:
    """How an answer delivered is settled. (Compared, not looked up: an Enum's hash is Python code.)"""
    return Outcome.SUCCESS if verdict is Verdict.SUCCESS else Outcome.IGNORED


class Exchange:
    """One client request, from admission to its settled answer: its route, deadlines, attempts, permit, admission
    stages passed and upstream connection. The listener holds it (``InFlight``) while it is in flight."""

    __slots__ = (
        "_last_error",
        "_pending",
        "_task",
        "attempts",
        "client",
        "client_fault",
        "client_time",
        "conn",
        "passed",
        "permit",
        "pump",
        "req",
        "route",
        "rt",
        "started",
    )

    def __init__(self, rt: UpstreamRuntime, req: Request, client: ResponseSink) -> None:
        self.rt = rt
        self.req = req
        self.client = client
        # First match wins; an upstream without routes pays one test for them.
        self.route = rt.route_for(req.path, req.method) if rt.routes else rt.default_route
        self.attempts = 0
        self.passed = 0  # admission stages passed: released when the exchange ends
        self.permit: Permit | None = None
        self.conn: UpstreamConnection | None = None
        self.pump: BodyPump | None = None
        self.started = rt.clock.monotonic()
        self.client_time = 0.0  # spent waiting for the client's body: neither total's nor the upstream's latency
        self._last_error: UpstreamError | None = None
        self.client_fault: str | None = None  # body_timeout | body_aborted: the client, not the upstream, failed
        self._pending: TargetState | None = None  # the callback path's attempt, awaiting its response head
        self._task: asyncio.Task[None] | None = None  # where the exchange went on after the callback path

    # -- entry -----------------------------------------------------------------------------------------------

    def start(self) -> InFlight | None:
        """Serve the request: answered at once (None), or in flight (``client.served`` follows)."""
        try:
            return self._start()
        except Exception:
            serving_failed(self.client)
            self._end()
            return None

    def _start(self) -> InFlight | None:
        """A request with no body to wait for (none, or a small one already whole), admitted at once, with a
        pooled connection to its target is sent here and now and answered from the connection's callback
        (``_head_arrived``): the common case, with no task, future or timer of its own. Anything that must wait
        goes on in a task."""
        body = self.req.body
        if body is not None and not (body.complete and body.replayable and not self.req.expect_continue):
            return in_task(self.run(), self.client)  # a body to wait for, or to stream
        refusal = PIPELINE.try_admit(self)
        if refusal is WAIT:
            return in_task(self.run(admission_waits=True), self.client)
        if refusal is not None:
            self._refuse(refusal)
            self._end()
            return None
        self._admitted()
        if not self._take_permit():
            self._end()
            return None
        rt = self.rt
        state = rt.balancer.pick(rt.clock.monotonic(), None)
        conn = state.pool.take_idle()
        if conn is None:
            return in_task(self._go_on(picked=state), self.client)  # a connect to wait for
        self.attempts += 1
        state.outstanding += 1
        self._pending = state
        self._send(state, conn, min(self.route.timeouts.per_try, self._time_left()), self._head_arrived)
        return self

    def cancel(self) -> None:
        """The client went away: drop the upstream attempt at once and give back what the exchange holds."""
        if self._task is not None:
            self._task.cancel()
            return
        state, self._pending = self._pending, None
        if state is not None:
            state.outstanding -= 1
            self._end()

    def _head_arrived(self, head: ResponseHead | None, error: UpstreamError | None) -> None:
        """The callback path's result: an answer already whole is delivered here; anything else (a failure, a
        body to stream, a 101) goes on in a task, at the step the attempt loop takes after an attempt."""
        state, self._pending = self._pending, None
        if state is None:
            return  # cancelled meanwhile: the client is gone and everything is given back
        state.outstanding -= 1
        try:
            tried = self._judge(state, None if error is not None else head, error, may_replay=True)
            verdict = tried.verdict
            delivers = verdict is Verdict.SUCCESS or verdict is Verdict.COOLDOWN
            if verdict is not Verdict.STOP and not (delivers and self._deliver_now(tried)):
                self._task = in_task(self._go_on(tried=tried), self.client)
                return
        except Exception:
            serving_failed(self.client)
        self._end()
        self.client.served()

    async def _go_on(self, picked: TargetState | None = None, tried: Tried | None = None) -> None:
        """The attempt loop, in a task, from where the callback path stopped."""
        try:
            await self._attempts(picked, tried)
        finally:
            self._end()

    async def run(self, admission_waits: bool = False) -> None:
        """Serve the request, waiting wherever it must (a stage's line, the body, a connect, a backoff)."""
        rt = self.rt
        try:
            refusal = WAIT if admission_waits else PIPELINE.try_admit(self)
            if refusal is WAIT:
                refusal = await PIPELINE.admit(self)
            if refusal is not None:
                self._refuse(refusal)
                return
            body = self.req.body
            if body is not None and not body.complete and body.replayable:
                # Read a small body whole before any upstream sees it: a malformed one (bad chunk size) is then
                # answered 400 with nothing forwarded, and a retry can replay it. Large bodies stream.
                if self.req.expect_continue:
                    self.req.expect_continue = False
                    self.client.send_continue()
                waited_from = rt.clock.monotonic()
                try:
                    await body.wait_ready(self.route.timeouts.idle)
                except TimeoutError:
                    self.client_fault = "body_timeout"
                    self._client_failed()
                    return
                except BodyAborted:
                    return  # the listener has answered 400 and is closing
                self.client_time += rt.clock.monotonic() - waited_from
            self._admitted()
            await self._attempts()
        finally:
            self._end()

    def _admitted(self) -> None:
        """Admitted, the body ready: the request counts towards the retry budget's share."""
        if self.rt.budget is not None:
            self.rt.budget.record_request(self.started)

    def _time_left(self) -> float:
        """How long is left of ``timeouts.total`` (the client's own slowness with its body not counted)."""
        return self.started + self.client_time + self.route.timeouts.total - self.rt.clock.monotonic()

    def _end(self) -> None:
        """Give back what the exchange holds: its admission stages, its upstream connection, an unused permit."""
        PIPELINE.release(self)
        self._release(abort=True)

    def _refuse(self, refusal: Refusal) -> None:
        """Answer a request an admission stage refused (counted once, logged once)."""
        if refusal.reason == "breaker_open":
            self._breaker_open(self.rt.clock.monotonic())
            return
        self._own(dataclasses.replace(refusal, decision=self._decision(refusal.decision or refusal.reason)))

    async def _retry_tokens(self, deadline: float) -> bool:
        """A retry is one more send the upstream counts: it takes its tokens too, waiting no longer than the
        rate limit's max_wait and what is left of ``total``. False: refused, and answered."""
        limiter = self.rt.rate
        assert limiter is not None
        route = self.route
        max_wait = route.rate_max_wait if route.rate_max_wait is not None else limiter.max_wait
        max_wait = max(0.0, min(max_wait, deadline - self.rt.clock.monotonic()))
        verdict = limiter.gate.try_acquire(route.weight, route.name, max_wait)
        if verdict is None:
            verdict = await limiter.gate.acquire(route.weight, route.name, max_wait)
        if verdict.reason is None:
            return True
        limiter.counts.refuse(verdict.reason)
        self._retry_refused(rate_refusal(verdict.reason, verdict.wait, max_wait))
        return False

    async def _attempts(self, picked: TargetState | None = None, tried: Tried | None = None) -> None:
        """Attempts, until one gives an answer to deliver or the retry decision says stop. Read top to bottom:
        permit → pick → attempt → judged (stale reuse, the client's fault, a cool-down, an answer, a failure)
        → retry or give up. The callback path enters with its target ``picked`` (permit held) or its first
        attempt already ``tried``."""
        rt, route = self.rt, self.route
        deadline = rt.clock.monotonic() + self._time_left()
        delays: Iterator[float] | None = None
        exclude: TargetState | None = None
        stale_retried = replaying = False
        while True:
            if tried is None:
                # A retry is a send the upstream counts too: it takes tokens; a stale reuse's replay does not.
                takes_tokens = self.attempts > 0 and not replaying and rt.rate is not None
                tried = await self._try(picked, exclude, deadline, not stale_retried, takes_tokens)
                if tried is None:
                    return  # refused (breaker, tokens) or the sidecar ran out of resources: answered
            state, head, error, verdict = tried
            tried = picked = None
            replaying = False
            if verdict is Verdict.REPLAY:
                stale_retried = replaying = True  # the same send again: no new attempt, no new tokens
                continue
            if verdict is Verdict.STOP:
                return
            if verdict is not Verdict.FAILED:
                await self._deliver(head, state, _delivered_as(verdict))  # type: ignore[arg-type]
                return
            if delays is None:
                delays = backoff_delays(route.retry.base_delay, route.retry.max_delay, route.retry.jitter, rt.rng)
            decision = self._retry_decision(head, error, delays, deadline)
            if decision.reason is not None:
                await self._give_up(decision.reason, head, error, state)
                return
            self._spend_retry()
            self._release(abort=head is None or not self._discard_answer())
            exclude = state
            if decision.delay > 0:
                await rt.clock.sleep(decision.delay)

    async def _try(
        self, picked: TargetState | None, exclude: TargetState | None, deadline: float, may_replay: bool, tokens: bool
    ) -> Tried | None:
        """The next attempt (permit, ``tokens`` if it takes some, target, send), judged; None when it could not be
        made — refused or out of resources, and answered."""
        rt = self.rt
        if picked is None:
            if not self._take_permit():
                return None
            if tokens and not await self._retry_tokens(deadline):
                return None
            picked = rt.balancer.pick(rt.clock.monotonic(), exclude)
        attempt = await self._attempt(picked, deadline)
        if attempt is None:
            return None
        return self._judge(picked, *attempt, may_replay=may_replay)

    def _judge(
        self, state: TargetState, head: ResponseHead | None, error: UpstreamError | None, may_replay: bool
    ) -> Tried:
        """What an attempt's result says, with what it settles: a stale reuse or the client's fault frees the
        permit unrecorded; a failure is recorded (breaker, outlier, counter); an answer is settled when it has
        been delivered."""
        rt = self.rt
        if error is not None and may_replay and self._stale_reuse(error):
            # The upstream closed an idle pooled connection as we reused it: not an upstream failure.
            self.attempts -= 1
            self._settle(None, Outcome.IGNORED)
            self._release(abort=True)
            return Tried(state, head, error, Verdict.REPLAY)
        if error is not None and self.client_fault is not None:
            # The client stalled or broke off its body: nothing the upstream did, nothing to record.
            self._settle(None, Outcome.IGNORED)
            self._client_failed()
            return Tried(state, head, error, Verdict.STOP)
        if head is not None and rt.rate is not None and rt.rate.settle_answer(head.status, head.header):
            # The upstream said to pause (429/418 + Retry-After): delivered as it came, never retried, and no
            # verdict on the upstream's health either way.
            return Tried(state, head, error, Verdict.COOLDOWN)
        failed_kind = error.kind if error is not None else (FAILED_ANSWER if head and head.status >= 500 else None)
        if failed_kind is None:
            return Tried(state, head, error, Verdict.SUCCESS)
        # tls_error: its own label in the failures metric
        self._settle(state, Outcome.FAILURE, failed_kind, error.reason if error is not None else None)
        self._last_error = error
        return Tried(state, head, error, Verdict.FAILED)

    def _take_permit(self) -> bool:
        """The breaker's permit for the next attempt; False when refused, the refusal answered."""
        rt = self.rt
        now = rt.clock.monotonic()
        permit = rt.breaker.try_acquire(now)
        if permit is None:
            if rt.enforce:
                # The first attempt meets the breaker half-open with no probe slot left; a retry finds it opened
                # while we backed off: stop at once with what we have. After a failed answer (a 5xx, its body
                # let go) that is the breaker's own answer, not a made-up 502 reset.
                if self._last_error is None:
                    self._breaker_open(now)
                else:
                    self._local_failure(self._last_error, "breaker_open")
                return False
            rt.stats.reject("breaker_open_shadow")
        self.permit = permit
        return True

    async def _attempt(
        self, state: TargetState, deadline: float
    ) -> tuple[ResponseHead | None, UpstreamError | None] | None:
        """One attempt on ``state``: the response head, or the error it failed with; None when the sidecar
        itself ran out of resources (answered here). A pooled connection is used without a coroutine of its own."""
        timeouts, clock = self.route.timeouts, self.rt.clock
        self.attempts += 1
        if self.attempts == 1 and self.req.expect_continue:
            self.client.send_continue()
        remaining = deadline - clock.monotonic()
        per_try = min(timeouts.per_try, remaining)
        state.outstanding += 1
        try:
            if per_try <= 0:
                raise UpstreamTimedOut("total timeout ran out")
            conn = state.pool.take_idle()
            if conn is None:
                started = clock.monotonic()
                conn = await state.pool.connect(min(timeouts.connect, remaining))
                per_try -= clock.monotonic() - started
                if per_try <= 0:
                    conn.close()
                    raise UpstreamTimedOut("no time left after connecting")
            waiter: asyncio.Future[ResponseHead] = asyncio.get_running_loop().create_future()
            self._send(state, conn, per_try, partial(_resolve, waiter))
            head = await waiter
        except UpstreamError as exc:
            return None, exc
        except OutOfResources as exc:
            self._out_of_resources(exc)
            return None
        finally:
            state.outstanding -= 1
        if conn.failure is not None:
            # The answer broke before a byte of it went to the client (a bad chunk in the same read as the
            # head): a failed attempt like any other, not a 200 head followed by an abort.
            return None, conn.failure
        return head, None

    def _stale_reuse(self, error: UpstreamError) -> bool:
        """Did a pooled connection turn out closed before the upstream can have seen anything of the request?"""
        conn = self.conn
        return (
            conn is not None
            and conn.reused
            and not conn.received_any
            and isinstance(error, ConnectionReset)
            and (self.req.method in _IDEMPOTENT or error.sent_nothing)
            and self._body_replayable()
        )

    def _retry_decision(
        self, head: ResponseHead | None, error: UpstreamError | None, delays: Iterator[float], deadline: float
    ) -> RetryDecision:
        rt, retry = self.rt, self.route.retry
        now = rt.clock.monotonic()
        budget = rt.budget
        return decide_retry(
            self.route.rules,
            attempts=self.attempts,
            method=self.req.method,
            kind=error.kind if error is not None else None,
            status=head.status if head is not None else 0,
            body_replayable=self._body_replayable(),
            backoff=delays,
            retry_after=parse_retry_after(head.header(b"retry-after"), rt.clock.wall()) if head else None,
            max_delay=retry.max_delay,
            now=now,
            deadline=deadline,
            budget_allows=budget is None or budget.allows(now),
            breaker_retry_in=rt.breaker.retry_in(now) if rt.enforce else 0.0,
            breaker_enforced=rt.enforce,
        )

    async def _give_up(
        self, why_not: NoRetry, head: ResponseHead | None, error: UpstreamError | None, state: TargetState
    ) -> None:
        """No retry: deliver the failed answer, or answer the failure."""
        if why_not is NoRetry.RETRY_BUDGET:
            self.rt.stats.reject("retry_budget")
        if head is not None:
            await self._deliver(head, state, None)
            return
        assert error is not None
        stopped_by = why_not if why_not in (NoRetry.RETRY_BUDGET, NoRetry.BREAKER_OPEN) else None
        self._local_failure(error, stopped_by)

    def _spend_retry(self) -> None:
        budget = self.rt.budget
        if budget is not None:
            budget.try_spend(self.rt.clock.monotonic())  # it allowed one a moment ago: this spends it
        self.rt.stats.retries += 1

    def _retry_refused(self, refusal: Refusal) -> None:
        """A retry could not get its tokens in time: stop with what we have (the last failure, or the 429)."""
        if self._last_error is not None:
            self._local_failure(self._last_error, refusal.reason)
        else:
            self._refuse(refusal)

    def _out_of_resources(self, exc: OutOfResources) -> None:
        """The sidecar could not open a connection for want of its own resources: overload, nobody's failure."""
        permit, self.permit = self.permit, None
        self.rt.out_of_resources(permit, exc)  # counts the refusal (overload) and logs it, throttled
        detail = "the sidecar is out of resources (file descriptors, buffers or memory)"
        self._own(OwnAnswer(503, "overload", detail, self._decision("out_of_resources")))

    def _client_failed(self) -> None:
        if self.client_fault == "body_timeout":
            detail = f"request body stalled for {self.route.timeouts.idle:g}s (timeouts.idle)"
            decision = self._decision("client_body_timeout")
            self._own(OwnAnswer(408, "bad_request", detail, decision, rejected="client_timeout"))
        # body_aborted: the listener has answered 400 (malformed body) or the client is gone

    def _body_replayable(self) -> bool:
        body = self.req.body
        return body is None or (body.replayable and not body.streamed)

    # -- one attempt -----------------------------------------------------------------------------------------

    def _send(self, state: TargetState, conn: UpstreamConnection, per_try: float, receiver: HeadReceiver) -> None:
        """Write the request on ``conn`` (its body whole, or streamed by a pump); ``receiver`` hears of its
        response head, due within ``per_try`` of the last byte sent."""
        self.conn = conn
        req = self.req
        body = req.body
        whole = body.whole if body is not None else None
        if body is None:
            framing = b"content-length: 0\r\n" if req.method in ("POST", "PUT", "PATCH") else b""
        elif whole is not None:
            framing = b"content-length: %d\r\n" % len(whole)
        elif body.length is not None:
            framing = b"content-length: %d\r\n" % body.length
        else:
            framing = b"transfer-encoding: chunked\r\n"
        upgrade = req.upgrade
        conn.upgrade_asked = upgrade is not None
        if upgrade is not None:  # a bodiless GET (``mark_upgrade``): its Connection/Upgrade go with it
            framing = b"connection: upgrade\r\nupgrade: " + upgrade + b"\r\n"
        head = request_head(self.rt, req, state.authority, framing)
        conn.request_complete = body is None or whole is not None
        conn.begin(head, whole, req.method == "HEAD", per_try, receiver)
        if body is not None and whole is None:
            # Streamed: the pump sends the body on as it arrives (by callbacks, bounded by timeouts.idle both
            # ways); the response head's per_try starts at its last byte.
            self.pump = BodyPump(self, body, conn, body.length is None, self.route.timeouts.idle, self.rt.clock)
            self.pump.start()

    # -- answers ---------------------------------------------------------------------------------------------

    def _deliver_now(self, tried: Tried) -> bool:
        """Deliver an answer that is already whole, to a request whose body is all in, and settle it: nothing to
        wait for. False (nothing done): ``_deliver`` must."""
        conn, head, body = self.conn, tried.head, self.req.body
        assert conn is not None and head is not None
        if head.status == 101 or (body is not None and not body.complete):
            return False
        whole = conn.complete_body()
        if whole is None:
            return False
        client_chunked, keep_alive = self._client_framing(head)
        client_head = response_head(head, client_chunked, self.attempts, keep_alive, self.client.http11)
        self.client.respond_whole(client_head, whole, client_chunked, keep_alive, conn.trailers)
        self._delivered(tried.state, _delivered_as(tried.verdict), head.status)
        return True

    def _client_framing(self, head: ResponseHead) -> tuple[bool, bool]:
        """How the client gets this answer: chunked?, and may its connection carry another request?"""
        client = self.client
        client_chunked = head.framing in ("chunked", "eof") and client.http11 and self.req.method != "HEAD"
        # Without a length or chunking to offer the client, only closing the connection can end the body.
        return client_chunked, client.keep_alive and (head.framing in ("length", "none") or client_chunked)

    def _delivered(self, state: TargetState, outcome: Outcome | None, status: int) -> None:
        if outcome is not None:
            self._settle(state, outcome)
        self._answered(status, None)
        self._release(abort=False)

    async def _deliver(self, head: ResponseHead, state: TargetState, outcome: Outcome | None) -> None:
        """Stream an upstream answer to the client, then settle ``outcome`` (None: a failed answer, settled
        when it came; a body that breaks on the way is a failure whatever the head said)."""
        client, conn = self.client, self.conn
        assert conn is not None
        if head.status == 101:
            await self._switch(head, state, conn)
            return
        client_chunked, keep_alive = self._client_framing(head)
        whole = conn.complete_body()
        body = self.req.body
        if body is not None and not body.complete and keep_alive:
            keep_alive = await self._early_answer(head, conn, whole is not None)
        client_head = response_head(head, client_chunked, self.attempts, keep_alive, client.http11)
        status = head.status
        try:
            if whole is not None:
                client.respond_whole(client_head, whole, client_chunked, keep_alive, conn.trailers)
            else:
                client.start_response(client_head, client_chunked, keep_alive, conn)
                await conn.deliver(client.write_body, self.route.timeouts.idle)
        except UpstreamError as exc:
            # Too late for a clean answer: the client sees the body cut short, never a second status line.
            self._settle(state, Outcome.FAILURE, exc.kind)
            self._answered(status, exc.kind)
            client.abort()
            return
        if whole is None:
            client.end_response(conn.trailers)
        self._delivered(state, outcome, status)

    async def _switch(self, head: ResponseHead, state: TargetState, conn: UpstreamConnection) -> None:
        """A 101: the handshake succeeded (recorded now, not when the relay ends); then relay until either side
        closes, holding the bulkhead slot (proxy.http.upgrade). Never retried, never pooled."""
        rt = self.rt
        self.conn = None
        self._settle(state, Outcome.SUCCESS)
        self._answered(101, None)
        state.outstanding += 1  # an open relay is an active request to its target (least_request)
        try:
            await relay(rt, self.client, conn, head, self.attempts, self.route.timeouts.idle)
        finally:
            state.outstanding -= 1

    async def _early_answer(self, head: ResponseHead, conn: UpstreamConnection, whole: bool) -> bool:
        """The upstream answered before the client's body was all in (nginx's ``return 200`` does, dropping the
        rest itself). May the client's connection still carry its next request? Only if the rest of the body is
        read within the discard bounds (``proxy.http.body``); if not, the answer says ``Connection: close``.

        A whole answer waits (at most DISCARD_SECONDS) for the body to end: sent on to the upstream while it takes
        it, so its connection can be pooled, else dropped. A streamed answer starts now, kept alive only if the
        rest is known to fit the bound; the listener drops it after the answer."""
        pump, remaining = self.pump, self.req.body.remaining if self.req.body is not None else 0
        if not whole or pump is None or pump.done or (remaining is not None and remaining > DISCARD_BYTES):
            return self._discardable()
        return await pump.settle(keep_upstream=head.keep_alive and not conn.closed)

    def _discardable(self) -> bool:
        """The client's body is in, or what is left of it is known to fit the discard bound."""
        body = self.req.body
        if body is None or body.complete:
            return True
        remaining = body.remaining
        return self.client_fault is None and remaining is not None and remaining <= DISCARD_BYTES

    def _discard_answer(self) -> bool:
        """Before a retry: can the failed answer's connection be reused? Only if its body is all in."""
        conn = self.conn
        return conn is not None and conn.response_complete

    def _release(self, abort: bool) -> None:
        pump, self.pump = self.pump, None
        if pump is not None:
            pump.stop()  # a body not all sent: the connection is not reused (finish), the listener drops the rest
        conn, self.conn = self.conn, None
        if conn is not None:
            if abort and conn.busy:
                conn.abort()
            else:
                conn.finish()
        if self.permit is not None:
            self._settle(None, Outcome.IGNORED)  # the exchange ended without a verdict: free the probe slot

    def _breaker_open(self, now: float) -> None:
        rt = self.rt
        if not self._discardable():
            self.client.keep_alive = False
        self.client.send_raw(refuse_breaker_open(rt, now, self.client.keep_alive, self.client.http11))
        if self.client.log_requests:  # counted by refuse_breaker_open
            status = rt.fallback.status if rt.fallback else 503
            req = self.req
            log_answer(
                rt.name,
                req.method,
                req.path,
                self.route.name,
                status,
                "breaker_open",
                self.attempts,
                now - self.started,
            )

    def _settle(self, target: TargetState | None, outcome: Outcome, kind: str = "", label: str | None = None) -> None:
        """Record this attempt's outcome (``UpstreamRuntime.settle``) and let its permit go."""
        permit, self.permit = self.permit, None
        now = self.rt.clock.monotonic()
        self.rt.settle(permit, target, outcome, now, now - self.started - self.client_time, kind, label, log)

    def _answered(self, status: int, reason: str | None) -> None:
        """Count the answer this exchange gave, proxied (``reason`` None) or its own, and log its one line."""
        duration = self.rt.clock.monotonic() - self.started
        self.rt.stats.answered(status, duration)
        if self.client.log_requests:
            req = self.req
            log_answer(self.rt.name, req.method, req.path, self.route.name, status, reason, self.attempts, duration)

    def _local_failure(self, error: UpstreamError, stopped_by: str | None) -> None:
        reason = error.reason if stopped_by != "retry_budget" else "retry_budget"
        decision = self._decision(f"{error.reason} attempts={self.attempts}")
        if stopped_by:
            decision += f" retry_stopped_by={stopped_by}"
        extra = ((b"x-sidecar-attempts", b"%d" % self.attempts),) if self.attempts > 1 else ()
        self._own(OwnAnswer(error.status, reason, str(error), decision, extra=extra))

    def _decision(self, reason: str) -> str:
        """``x-sidecar-decision`` of an answer the sidecar makes: the upstream, the route if one matched, why."""
        route = self.route.name
        if route is None:
            return f"upstream={self.rt.name} reason={reason}"
        return f"upstream={self.rt.name} route={route} reason={reason}"

    def _own(self, answer: OwnAnswer) -> None:
        """An answer of the sidecar's own (``proxy.http.answers``), counted and logged once."""
        client = self.client
        if not self._discardable():
            client.keep_alive = False  # the client's connection cannot carry another request: say so
        client.send_raw(encode(answer, self.rt.name, client.keep_alive, client.http11))
        if answer.rejected is not None:
            self.rt.stats.reject(answer.rejected)
        self._answered(answer.status, answer.reason)


def forward(rt: UpstreamRuntime, req: Request, client: ResponseSink) -> InFlight | None:
    """Serve one request (``proxy.http.sink.Serve``): answered at once (None), or in flight until
    ``client.served``. A client that goes away cancels it, which drops the upstream attempt at once."""
    return Exchange(rt, req, client).start()


def _resolve(waiter: asyncio.Future[ResponseHead], head: ResponseHead | None, error: UpstreamError | None) -> None:
    """A connection's ``HeadReceiver`` for an attempt that awaits its head in a task."""
    if waiter.done():
        return
    if error is not None:
        waiter.set_exception(error)
    else:
        assert head is not None
        waiter.set_result(head)
