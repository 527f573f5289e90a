"""The real forwarder between the listener and a pooled upstream connection, both on fake transports, time on a
``ManualClock``: the common request runs on callbacks end to end (no task, no future, no timer of its own), and
whatever must wait leaves that path for a task at the right step, with nothing held when the client goes away."""

from __future__ import annotations

import asyncio
from typing import cast

from proxy.http.listener import ClientConnection
from proxy.policy.loader import load_text
from proxy.resilience.breaker import State
from proxy.resilience.clock import ManualClock
from proxy.runtime import UpstreamRuntime
from proxy.sockets import Drainable
from proxy.upstream.connection import UpstreamConnection
from tests.protocols.fakes import FakeTransport


def policy(timeouts: str, retry: str) -> str:
    return (
        "upstreams:\n  api:\n    listen: 127.0.0.1:18080\n    targets: [http://127.0.0.1:18081]\n"
        f"    timeouts: {{{timeouts}}}\n    retry: {{{retry}}}\n"
    )


POLICY = policy("per_try: 5s, total: 15s", "max_retries: 2, base_delay: 100ms, jitter: false, retry_on: [503]")
GET = b"GET /a HTTP/1.1\r\nHost: api\r\n\r\n"


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


class Stack:
    """A client connection of the sidecar and the pooled upstream connection its requests go out on."""

    def __init__(self, policy: str = POLICY) -> None:
        config, issues = load_text(policy)
        assert config is not None, issues
        self.clock = ManualClock()
        self.rt = UpstreamRuntime(config.upstreams[0], self.clock)
        self.client_side, self.upstream_side = FakeTransport(), FakeTransport()
        self.client = ClientConnection(lambda: self.rt, config.http, set[Drainable](), False, self.clock)
        self.client_side.set_protocol(self.client)
        self.client.connection_made(cast(asyncio.Transport, self.client_side))
        self.pool = self.rt.balancer.states[0].pool
        self.upstream = UpstreamConnection(self.pool, clock=self.clock)
        self.upstream_side.set_protocol(self.upstream)
        self.upstream.connection_made(cast(asyncio.Transport, self.upstream_side))
        self.pool.release(self.upstream)

    def sent_upstream(self) -> bytes:
        out = bytes(self.upstream_side.written)
        self.upstream_side.written.clear()
        return out

    def answered(self) -> bytes:
        out = bytes(self.client_side.written)
        self.client_side.written.clear()
        self.client_side.client_reads()
        return out


async def test_a_hundred_requests_on_a_pooled_connection_create_no_task_and_no_timer_each() -> None:
    stack = Stack()
    tasks, timers = len(asyncio.all_tasks()), stack.clock.pending_timers
    for i in range(100):
        stack.client.data_received(GET)
        assert stack.sent_upstream().startswith(b"GET /a HTTP/1.1\r\nhost: 127.0.0.1:18081\r\n")
        stack.upstream.data_received(ok(b"%d" % i))  # the answer goes out from inside this call
        assert stack.answered() == ok(b"%d" % i)
        assert len(asyncio.all_tasks()) == tasks
    assert stack.clock.pending_timers <= timers + 1  # the upstream connection's one lazy timer, armed once
    assert stack.rt.bulkhead.stats.inflight == 0 and stack.rt.stats.requests == {200: 100}
    assert stack.pool.take_idle() is stack.upstream  # pooled again after every answer


async def test_a_retried_503_leaves_the_callback_path_for_a_task_and_ends_with_the_good_answer() -> None:
    stack = Stack()
    stack.client.data_received(GET)
    stack.sent_upstream()
    stack.upstream.data_received(b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\n\r\n")
    assert stack.answered() == b"", "a failed answer is not delivered while a retry may follow"
    await asyncio.sleep(0)  # the task takes over: backoff on the clock, nothing sent yet
    assert stack.sent_upstream() == b"" and stack.clock.slept == [0.1]
    stack.clock.advance(0.1)
    for _ in range(5):
        await asyncio.sleep(0)
    assert stack.sent_upstream().startswith(b"GET /a "), "the retry reuses the pooled connection"
    stack.upstream.data_received(ok(b"fine"))
    for _ in range(5):
        await asyncio.sleep(0)
    answer = stack.answered()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"x-sidecar-attempts: 2\r\n" in answer
    assert stack.rt.bulkhead.stats.inflight == 0 and stack.rt.stats.retries == 1


async def test_a_streamed_answer_goes_on_in_a_task_and_the_next_request_waits_for_it() -> None:
    stack = Stack()
    stack.client.data_received(GET + GET)  # pipelined: the second waits for the first answer's end
    stack.sent_upstream()
    stack.upstream.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234")
    await asyncio.sleep(0)
    assert stack.answered() == b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234"
    assert stack.sent_upstream() == b"", "the second request is not sent before the first answer ends"
    stack.upstream.data_received(b"56789")
    assert stack.answered() == b"56789"
    for _ in range(5):
        await asyncio.sleep(0)
    assert stack.sent_upstream().startswith(b"GET /a "), "then the second goes out, on the same connection"
    stack.upstream.data_received(ok(b"2nd"))
    assert stack.answered() == ok(b"2nd")


async def test_a_client_gone_while_its_answer_is_awaited_gives_back_slot_and_permit_and_drops_the_upstream() -> None:
    stack = Stack()
    stack.client.data_received(GET)
    stack.sent_upstream()
    assert stack.rt.bulkhead.stats.inflight == 1
    stack.client.connection_lost(None)
    assert stack.upstream_side.aborted, "a request half answered cannot be followed on that connection"
    assert stack.rt.bulkhead.stats.inflight == 0 and stack.rt.balancer.states[0].outstanding == 0
    await asyncio.sleep(0)
    snapshot = stack.rt.breaker.snapshot(stack.clock.monotonic())
    assert snapshot.state is State.CLOSED and snapshot.total_failures == 0 and snapshot.total_successes == 0


async def test_no_response_head_within_per_try_is_a_timeout_answered_504_on_the_clock() -> None:
    stack = Stack()
    stack.client.data_received(GET)
    stack.sent_upstream()
    stack.clock.advance(5.0)  # per_try: the connection's lazy timer fails the exchange; 504 is not retried here
    for _ in range(5):
        await asyncio.sleep(0)
    answer = stack.answered()
    assert answer.startswith(b"HTTP/1.1 504 ") and b"x-sidecar-reason: timeout" in answer
    assert stack.rt.bulkhead.stats.inflight == 0


RETRY_ON_TIMEOUT = policy(
    "per_try: 2s, total: 3s", "max_retries: 3, base_delay: 100ms, jitter: false, retry_on: [timeout]"
)


async def spin() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_per_try_times_out_each_attempt_and_total_cuts_the_retry_short_exactly_on_the_clock() -> None:
    stack = Stack(RETRY_ON_TIMEOUT)
    stack.client.data_received(GET)
    assert stack.sent_upstream().startswith(b"GET /a ")
    stack.clock.advance(2.0 - 0.001)
    await spin()
    assert not stack.upstream_side.aborted, "per_try has not run out yet"
    stack.clock.advance(0.001)  # per_try: the first attempt times out, a retry follows after 100 ms of backoff
    await spin()
    assert stack.upstream_side.aborted and stack.answered() == b""
    assert stack.clock.slept == [0.1]
    fresh = FakeTransport()  # the retry needs a new connection: hand the pool one, as a connect would have
    retry_conn = UpstreamConnection(stack.pool, clock=stack.clock)
    fresh.set_protocol(retry_conn)
    retry_conn.connection_made(cast(asyncio.Transport, fresh))
    stack.pool.release(retry_conn)
    stack.clock.advance(0.1)
    await spin()
    assert bytes(fresh.written).startswith(b"GET /a "), "the retry went out at 2.1 s"
    # What is left of total (3 s) bounds the retry's wait for its head: 0.9 s, not another per_try of 2 s.
    stack.clock.advance(0.9 - 0.001)
    await spin()
    assert stack.answered() == b"" and not fresh.aborted
    stack.clock.advance(0.001)
    await spin()
    answer = stack.answered()
    assert answer.startswith(b"HTTP/1.1 504 ") and b"x-sidecar-reason: timeout" in answer, answer
    assert b"x-sidecar-attempts: 2" in answer and fresh.aborted
    assert stack.rt.bulkhead.stats.inflight == 0 and stack.rt.stats.failures == {"timeout": 2}


POST = b"POST /orders HTTP/1.1\r\nHost: api\r\nContent-Length: 11\r\n\r\n"


async def test_a_small_post_whose_body_comes_with_its_head_runs_on_callbacks_too() -> None:
    stack = Stack()
    tasks = len(asyncio.all_tasks())
    for _ in range(20):
        stack.client.data_received(POST + b'{"qty": 10}')
        sent = stack.sent_upstream()
        assert sent.startswith(b"POST /orders HTTP/1.1\r\n") and sent.endswith(b'content-length: 11\r\n\r\n{"qty": 10}')
        stack.upstream.data_received(ok(b"filled"))
        assert stack.answered() == ok(b"filled")
        assert len(asyncio.all_tasks()) == tasks
    assert stack.rt.bulkhead.stats.inflight == 0


async def test_a_small_body_split_across_reads_is_served_once_all_of_it_is_in_and_sent_whole() -> None:
    stack = Stack()
    stack.client.data_received(POST + b'{"qty"')  # the rest comes later: served in a task meanwhile
    await spin()
    assert stack.sent_upstream() == b"", "nothing is sent before the small body is whole (it may be replayed)"
    stack.client.data_received(b": 10}")
    await spin()
    assert stack.sent_upstream().endswith(b'content-length: 11\r\n\r\n{"qty": 10}')
    stack.upstream.data_received(ok(b"filled"))
    await spin()
    assert stack.answered() == ok(b"filled")
