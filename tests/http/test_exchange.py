"""``Exchange`` against a real upstream socket, writing to a recording ``ResponseSink`` instead of a client.

The forwarder only knows the sink protocol, so one exchange's decisions (what reaches the upstream, what the
client is handed, what the breaker hears) can be checked without a listener or a client connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from proxy.http.forwarder import forward as start_forwarding
from proxy.http.request import Request, mark_upgrade, validate_head
from proxy.http.wire import Headers
from proxy.policy.loader import load_text
from proxy.resilience.breaker import Override, State
from proxy.resilience.clock import SystemClock
from proxy.runtime import UpstreamRuntime
from proxy.upstream.connection import UpstreamConnection
from tests.support.eventually import eventually
from tests.support.sidecar import free_port


@dataclass
class RecordingSink:
    """Every call the forwarder makes, in order, and the bytes a client would have received."""

    http11: bool = True
    keep_alive: bool = True
    log_requests: bool = False
    calls: list[str] = field(default_factory=list)
    out: bytearray = field(default_factory=bytearray)
    over: asyncio.Event = field(default_factory=asyncio.Event)

    def send_continue(self) -> None:
        self.calls.append("continue")

    def send_raw(self, answer: bytes) -> None:
        self.calls.append("raw")
        self.out += answer

    def respond_whole(
        self, head: bytes, chunks: list[bytes], chunked: bool, keep_alive: bool, trailers: Headers | None = None
    ) -> None:
        self.calls.append("whole")
        self.out += head + b"".join(chunks)

    def start_response(self, head: bytes, chunked: bool, keep_alive: bool, upstream: UpstreamConnection) -> None:
        self.calls.append("start")
        self.out += head

    def switch_protocols(self) -> tuple[asyncio.Transport, asyncio.BaseProtocol, list[bytes]] | None:
        self.calls.append("switch")
        return None

    def write_body(self, data: bytes) -> None:
        self.out += data

    def end_response(self, trailers: Headers | None = None) -> None:
        self.calls.append("end")

    def abort(self) -> None:
        self.calls.append("abort")

    def internal_error(self) -> None:
        self.calls.append("internal_error")

    def served(self) -> None:
        self.over.set()  # not a call that writes anything: kept out of ``calls``


async def forward(rt: UpstreamRuntime, req: Request, sink: RecordingSink) -> None:
    """Serve one request as the listener does, and wait until the exchange says it is over (at once, if it was
    answered at once: then it does not call ``served``)."""
    in_flight = start_forwarding(rt, req, sink)
    if in_flight is None:
        return
    try:
        await sink.over.wait()
    except asyncio.CancelledError:
        in_flight.cancel()
        raise


@dataclass
class CannedUpstream:
    """Answers each request head with the next canned answer (the last one repeats); records the heads."""

    answers: list[bytes]
    heads: list[bytes] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                writer.write(self.answers[min(len(self.heads), len(self.answers)) - 1])
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def answer(status: int, body: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n\r\n%b" % (status, len(body), body)


POLICY = """\
upstreams:
  api:
    listen: 127.0.0.1:{listen}
    targets: [http://127.0.0.1:{port}]
    retry: {{max_retries: 2, base_delay: 0s, max_delay: 0s, jitter: false, budget: null}}
    breaker: {{failure_threshold: 5}}
"""


def runtime(port: int) -> UpstreamRuntime:
    config, issues = load_text(POLICY.format(listen=free_port(), port=port))
    assert config is not None, issues
    return UpstreamRuntime(config.upstreams[0], SystemClock())


@pytest.fixture
async def upstream(request: pytest.FixtureRequest) -> AsyncIterator[CannedUpstream]:
    canned = CannedUpstream(list(request.param))
    server = await asyncio.start_server(canned.handle, "127.0.0.1", 0)
    canned.port = server.sockets[0].getsockname()[1]
    yield canned
    server.close()
    await server.wait_closed()


def get(path: bytes = b"/a") -> Request:
    return validate_head(b"GET", path, [(b"Host", b"svc"), (b"X-Forwarded-For", b"10.0.0.1")], True, True, b"127.0.0.9")


@pytest.mark.parametrize("upstream", [[answer(200, b"hello")]], indirect=True)
async def test_an_answer_already_complete_goes_to_the_sink_in_one_write(upstream: CannedUpstream) -> None:
    rt, sink = runtime(upstream.port), RecordingSink()
    await forward(rt, get(), sink)
    assert sink.calls == ["whole"]
    assert sink.out.startswith(b"HTTP/1.1 200 X\r\n") and sink.out.endswith(b"\r\n\r\nhello")
    (head,) = upstream.heads
    assert head.startswith(b"GET /a HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n" % upstream.port)
    assert b"x-forwarded-for: 10.0.0.1, 127.0.0.9\r\n" in head
    assert rt.breaker.snapshot(rt.clock.monotonic()).total_successes == 1


@pytest.mark.parametrize("upstream", [[answer(503), answer(503), answer(200, b"ok")]], indirect=True)
async def test_a_retried_5xx_ends_with_the_good_answer_and_says_how_many_attempts(upstream: CannedUpstream) -> None:
    rt, sink = runtime(upstream.port), RecordingSink()
    await forward(rt, get(), sink)
    assert len(upstream.heads) == 3
    assert sink.calls == ["whole"]
    assert b"x-sidecar-attempts: 3\r\n" in sink.out and sink.out.endswith(b"ok")
    snap = rt.breaker.snapshot(rt.clock.monotonic())
    assert (snap.total_failures, snap.total_successes) == (2, 1)
    assert rt.stats.retries == 2


@pytest.mark.parametrize("upstream", [[answer(200)]], indirect=True)
async def test_an_open_breaker_answers_from_the_sidecar_and_sends_nothing_upstream(upstream: CannedUpstream) -> None:
    rt, sink = runtime(upstream.port), RecordingSink()
    rt.breaker.set_override(Override.FORCE_OPEN, rt.clock.monotonic())
    await forward(rt, get(), sink)
    assert sink.calls == ["raw"]
    assert sink.out.startswith(b"HTTP/1.1 503 ") and b"x-sidecar-reason: breaker_open\r\n" in sink.out
    assert upstream.heads == []


async def test_a_refused_connection_is_answered_502_connect_error_by_the_sidecar() -> None:
    rt, sink = runtime(free_port()), RecordingSink()  # nothing listens there
    await forward(rt, get(), sink)
    assert sink.calls == ["raw"]  # the sidecar's own answer (proxy.http.answers), whole
    assert sink.out.startswith(b"HTTP/1.1 502 ")
    assert b"x-sidecar-reason: connect_error\r\n" in sink.out and b"x-sidecar-attempts: 3\r\n" in sink.out
    assert rt.breaker.snapshot(rt.clock.monotonic()).state is State.CLOSED  # 3 failures < threshold 5


POLICY_BACKOFF = POLICY.replace("base_delay: 0s, max_delay: 0s", "base_delay: 300ms, max_delay: 300ms")


@pytest.mark.parametrize("upstream", [[answer(503, b"busy")]], indirect=True)
async def test_a_breaker_opening_during_the_backoff_after_a_5xx_answers_breaker_open(upstream: CannedUpstream) -> None:
    config, issues = load_text(POLICY_BACKOFF.format(listen=free_port(), port=upstream.port))
    assert config is not None, issues
    rt, sink = UpstreamRuntime(config.upstreams[0], SystemClock()), RecordingSink()
    task = asyncio.create_task(forward(rt, get(), sink))
    await eventually(lambda: upstream.heads, what="the first 503, before the backoff ends")
    rt.breaker.set_override(Override.FORCE_OPEN, rt.clock.monotonic())
    await asyncio.wait_for(task, 5)
    assert len(upstream.heads) == 1
    assert sink.calls == ["raw"]
    assert sink.out.startswith(b"HTTP/1.1 503 ") and b"x-sidecar-reason: breaker_open\r\n" in sink.out


SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


@pytest.mark.parametrize("upstream", [[answer(503), SWITCHING]], indirect=True)
async def test_an_upgrade_is_retried_on_a_5xx_and_its_101_is_a_success_never_pooled(upstream: CannedUpstream) -> None:
    rt, sink = runtime(upstream.port), RecordingSink()
    req = validate_head(
        b"GET", b"/ws", [(b"Host", b"svc"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")], True, True, b"1"
    )
    assert mark_upgrade(req)
    await forward(rt, req, sink)
    assert sink.calls == ["switch"]  # the recording sink is a client already gone: nothing is relayed
    assert len(upstream.heads) == 2
    for head in upstream.heads:
        assert b"\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n" in head
    snapshot = rt.breaker.snapshot(rt.clock.monotonic())
    assert (snapshot.total_failures, snapshot.total_successes) == (1, 1)
    assert rt.stats.requests == {101: 1} and rt.stats.retries == 1 and rt.stats.upgraded == 0
    assert rt.balancer.connection_counts()[0] == 0, "an upgrade request's connection is never pooled"
