"""HTTP/2 on a ``protocol: grpc`` upstream's listener: the connection the listener hands over, one call per stream.

The listener (``proxy.http.listener``) serves HTTP/1.1 until a connection opens with HTTP/2's preface; then it
hands the transport and the bytes read so far to ``Http2Listener.handoff``, which serves it as an HTTP/2 server
endpoint (``proxy.h2.engine``, with the abuse limits of ``AbuseLimits``). Each client stream becomes a
``GrpcCall`` task; a stream the client resets cancels its task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.grpc.call import GrpcCall
from proxy.h2.engine import H2Endpoint, H2Stream
from proxy.h2.limits import AbuseLimits
from proxy.http.answers import OwnAnswer, count, encode, log_answer

if TYPE_CHECKING:
    from proxy.http.request import Request
    from proxy.http.sink import ResponseSink
    from proxy.runtime import UpstreamRuntime
    from proxy.sockets import Drainable

log = logging.getLogger("seawall.grpc")


class Http2Connection:
    """One client's HTTP/2 connection, as the draining server sees it (``Drainable``)."""

    __slots__ = ("calls", "connections", "endpoint")

    def __init__(self, endpoint: H2Endpoint, connections: set[Drainable]) -> None:
        self.endpoint = endpoint
        self.connections = connections
        self.calls: set[asyncio.Task[None]] = set()

    def shutdown_when_idle(self) -> None:
        self.endpoint.close()  # GOAWAY: calls in flight finish, no new ones start

    def close(self) -> None:
        for task in list(self.calls):
            task.cancel()
        self.endpoint.abort()


class Http2Listener:
    """Serves the HTTP/2 connections of one listener (the ``http2`` handoff of its ``ClientConnection``s)."""

    def __init__(self, get_runtime: Callable[[], UpstreamRuntime], log_requests: bool, limits: AbuseLimits) -> None:
        self.get_runtime = get_runtime
        self.log_requests = log_requests
        self.limits = limits

    def _ended(self, conn: Http2Connection) -> None:
        conn.connections.discard(conn)
        abuse = self.get_runtime().stats.h2_abuse
        for kind, times in conn.endpoint.abuse.items():
            abuse[kind] = abuse.get(kind, 0) + times

    def handoff(self, transport: asyncio.Transport, received: bytes, connections: set[Drainable]) -> None:
        loop = asyncio.get_running_loop()
        conn: Http2Connection

        def on_stream(stream: H2Stream) -> None:
            rt = self.get_runtime()
            if rt.policy.protocol != "grpc":  # reloaded to another protocol while this connection drains
                stream.reset(7)  # REFUSED_STREAM: never processed, the client may retry it elsewhere
                return
            call = GrpcCall(rt, stream, self.log_requests)
            task = loop.create_task(call.run())
            conn.calls.add(task)
            task.add_done_callback(conn.calls.discard)
            # The stream closes when the call is done with it, or when the client resets it (its deadline, a
            # cancel): then the call is cancelled and lets go of its upstream stream.
            stream.closed.add_done_callback(lambda _: task.cancel() if stream.error is not None else None)

        endpoint = H2Endpoint.server(on_stream, self.limits)
        conn = Http2Connection(endpoint, connections)
        connections.add(conn)
        endpoint.lost.add_done_callback(lambda _: self._ended(conn))
        transport.set_protocol(endpoint)
        endpoint.connection_made(transport)
        endpoint.data_received(received)


HTTP2_REQUIRED = OwnAnswer(
    505,
    "http2_required",
    "this listener forwards gRPC (HTTP/2) only: call it with a gRPC client, or HTTP/2 with prior knowledge",
    "http2_required",
    rejected="http2_required",
)


def refuse_http1(rt: UpstreamRuntime, req: Request, client: ResponseSink) -> None:
    """What serves an HTTP/1.1 request on a gRPC upstream's listener: a 505 of the sidecar's own, at once. Its
    target speaks HTTP/2 only, so forwarding would only fail there — and count against the breaker of a healthy
    service."""
    client.send_raw(encode(HTTP2_REQUIRED, rt.name, client.keep_alive, client.http11))
    count(rt.stats, HTTP2_REQUIRED, 0.0)
    if client.log_requests:
        log_answer(rt.name, req.method, req.path, None, 505, HTTP2_REQUIRED.reason, 0, 0.0)
