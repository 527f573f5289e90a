"""One outbound rate-limit budget for every sidecar on a key: the windows and the cool-down counted in Redis.

``RedisBackend`` is a ``proxy.resilience.ratelimit.Backend``: N sidecars (processes, possibly on different hosts)
that name the same ``key`` stay together under one limit, as the upstream counts it::

    take(weight, route)   cool-down running here? ── refused at once, no I/O
                          Redis in use ── one EVALSHA (≤ timeout): granted on every limit, or (wait, reason);
                                          takes made meanwhile go together in the next one
                          Redis failed ── the local fallback (a share of the limits), synchronous; after
                                          retry_interval the next call starts a try of Redis in the
                                          background (a circuit of its own); it answers: Redis again
    cool_down / observe   applied to the local fallback at once, written to Redis by a task

One Lua script decides, atomically, on Redis' own clock (``TIME``), so sidecars on hosts whose clocks differ
agree on every window: it checks the cool-down key and every limit that applies to the route (scope None or the
route), spends the weight on all of them or on none, and answers granted or (wait, reason) with each limit's
count. Why a script of our own rather than the ``limits`` library: ``limits`` tests one limit per call (a request
must fit several, all or none, or an exchange counts the weight it was refused on), spends weight as repeated
entries, has no cool-down, and reports the time until a window has room through a second, non-atomic call.

Keys (a hash tag, so a Redis Cluster keeps one budget's keys on one slot; a ``key`` must not contain ``}``)::

    seawall:rl:{<key>}:cool                       the cool-down's end, µs of Redis time; only ever extended
    seawall:rl:{<key>}:s:<per>+<margin>:<scope>   sliding: a sorted set, one member per send (score: its time in
                                                  µs, member: "<nonce>:<weight>") ...
    seawall:rl:{<key>}:s:<per>+<margin>:<scope>:n ... and the weight it holds, kept beside it
    seawall:rl:{<key>}:f:<per>:<scope>            fixed: a hash {w: calendar window number, n: weight in it}
    <a limit's key>:caps                          what an upstream's remaining + reset said: a hash {end µs:
                                                  weight left until then}, as ``LocalBackend.observe`` keeps them

A limit's key names its window and scope, not its ``requests``: sidecars that configure the same window share its
count, and each holds it to its own number.

Why a sorted set for a sliding limit: it is exact (the guarantee is "no interval of length per+margin holds more
than ``requests``", which a token bucket or bucketed counters cannot keep), and it costs little: a send adds one
member (O(log n)); each call removes only the members that left the window (O(log n + removed), amortised O(1)
per send, their weight subtracted from the kept sum instead of re-adding the set); a refusal reads only the
oldest members until enough weight would have left (at most ``sum + weight - requests`` members, one for a
burst of weight-1 sends). Memory is bounded: each member carries ≥ 1 of weight and the sum never passes
``requests`` (an observed ``used`` at or past it replaces the set by one full member), so a limit holds at most
``requests`` members; every key has a PEXPIRE of its window, so a budget nobody uses vanishes.

Measured on loopback (2-core machine, shared): a take costs ~0.3 ms median through redis-py (a PING ~0.13 ms),
and ~30 µs of Redis' CPU (~8 µs per take when several go in one call); a burst of 100 concurrent takes
costs two calls of the script.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import math
import os
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from proxy.resilience.clock import Clock
from proxy.resilience.ratelimit import (
    Backend,
    LimitSpec,
    LimitState,
    RateSnapshot,
    Refusal,
    SharedState,
    Verdict,
)

log = logging.getLogger("seawall.ratelimit")

_US = 1_000_000  # Redis time is counted in µs

# The whole decision, in Lua (its arguments and answers are described at its top).
SCRIPT = (Path(__file__).parent / "shared_limit.lua").read_text(encoding="utf-8")
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

_Call = tuple[str | int, ...]  # EVALSHA's arguments after the SHA: numkeys, keys, args

_REASONS = (None, Refusal.RATE_LIMITED, Refusal.UPSTREAM_COOLDOWN)
_FAILURES = (RedisError, OSError, TimeoutError)  # redis-py's errors, a socket's, asyncio.timeout's


def _limit_keys(prefix: str, spec: LimitSpec) -> tuple[str, ...]:
    """A sliding limit's sorted set, its sum and its caps; a fixed limit's hash and its caps."""
    scope = "*" if spec.scope is None else spec.scope
    if spec.fixed:
        name = f"{prefix}:f:{spec.per:g}:{scope}"
        return name, f"{name}:caps"
    name = f"{prefix}:s:{spec.per:g}+{spec.margin:g}:{scope}"
    return name, f"{name}:n", f"{name}:caps"


def _kind(spec: LimitSpec) -> str:
    return "f" if spec.fixed else "s"


def _span_us(spec: LimitSpec) -> int:
    return round((spec.per if spec.fixed else spec.per + spec.margin) * _US)


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one route's takes send: the limits that apply to it, and the script's arguments up to the takes."""

    limits: tuple[int, ...]  # indexes into specs
    head: _Call  # numkeys, the keys (the cool-down's first), "take", the number of limits, each one's arguments
    largest: float  # the heaviest request every limit could ever grant (inf: no limit applies)


class _Script:
    """The script, called through one connection: calls made while others are on their way wait for the next
    round trip and go together, a route's takes as one call of the script (its state read and written once),
    the rest beside them in one pipeline. A burst of N concurrent takes so costs a round trip or two, not N
    connections each set up within the timeout, nor N commands to encode and parse."""

    def __init__(
        self, redis: aioredis.Redis, timeout: float, on_answer: Callable[[BaseException | None], None]
    ) -> None:
        # redis-py leaves execute_command untyped: one typed handle on it
        self._command = cast(Callable[..., Awaitable[Any]], redis.execute_command)
        self._redis = redis
        self._timeout = timeout
        self._on_answer = on_answer  # after every round trip: None, or what failed
        self._queue: list[tuple[_Plan | None, _Call, asyncio.Future[list[int]]]] = []
        self._sender: asyncio.Task[None] | None = None
        self._alone = False  # a caller's own round trip is on its way (see ``call``)

    @property
    def busy(self) -> bool:
        """A round trip is on its way (or about to be)."""
        return self._alone or self._sender is not None

    async def call(self, plan: _Plan | None, call: _Call) -> list[int]:
        """``plan``: a take of ``call`` = (weight, nonce), answered [Redis time, reason, wait, each limit's left];
        None: ``call`` is the script's whole arguments, answered as the script answers. A failure, or no answer
        within the timeout, raises. Only the round trip's own outcome counts as Redis' (``on_answer``): a caller
        that waited too long behind others, its event loop busy, gives up alone."""
        if not self.busy:
            return await self._call_alone(plan, call)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[list[int]] = loop.create_future()
        self._queue.append((plan, call, answer))
        if not self.busy:
            self._sender = loop.create_task(self._send())
        async with asyncio.timeout(self._timeout):
            return await answer  # a caller that gives up cancels its future: the sender skips it

    async def _call_alone(self, plan: _Plan | None, call: _Call) -> list[int]:
        """Nothing else on its way: the caller makes its own round trip, without a task's hop; calls that come
        meanwhile queue, and a sender takes them once it is back."""
        self._alone = True
        try:
            async with asyncio.timeout(self._timeout):
                (answer,) = await self._evalsha([call if plan is None else plan.head + call])
        except _FAILURES as exc:
            self._on_answer(exc)
            raise
        finally:
            self._alone = False
            if self._queue and self._sender is None:
                self._sender = asyncio.get_running_loop().create_task(self._send())
        if isinstance(answer, BaseException):
            self._on_answer(answer)
            raise answer
        self._on_answer(None)
        return [int(value) for value in answer]

    async def load(self) -> None:
        await self._command("SCRIPT", "LOAD", SCRIPT)

    async def drain(self) -> None:
        if self._sender is not None:
            await asyncio.gather(self._sender, return_exceptions=True)

    async def _send(self) -> None:
        try:
            while self._queue:
                batch = [queued for queued in self._queue if not queued[2].done()]
                self._queue = []
                if batch:
                    await self._send_batch(batch)
        finally:
            self._sender = None

    async def _send_batch(self, batch: list[tuple[_Plan | None, _Call, asyncio.Future[list[int]]]]) -> None:
        calls: list[_Call] = []
        waiting: list[tuple[bool, list[asyncio.Future[list[int]]]]] = []  # per call: takes?, and who waits
        takes: dict[_Plan, list[tuple[_Call, asyncio.Future[list[int]]]]] = {}
        for plan, call, future in batch:
            if plan is None:
                calls.append(call)
                waiting.append((False, [future]))
            else:
                takes.setdefault(plan, []).append((call, future))
        for plan, queued in takes.items():
            calls.append(plan.head + tuple(arg for call, _ in queued for arg in call))
            waiting.append((True, [future for _, future in queued]))
        answers: list[Any]
        error: BaseException | None
        try:
            async with asyncio.timeout(self._timeout):
                answers = await self._evalsha(calls)
        except _FAILURES as exc:
            answers, error = [exc] * len(calls), exc
        else:
            error = next((answer for answer in answers if isinstance(answer, BaseException)), None)
        self._on_answer(error)  # first, so the callers resume in the state it leads to
        for (take, futures), answer in zip(waiting, answers, strict=True):
            _settle(take, futures, answer)

    async def _evalsha(self, calls: list[_Call]) -> list[Any]:
        """The script by its SHA, loaded once; when Redis does not know it (a restart, a failover, SCRIPT FLUSH),
        loaded again and the calls it refused sent again (a NOSCRIPT ran nothing). Errors in their places."""
        answers = await self._pipeline(calls)
        unknown = [i for i, answer in enumerate(answers) if isinstance(answer, NoScriptError)]
        if unknown:
            await self.load()
            for i, answer in zip(unknown, await self._pipeline([calls[i] for i in unknown]), strict=True):
                answers[i] = answer
        return answers

    async def _pipeline(self, calls: list[_Call]) -> list[Any]:
        if len(calls) == 1:  # the common case, without a pipeline's own cost
            try:
                return [await self._command("EVALSHA", SCRIPT_SHA, *calls[0])]
            except ResponseError as exc:  # NOSCRIPT, or the script's own error: this call's answer
                return [exc]
        pipe = self._redis.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command("EVALSHA", SCRIPT_SHA, *call)
        return await pipe.execute(raise_on_error=False)


def _settle(take: bool, futures: list[asyncio.Future[list[int]]], answer: Any) -> None:
    """Hands each caller its part of one call's answer: a take's [time, reason, wait, lefts], or the whole."""
    if isinstance(answer, BaseException):
        for future in futures:
            if not future.done():
                future.set_exception(answer)
        return
    values = [int(value) for value in answer]
    lefts = values[1 + 2 * len(futures) :]
    for j, future in enumerate(futures):
        if not future.done():
            future.set_result([values[0], values[1 + 2 * j], values[2 + 2 * j], *lefts] if take else values)


class RedisBackend:
    """The windows and the cool-down in Redis, shared by every sidecar on ``key``; a local fallback while
    Redis cannot answer within ``timeout``.

    ``fallback`` is counted all along: while Redis is in use, every send Redis granted is spent on it too (as far
    as the local share has room), so a switch to it starts from what this process really sent, not from an empty
    window; cool-downs and observed usage go to it at once.
    """

    def __init__(
        self,
        specs: Sequence[LimitSpec],
        *,
        url: str,
        key: str,
        fallback: Backend,
        clock: Clock,
        timeout: float = 0.01,
        retry_interval: float = 1.0,
        connect_timeout: float = 1.0,
        on_change: Callable[[SharedState], None] | None = None,
        upstream: str | None = None,
    ) -> None:
        if "}" in key or "{" in key:
            raise ValueError(f"shared rate-limit key {key!r}: braces would break the Redis Cluster hash tag")
        self.specs = tuple(specs)
        self.key = key
        self._fallback = fallback
        self._clock = clock
        self._timeout = timeout
        self._retry_interval = retry_interval
        self._connect_timeout = connect_timeout
        self._on_change = on_change
        self._upstream = upstream
        # Socket timeouts as well as asyncio's: a half-open connection fails on its own, and no retries inside
        # redis-py (its default retries three times), since the fallback is the retry.
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=connect_timeout,  # a request still waits ≤ timeout (asyncio's, around it)
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._prefix = f"seawall:rl:{{{key}}}"
        self._cool_key = f"{self._prefix}:cool"
        self._keys = tuple(_limit_keys(self._prefix, spec) for spec in self.specs)
        self._plans: dict[str | None, _Plan] = {}
        self._nonce = os.urandom(6).hex()
        self._sends = itertools.count()
        self.state = SharedState.SHARED
        self._retry_at = 0.0  # FALLBACK: when the next call starts a try of Redis (clock time)
        self._probing: asyncio.Task[bool] | None = None  # that try, in the background
        self._cool_until = 0.0  # clock time; a cool-down this process knows of, its own or one Redis reported
        self._left = [spec.requests for spec in self.specs]  # each limit's room, as Redis last said
        self._writes: set[asyncio.Task[None]] = set()
        self._script = _Script(self._redis, timeout, self._answered)
        self.redis_time = 0.0  # Redis' clock (epoch seconds) at its last answer: grants are timestamped with it

    # -- the Backend protocol --------------------------------------------------------------------------------

    def take_now(self, weight: int, route: str | None, now: float) -> Verdict | None:
        if now < self._cool_until:
            return Verdict(self._cool_until - now, Refusal.UPSTREAM_COOLDOWN)
        if weight > self._plan(route).largest:
            return Verdict(math.inf, Refusal.RATE_LIMITED)
        if self.state is SharedState.FALLBACK:
            if now >= self._retry_at:
                self._probe()
            return self._fallback.take_now(weight, route, now)
        return None

    async def take(self, weight: int, route: str | None, now: float) -> Verdict:
        verdict = self.take_now(weight, route, now)
        if verdict is None:
            verdict = await self._take_shared(weight, route, now)
        if verdict is None:
            verdict = self._fallback.take_now(weight, route, self._clock.monotonic())
        if verdict is None:
            verdict = await self._fallback.take(weight, route, self._clock.monotonic())
        return verdict

    def cool_down(self, seconds: float, now: float) -> None:
        self._fallback.cool_down(seconds, now)
        if now + seconds <= self._cool_until:
            return  # no later than one already sent: sending it again would only move its end by the delay
        self._cool_until = now + seconds
        if self.state is SharedState.SHARED:
            self._write(self._send_cool_down())

    def observe(
        self,
        limit: int,
        now: float,
        *,
        used: int | None = None,
        remaining: int | None = None,
        reset: float | None = None,
    ) -> None:
        """As ``LocalBackend.observe`` reads the numbers (``used`` above the count: phantom usage; ``remaining``
        with ``reset``: a cap until then; ``remaining`` alone: ``used = requests - remaining``), applied to the
        local fallback at once and to the shared windows by a write no request waits for."""
        self._fallback.observe(limit, now, used=used, remaining=remaining, reset=reset)
        if not 0 <= limit < len(self.specs):
            return
        requests = self.specs[limit].requests
        cap: tuple[int, float] | None = None
        if remaining is not None and remaining >= 0:
            if reset is None:
                used = max(used or 0, requests - remaining)
            elif reset > 0:
                cap = (remaining, now + reset)
                self._left[limit] = min(self._left[limit], remaining)
        if used is not None and used > 0:
            self._left[limit] = min(self._left[limit], max(0, requests - used))
        elif cap is None:
            return
        if self.state is SharedState.SHARED:
            self._write(self._send_observed(limit, used if used is not None and used > 0 else -1, cap))

    def snapshot(self, now: float) -> RateSnapshot:
        if self.state is SharedState.FALLBACK:
            return replace(self._fallback.snapshot(now), shared=SharedState.FALLBACK)
        limits = tuple(LimitState(spec, left) for spec, left in zip(self.specs, self._left, strict=True))
        return RateSnapshot(limits, max(0.0, self._cool_until - now), 0, SharedState.SHARED)

    # -- life --------------------------------------------------------------------------------------------------

    async def connect(self) -> bool:
        """Open a connection and load the script, within ``connect_timeout``: the warm-up before traffic
        (optional: the first take does it too, within ``timeout``), and how the fallback tries Redis again.
        False (and FALLBACK, logged once) when Redis cannot be reached."""
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._script.load()
        except _FAILURES as exc:
            self._failed(exc)
            return False
        self._succeeded()
        return True

    async def close(self) -> None:
        """Let the writes in flight finish (each bounded by ``timeout``), then close the connections."""
        if self._probing is not None:
            await asyncio.gather(self._probing, return_exceptions=True)
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        await self._script.drain()
        await self._redis.aclose()

    # -- Redis -------------------------------------------------------------------------------------------------

    def _plan(self, route: str | None) -> _Plan:
        plan = self._plans.get(route)
        if plan is None:
            limits = tuple(i for i, spec in enumerate(self.specs) if spec.scope is None or spec.scope == route)
            keys: list[str] = [self._cool_key]
            args: list[str | int] = []
            for i in limits:
                spec = self.specs[i]
                keys += self._keys[i]
                args += [_kind(spec), spec.requests, _span_us(spec)]
            largest = min((self.specs[i].requests for i in limits), default=math.inf)
            head = (len(keys), *keys, "take", len(limits), *args)
            plan = self._plans[route] = _Plan(limits, head, largest)
        return plan

    async def _run(self, keys: Sequence[str], *args: str | int) -> list[int]:
        """A cool-down or an observation: one call of the script, in the next pipeline."""
        answer = await self._script.call(None, (len(keys), *keys, *args))
        self.redis_time = answer[0] / _US
        return answer

    async def _take_shared(self, weight: int, route: str | None, now: float) -> Verdict | None:
        """Redis' verdict, or None when Redis failed (the caller asks the fallback)."""
        plan = self._plan(route)
        try:
            answer = await self._script.call(plan, (weight, f"{self._nonce}:{next(self._sends)}"))
        except _FAILURES:
            return None  # too late, or Redis failed (``_answered`` has seen that): the fallback answers
        self.redis_time = answer[0] / _US
        status, wait = answer[1], answer[2] / _US
        for i, left in zip(plan.limits, answer[3:], strict=True):
            self._left[i] = left
        reason = _REASONS[status]
        if reason is None:
            # The same send on the local count, so a switch to the fallback starts from what this process sent.
            self._fallback.take_now(weight, route, now)
            return Verdict(0.0)
        if reason is Refusal.UPSTREAM_COOLDOWN:
            # Another sidecar's cool-down: known here too, so the next requests wait without asking Redis and a
            # Redis that fails meanwhile does not end it.
            self._cool_until = max(self._cool_until, now + wait)
            self._fallback.cool_down(wait, now)
        return Verdict(wait, reason)

    def _write(self, write: Coroutine[Any, Any, None]) -> None:
        """A write that no request waits for; its task is kept until done (the loop holds tasks weakly). Outside
        the event loop's thread (no running loop) there is nobody to send it: only the fallback has it."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            write.close()
            return
        task = loop.create_task(write)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _send_cool_down(self) -> None:
        left = self._cool_until - self._clock.monotonic()
        if left <= 0:
            return
        with contextlib.suppress(*_FAILURES):  # ``_answered`` has seen it
            await self._run((self._cool_key,), "cool", math.ceil(left * _US))

    async def _send_observed(self, limit: int, used: int, cap: tuple[int, float] | None) -> None:
        spec = self.specs[limit]
        cap_left, cap_us = -1, 0
        if cap is not None:
            cap_left, cap_us = cap[0], math.ceil((cap[1] - self._clock.monotonic()) * _US)
            if cap_us <= 0:
                cap_left = -1  # over before it reached Redis
        nonce = f"{self._nonce}:{next(self._sends)}"
        args = (nonce, _kind(spec), spec.requests, _span_us(spec), used, cap_left, cap_us)
        with contextlib.suppress(*_FAILURES):  # ``_answered`` has seen it
            await self._run((self._cool_key, *self._keys[limit]), "observe", *args)

    # -- the circuit ---------------------------------------------------------------------------------------------

    def _probe(self) -> None:
        """Retry Redis in the background: no request waits for it; they stay on the fallback until it answers."""
        if self._probing is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._retry_at = math.inf  # until the probe ends (a failed one sets the next time)
        self._probing = loop.create_task(self.connect())
        self._probing.add_done_callback(self._probed)

    def _probed(self, _: asyncio.Task[bool]) -> None:
        self._probing = None

    def _answered(self, error: BaseException | None) -> None:
        if error is None:
            self._succeeded()
        else:
            self._failed(error)

    def _failed(self, exc: BaseException) -> None:
        self._retry_at = self._clock.monotonic() + self._retry_interval
        if self.state is SharedState.SHARED:
            self._change(SharedState.FALLBACK, f"Redis failed ({type(exc).__name__}: {exc}); counting locally")

    def _succeeded(self) -> None:
        if self.state is SharedState.FALLBACK:
            self._change(SharedState.SHARED, "Redis answers again; counting in Redis")
            if self._cool_until > self._clock.monotonic():
                self._write(self._send_cool_down())  # a cool-down that started while Redis was away

    def _change(self, state: SharedState, why: str) -> None:
        self.state = state
        log.log(
            logging.WARNING if state is SharedState.FALLBACK else logging.INFO,
            "shared rate limit %s: %s: %s",
            self.key,
            state.value,
            why,
            extra={"event": "rate_limit_shared", "upstream": self._upstream, "key": self.key, "state": state.value},
        )
        if self._on_change is not None:
            self._on_change(state)
