"""What the forwarder writes an answer to: the client side of one exchange, seen as a protocol.

The real one is ``proxy.http.response.Response``, which the listener makes for each request it serves. Keeping
the forwarder to this narrow surface means the forwarder never imports the listener (no cycle), and an
``Exchange`` can be tested with a recording fake.

What serves a request (``Serve``) answers at once (returns None), or returns the request's ``InFlight`` handle and
later calls ``served``: by callbacks on the common path, or from a task (``in_task``) where it must wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Protocol

from proxy.http.wire import Headers
from proxy.upstream.connection import UpstreamConnection

if TYPE_CHECKING:
    from proxy.http.request import Request
    from proxy.runtime import UpstreamRuntime

log = logging.getLogger("seawall.listener")


class ResponseSink(Protocol):
    http11: bool  # the client speaks HTTP/1.1: chunked framing is available
    keep_alive: bool  # the connection stays open after this answer unless the answer says otherwise
    log_requests: bool

    def send_continue(self) -> None:
        """``100 Continue``, for a client waiting to send its body."""

    def send_raw(self, answer: bytes) -> None:
        """A whole answer the sidecar made, already encoded (``proxy.http.answers``)."""

    def respond_whole(
        self, head: bytes, chunks: list[bytes], chunked: bool, keep_alive: bool, trailers: Headers | None = None
    ) -> None:
        """An upstream answer already complete: head and body (and, chunked, its trailers) in one write."""

    def start_response(self, head: bytes, chunked: bool, keep_alive: bool, upstream: UpstreamConnection) -> None:
        """The head of a streamed answer; ``upstream`` is paused while the client cannot keep up."""

    def switch_protocols(self) -> tuple[asyncio.Transport, asyncio.BaseProtocol, list[bytes]] | None:
        """A 101 to an upgrade request: the client's transport for the relay to take over, the protocol that
        still hears of its end, and the bytes the client sent past its request head; None if the client is gone."""

    def write_body(self, data: bytes) -> None:
        """One body chunk of a streamed answer."""

    def end_response(self, trailers: Headers | None = None) -> None:
        """The streamed answer is complete; a chunked one ends with the upstream's relayable trailers."""

    def abort(self) -> None:
        """Cut the answer short: the client sees a truncated body, never a second status line."""

    def internal_error(self) -> None:
        """Serving the request raised: answer 500 if nothing of an answer went out yet, else cut it short."""

    def served(self) -> None:
        """The exchange is over (answered, or given up): the connection may take the next request."""


class InFlight(Protocol):
    """A request being served: the listener cancels it when its client goes away."""

    def cancel(self) -> object: ...


# What serves one request: ``forward`` in the sidecar; ``refuse_http1`` on a gRPC listener; a test's stand-in.
Serve = Callable[["UpstreamRuntime", "Request", ResponseSink], InFlight | None]


def in_task(serving: Coroutine[None, None, None], client: ResponseSink) -> asyncio.Task[None]:
    """Serve ``req`` in a task, for an exchange that has to wait (a connect, a body, a backoff, a queue): it tells
    ``client`` when it is over, and turns an exception into ``internal_error``. Cancelling the task (the client
    went away) drops whatever the exchange holds upstream at once."""
    return asyncio.get_running_loop().create_task(_guarded(serving, client))


async def _guarded(serving: Coroutine[None, None, None], client: ResponseSink) -> None:
    try:
        await serving
    except asyncio.CancelledError:
        pass  # the client went away; the exchange has dropped its upstream attempt
    except Exception:
        serving_failed(client)
    finally:
        client.served()


def serving_failed(client: ResponseSink) -> None:
    """Inside an ``except``: serving the request raised (a bug): logged, and answered ``internal_error``."""
    log.exception("forwarding failed")
    client.internal_error()
