"""The rate-limit script of ``proxy.upstream.shared_limit`` and how it is called: by its SHA (loaded again when
Redis lost it), concurrent calls together in one round trip on one connection.

The script itself is ``shared_limit.lua`` beside this file; its arguments and answers are described at its top.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

SCRIPT = (Path(__file__).parent / "shared_limit.lua").read_text(encoding="utf-8")
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

Call = tuple[str | int, ...]  # EVALSHA's arguments after the SHA: numkeys, keys, args
FAILURES = (RedisError, OSError, TimeoutError)  # redis-py's errors, a socket's, asyncio.timeout's


class ScriptCaller:
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
        self._queue: list[tuple[Call | None, Call, asyncio.Future[list[int]]]] = []
        self._sender: asyncio.Task[None] | None = None
        self._alone = False  # a caller's own round trip is on its way (see ``call``)

    @property
    def busy(self) -> bool:
        """A round trip is on its way (or about to be)."""
        return self._alone or self._sender is not None

    async def call(self, head: Call | None, call: Call) -> list[int]:
        """With a ``head`` (a take's arguments up to the takes: keys, limits): a take of ``call`` = (weight,
        nonce), answered [Redis time, reason, wait, each limit's left]; takes with the same head go as one call of
        the script. None: ``call`` is the script's whole arguments, answered as the script answers. A failure,
        or no answer within the timeout, raises. Only the round trip's own outcome counts as Redis' (``on_answer``):
        a caller that waited too long behind others, its event loop busy, gives up alone."""
        if not self.busy:
            return await self._call_alone(head, call)
        # in the queue: the sender on its way goes on with it, or the caller alone starts one when it is back
        answer: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._queue.append((head, call, answer))
        async with asyncio.timeout(self._timeout):
            return await answer  # a caller that gives up cancels its future: the sender skips it

    async def _call_alone(self, head: Call | None, call: Call) -> list[int]:
        """Nothing else on its way: the caller makes its own round trip, without a task's hop; calls that come
        meanwhile queue, and a sender takes them once it is back."""
        self._alone = True
        try:
            async with asyncio.timeout(self._timeout):
                (answer,) = await self._evalsha([call if head is None else head + call])
        except FAILURES as exc:
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

    async def _send_batch(self, batch: list[tuple[Call | None, Call, asyncio.Future[list[int]]]]) -> None:
        calls: list[Call] = []
        waiting: list[tuple[bool, list[asyncio.Future[list[int]]]]] = []  # per call: takes?, and who waits
        takes: dict[Call, list[tuple[Call, asyncio.Future[list[int]]]]] = {}
        for head, call, future in batch:
            if head is None:
                calls.append(call)
                waiting.append((False, [future]))
            else:
                takes.setdefault(head, []).append((call, future))
        for head, queued in takes.items():
            calls.append(head + tuple(arg for call, _ in queued for arg in call))
            waiting.append((True, [future for _, future in queued]))
        answers: list[Any]
        error: BaseException | None
        try:
            async with asyncio.timeout(self._timeout):
                answers = await self._evalsha(calls)
        except FAILURES as exc:
            answers, error = [exc] * len(calls), exc
        else:
            error = next((answer for answer in answers if isinstance(answer, BaseException)), None)
        self._on_answer(error)  # first, so the callers resume in the state it leads to
        for (take, futures), answer in zip(waiting, answers, strict=True):
            _settle(take, futures, answer)

    async def _evalsha(self, calls: list[Call]) -> list[Any]:
        """The script by its SHA, loaded once; when Redis does not know it (a restart, a failover, SCRIPT FLUSH),
        loaded again and the calls it refused sent again (a NOSCRIPT ran nothing). Errors in their places."""
        answers = await self._pipeline(calls)
        unknown = [i for i, answer in enumerate(answers) if isinstance(answer, NoScriptError)]
        if unknown:
            await self.load()
            for i, answer in zip(unknown, await self._pipeline([calls[i] for i in unknown]), strict=True):
                answers[i] = answer
        return answers

    async def _pipeline(self, calls: list[Call]) -> list[Any]:
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
