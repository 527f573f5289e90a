"""gRPC outcomes, pure: what the end of one upstream stream tells the breaker, the metrics and the retry decision.

The table (issue 21), each row configurable through an upstream's ``grpc:`` block (``GrpcRules``):

    upstream outcome                              breaker              retried (before anything reached the client)
    grpc-status 0                                 success              -
    14 UNAVAILABLE                                failure              yes
    4 DEADLINE_EXCEEDED                           failure              opt-in, within the caller's deadline
    13 INTERNAL, 2 UNKNOWN, 15 DATA_LOSS          failure              13 opt-in
    8 RESOURCE_EXHAUSTED                          success (no failure) opt-in, honouring grpc-retry-pushback-ms
    other codes                                   success (no failure) no
    reset / connection lost without grpc-status   failure              only if never processed (REFUSED_STREAM,
                                                                       or above GOAWAY's last stream id)
    the client's own RST_STREAM                   ignored              -

A response without ``grpc-status`` but with an HTTP ``:status`` other than 200 is read with gRPC's HTTP-to-gRPC
table (``status_from_http``); one with 200 and no ``grpc-status`` is UNKNOWN.

``classify`` turns a stream's end into a ``GrpcOutcome``. Whether to try again, and when, is *not* decided a
second time here: ``GrpcRules.retry_rules`` is a ``RetryRules`` whose statuses are gRPC codes and whose only
method is POST (every gRPC call is one), so the exchange asks ``decide_retry`` as the HTTP forwarder does::

    outcome = classify(rules, grpc_status=status, http_status=head_status, end=end)
    runtime.settle(permit, target, Outcome(outcome.verdict.value), now, duration, outcome.kind or "", outcome.label)
    if not response_started:   # a status after headers or DATA went to the client: never retried
        decision = decide_retry(
            rules.retry_rules(retry.max_retries),
            attempts=attempts, method=GRPC_METHOD, kind=outcome.retry_kind, status=outcome.status,
            body_replayable=replayable, backoff=delays,
            retry_after=parse_pushback(trailers.get(b"grpc-retry-pushback-ms")),  # inf: the server said no
            max_delay=retry.max_delay, now=now, deadline=rules.attempts_deadline(started, total, caller_deadline),
            budget_allows=..., breaker_retry_in=..., breaker_enforced=...,
        )

A refused stream is retried as a ``connect_error`` is (``retry_kind``): the request reached no handler. A stream
lost after the upstream took it is a ``reset``, which gRPC rules never retry: it may have been processed.
DEADLINE_EXCEEDED is retried only within the caller's deadline because ``deadline`` above is the sooner of
``timeouts.total`` and the caller's own ``grpc-timeout`` (``attempts_deadline``).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Final

from proxy.resilience.failures import FailureKind
from proxy.resilience.retry import RetryRules


class GrpcStatus(enum.IntEnum):
    """gRPC's status codes (grpc/doc/statuscodes.md). A policy writes them lower-case: ``deadline_exceeded``."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @property
    def word(self) -> str:
        """How a policy file writes it (and the failures metric labels it): ``unavailable``."""
        return self.name.lower()


GRPC_METHOD: Final = "POST"  # every gRPC call is a POST; the only method ``retry_rules`` allows

# Which statuses a policy may ask to retry, and why the others may not: a status outside this table says the
# server looked at the call, and repeating it is either pointless or unsafe.
RETRYABLE: Final = frozenset(
    {GrpcStatus.UNAVAILABLE, GrpcStatus.DEADLINE_EXCEEDED, GrpcStatus.INTERNAL, GrpcStatus.RESOURCE_EXHAUSTED}
)
NOT_RETRYABLE_WHY: Final = {
    GrpcStatus.OK: "ok is a success",
    GrpcStatus.CANCELLED: "cancelled is the caller's own decision",
    GrpcStatus.UNKNOWN: "unknown says nothing of whether the server applied the call: a retry may apply it twice",
    GrpcStatus.DATA_LOSS: "data_loss is unrecoverable: a retry may apply the call twice",
    GrpcStatus.ABORTED: "aborted asks the application to retry at a higher level (a whole transaction)",
}
DEFAULT_RETRY_ON: Final = (GrpcStatus.UNAVAILABLE,)
DEFAULT_FAILURE_ON: Final = (
    GrpcStatus.UNAVAILABLE,
    GrpcStatus.DEADLINE_EXCEEDED,
    GrpcStatus.INTERNAL,
    GrpcStatus.UNKNOWN,
    GrpcStatus.DATA_LOSS,
)


def why_not_retryable(status: GrpcStatus) -> str | None:
    """None when a policy may list ``status`` in ``grpc.retry_on``; else the reason it may not."""
    if status in RETRYABLE:
        return None
    return NOT_RETRYABLE_WHY.get(status, f"{status.word} is the server's answer about this call, not a passing fault")


class StreamEnd(enum.Enum):
    """How an upstream stream ended, as the HTTP/2 layer saw it."""

    COMPLETE = "complete"  # END_STREAM from the upstream (with trailers, or trailers-only)
    REFUSED = "refused"  # RST_STREAM REFUSED_STREAM, or a GOAWAY whose last stream id is below it: never processed
    LOST = "lost"  # any other RST_STREAM from the upstream, or the connection lost, before a grpc-status
    CLIENT_CANCELLED = "client_cancelled"  # the client's own RST_STREAM (its deadline or cancel), passed on


class Verdict(enum.StrEnum):
    """What the stream tells the breaker: the values of ``proxy.runtime.Outcome``, one layer down."""

    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"


@dataclass(frozen=True, slots=True)
class GrpcOutcome:
    """One upstream stream's end, classified.

    ``status`` is the call's status as the caller would see it (UNAVAILABLE for a lost or refused stream,
    CANCELLED for the client's own). ``kind`` is set when the sidecar detected the failure itself (``reset``):
    ``x-sidecar-reason`` and the kind ``UpstreamRuntime.settle`` is given. ``label`` names a failure in the
    failures metric: the status word (``unavailable``), ``reset`` or ``refused_stream`` (bounded: ≤ 18 values).
    ``retry_kind`` and ``status`` are what ``decide_retry`` is asked with; ``retryable`` is its outcome check's
    answer (``GrpcRules.retry_rules``), given here for logs and tests.
    """

    verdict: Verdict
    status: GrpcStatus
    retryable: bool
    kind: FailureKind | None = None
    retry_kind: FailureKind | None = None
    label: str | None = None


@dataclass(frozen=True, slots=True)
class GrpcRules:
    """An upstream's gRPC semantics (its ``grpc:`` block: ``GrpcPolicy.rules()`` in the policy model)."""

    failure_codes: frozenset[int] = frozenset(DEFAULT_FAILURE_ON)
    retry_codes: frozenset[int] = frozenset(DEFAULT_RETRY_ON)
    timeout_offset: float = 0.0
    max_timeout: float | None = None

    def __post_init__(self) -> None:
        wrong = sorted(set(self.retry_codes) - RETRYABLE)
        if wrong:  # the policy refuses them with a reason; here it would be a programming error
            raise ValueError(f"statuses that may not be retried: {wrong}")

    def retry_rules(self, max_retries: int) -> RetryRules:
        """``decide_retry``'s rules for gRPC: statuses are gRPC codes, the method is POST, and of the sidecar's
        own failure kinds only ``connect_error`` (and a refused stream, classified as one) is retried."""
        return RetryRules(
            max_retries=max_retries,
            retry_on_kinds=frozenset({FailureKind.CONNECT_ERROR}),
            retry_on_statuses=self.retry_codes,
            methods=frozenset({GRPC_METHOD}),
        )

    def caller_deadline(self, now: float, grpc_timeout: float | None) -> float | None:
        """When the caller's deadline falls as the sidecar keeps it: its ``grpc-timeout`` (capped by
        ``max_timeout``) less ``timeout_offset``, from ``now``; None without a ``grpc-timeout``. At or before
        ``now``: answer ``deadline_exceeded`` at once. Each attempt forwards what is left of it."""
        if grpc_timeout is None:
            return None
        if self.max_timeout is not None:
            grpc_timeout = min(grpc_timeout, self.max_timeout)
        return now + grpc_timeout - self.timeout_offset

    @staticmethod
    def attempts_deadline(started: float, total: float, caller_deadline: float | None) -> float:
        """The ``deadline`` for ``decide_retry``: ``timeouts.total`` from the start or the caller's, the sooner."""
        return min(started + total, math.inf if caller_deadline is None else caller_deadline)


# gRPC's HTTP-to-gRPC table (grpc/doc/http-grpc-status-mapping.md), for answers without a grpc-status.
_FROM_HTTP: Final = {
    400: GrpcStatus.INTERNAL,
    401: GrpcStatus.UNAUTHENTICATED,
    403: GrpcStatus.PERMISSION_DENIED,
    404: GrpcStatus.UNIMPLEMENTED,
    429: GrpcStatus.UNAVAILABLE,
    502: GrpcStatus.UNAVAILABLE,
    503: GrpcStatus.UNAVAILABLE,
    504: GrpcStatus.UNAVAILABLE,
}


def status_from_http(http_status: int) -> GrpcStatus:
    """The gRPC status of a response that carried no ``grpc-status``: by its HTTP status, else UNKNOWN."""
    return _FROM_HTTP.get(http_status, GrpcStatus.UNKNOWN)


def as_status(code: int) -> GrpcStatus:
    """A ``grpc-status`` number; one outside 0–16 is UNKNOWN, as gRPC clients read it."""
    return GrpcStatus(code) if 0 <= code <= 16 else GrpcStatus.UNKNOWN


def classify(
    rules: GrpcRules, *, grpc_status: int | None, http_status: int | None = 200, end: StreamEnd = StreamEnd.COMPLETE
) -> GrpcOutcome:
    """One upstream stream's end → a ``GrpcOutcome``, by the table in this module's docstring.

    ``grpc_status``: the number in the trailers (or a trailers-only head), None when none came. ``http_status``:
    the response head's ``:status``, None when no head came. A ``grpc-status`` settles the call however the
    stream then ended; the client's own cancel is ignored whatever came before it.
    """
    if end is StreamEnd.CLIENT_CANCELLED:
        return GrpcOutcome(Verdict.IGNORED, GrpcStatus.CANCELLED, retryable=False)
    if grpc_status is None and end is not StreamEnd.COMPLETE:
        refused = end is StreamEnd.REFUSED
        retry_kind = FailureKind.CONNECT_ERROR if refused else FailureKind.RESET
        return GrpcOutcome(
            Verdict.FAILURE,
            GrpcStatus.UNAVAILABLE,
            retryable=refused,
            kind=FailureKind.RESET,
            retry_kind=retry_kind,
            label="refused_stream" if refused else FailureKind.RESET.value,
        )
    if grpc_status is not None:
        status = as_status(grpc_status)
    else:
        status = status_from_http(http_status) if http_status is not None else GrpcStatus.UNKNOWN
    if status in rules.failure_codes and status is not GrpcStatus.OK:
        verdict, label = Verdict.FAILURE, status.word
    else:
        verdict, label = Verdict.SUCCESS, None
    return GrpcOutcome(verdict, status, retryable=status in rules.retry_codes, label=label)
