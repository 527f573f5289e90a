"""The body pump without sockets: a real ``RequestBody`` fed by the test, a recording stand-in for the upstream
connection, the event loop's own timers with short bounds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from proxy.http.body import DISCARD_BYTES, RequestBody
from proxy.http.pump import BodyPump
from proxy.resilience.clock import SystemClock
from proxy.upstream.connection import UpstreamConnection


class Upstream:
    """What the pump uses of ``UpstreamConnection``, recorded."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.sent: list[bytes] = []
        self.write_paused = False
        self.closed = False
        self.on_writable: Callable[[], None] | None = None
        self.request_complete = False
        self.stalled_with: str | None = None
        self.aborted = False

    def write_body(self, frames: list[bytes]) -> None:
        self.sent += frames

    def request_sent(self) -> None:
        self.request_complete = True

    def stalled(self, detail: str) -> None:
        self.stalled_with = detail

    def abort(self) -> None:
        self.aborted = self.closed = True

    def resume(self) -> None:
        self.write_paused = False
        if self.on_writable is not None:
            self.on_writable()


class Owner:
    def __init__(self) -> None:
        self.client_time = 0.0
        self.client_fault: str | None = None


def _pump(length: int | None, idle: float = 5.0) -> tuple[BodyPump, RequestBody, Upstream, Owner]:
    body = RequestBody(length, 0, lambda: None, lambda: None, SystemClock())
    upstream, owner = Upstream(), Owner()
    pump = BodyPump(owner, body, cast(UpstreamConnection, upstream), length is None, idle, SystemClock())
    pump.start()
    return pump, body, upstream, owner


async def test_bytes_go_on_as_they_arrive_and_the_last_one_marks_the_request_sent() -> None:
    pump, body, upstream, _ = _pump(None)
    body.feed(b"abc")
    assert upstream.sent == [b"3\r\n", b"abc", b"\r\n"]  # at once, in the caller's turn: no task in between
    upstream.write_paused = True
    body.feed(b"de")
    assert len(upstream.sent) == 3  # held while the upstream's buffer is full
    upstream.resume()
    assert upstream.sent[3:] == [b"2\r\n", b"de", b"\r\n"]
    body.finish()
    assert upstream.sent[-1] == b"0\r\n\r\n"
    assert upstream.request_complete and pump.done and body.on_ready is None and upstream.on_writable is None


async def test_a_silent_client_is_the_clients_fault_and_a_stuck_upstream_the_upstreams() -> None:
    pump, body, upstream, owner = _pump(10, idle=0.05)
    body.feed(b"12345")
    await asyncio.sleep(0.12)
    assert owner.client_fault == "body_timeout" and upstream.aborted and pump.done
    assert upstream.stalled_with is None

    pump, body, upstream, owner = _pump(10, idle=0.05)
    upstream.write_paused = True
    body.feed(b"12345")  # arrives, but the upstream takes nothing
    await asyncio.sleep(0.12)
    assert upstream.stalled_with == "upstream took no request body for 0.05s"
    assert owner.client_fault is None and pump.done


async def test_after_an_early_answer_the_rest_goes_on_while_the_upstream_takes_it() -> None:
    pump, body, upstream, _ = _pump(30)
    body.feed(b"x" * 10)
    settled = pump.settle(keep_upstream=True)
    body.feed(b"y" * 20)
    body.finish()
    assert await settled is True
    assert b"".join(upstream.sent) == b"x" * 10 + b"y" * 20 and upstream.request_complete  # it can be pooled


async def test_after_an_early_answer_an_upstream_that_takes_no_more_is_let_go_and_the_rest_dropped() -> None:
    pump, body, upstream, _ = _pump(30)
    body.feed(b"x" * 10)
    settled = pump.settle(keep_upstream=True)
    upstream.write_paused = True
    body.feed(b"y" * 20)
    assert upstream.aborted and body.discarding
    body.finish()
    assert await settled is True  # the client's connection can carry its next request
    assert b"".join(upstream.sent) == b"x" * 10 and not upstream.request_complete


async def test_after_an_early_answer_a_body_past_the_bound_closes() -> None:
    pump, body, upstream, _ = _pump(None)
    settled = pump.settle(keep_upstream=False)
    assert upstream.aborted
    for _ in range(DISCARD_BYTES // (1 << 20) + 1):
        body.feed(b"z" * (1 << 20))
    assert await settled is False
    assert pump.done
