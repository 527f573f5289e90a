"""What can go wrong talking to an upstream, written down once.

::

    UpstreamError                 an attempt failed; counts against the breaker
    ├── ConnectFailed             no connection: refused, unreachable, DNS, or connect timeout   → connect_error 502
    │   └── TlsFailed             the TLS handshake failed or the certificate did not verify      → tls_error 502
    ├── UpstreamTimedOut          no response head within per_try, a body stalled, or total ran out → timeout 504
    ├── ConnectionReset           the connection was lost before the response completed          → reset 502
    └── BadResponse               the upstream spoke broken HTTP (bad framing, CR/NUL in a header) → bad_response 502

Apart from these, ``OutOfResources``: the sidecar itself ran out of file descriptors, buffers or memory while
connecting. It is never the upstream's fault: answered 503 ``overload`` and never counted against the breaker.

``map_connect_error`` is the one place where exceptions from opening a connection become these; once
connected, ``proxy.upstream.connection`` raises them itself. Each names its ``FailureKind`` (what the breaker,
outlier detection and ``retry_on`` go by) and its ``reason`` (``x-sidecar-reason`` and the ``kind`` label of
``sidecar_upstream_failures_total``): the same word but for ``TlsFailed``, a connect failure whose reason is
``tls_error`` so that a bad certificate can be told from a refused connection.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
from typing import ClassVar

from proxy.resilience.failures import FailureKind


class UpstreamError(Exception):
    kind: ClassVar[FailureKind]  # every subclass names its own
    reason: ClassVar[str]  # x-sidecar-reason: the kind's name unless a subclass says otherwise
    status: ClassVar[int] = 502

    def __init__(self, message: str, *, sent_nothing: bool = False) -> None:
        super().__init__(message)
        # True when not one byte of the request can have reached the upstream: replay is always safe.
        self.sent_nothing = sent_nothing


class ConnectFailed(UpstreamError):
    kind = FailureKind.CONNECT_ERROR
    reason = FailureKind.CONNECT_ERROR.value
    status = 502


class TlsFailed(ConnectFailed):
    """A connect failure (for the breaker, outlier detection and retry_on) answered as ``tls_error``."""

    reason = "tls_error"


TLS_ERROR = TlsFailed.reason


def tls_detail(exc: ssl.SSLError) -> str:
    """What went wrong, in OpenSSL's words: "certificate verify failed: certificate has expired", ..."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    reason = exc.reason or exc.strerror or str(exc)
    return str(reason).replace("_", " ").lower() if exc.reason else str(reason)


def tls_failure(exc: OSError, target: str) -> TlsFailed:
    """An error of the TLS handshake (the TCP connection was open) as the failure it is."""
    if isinstance(exc, ssl.SSLError):
        return TlsFailed(f"TLS to {target} failed: {tls_detail(exc)}", sent_nothing=True)
    detail = exc.strerror or type(exc).__name__
    return TlsFailed(f"TLS to {target} failed: the connection was lost in the handshake ({detail})", sent_nothing=True)


class UpstreamTimedOut(UpstreamError):
    kind = FailureKind.TIMEOUT
    reason = FailureKind.TIMEOUT.value
    status = 504


class ConnectionReset(UpstreamError):
    kind = FailureKind.RESET
    reason = FailureKind.RESET.value
    status = 502


class BadResponse(UpstreamError):
    kind = FailureKind.BAD_RESPONSE
    reason = FailureKind.BAD_RESPONSE.value
    status = 502


class OutOfResources(Exception):
    """This process (or host) is out of descriptors, socket buffers or memory: ours to fix, not the upstream's."""


LOCAL_EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def map_connect_error(exc: BaseException, target: str) -> UpstreamError:
    """Errors from ``loop.create_connection`` (and its timeout) as the hierarchy above.

    Raises ``OutOfResources`` instead when the error is the sidecar's own exhaustion."""
    if isinstance(exc, OSError) and exc.errno in LOCAL_EXHAUSTION:
        raise OutOfResources(f"connect to {target}: {exc.strerror or exc}") from exc
    if isinstance(exc, ssl.SSLError):
        return TlsFailed(f"TLS to {target} failed: {tls_detail(exc)}", sent_nothing=True)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return ConnectFailed(f"connect to {target} timed out", sent_nothing=True)
    if isinstance(exc, OSError):
        return ConnectFailed(f"connect to {target} failed: {exc.strerror or exc}", sent_nothing=True)
    return ConnectFailed(f"connect to {target} failed: {exc!r}", sent_nothing=True)
