"""gRPC outcomes: every row of issue 21's table, the HTTP-to-gRPC mapping, deadlines, and decide_retry reused."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.grpc_wire import parse_grpc_status, parse_pushback
from proxy.resilience.failures import FailureKind
from proxy.resilience.grpc import (
    DEFAULT_FAILURE_ON,
    GRPC_METHOD,
    RETRYABLE,
    GrpcOutcome,
    GrpcRules,
    GrpcStatus,
    StreamEnd,
    Verdict,
    classify,
    status_from_http,
    why_not_retryable,
)
from proxy.resilience.retry import NoRetry, decide_retry

DEFAULT = GrpcRules()
OPTED_IN = GrpcRules(retry_codes=frozenset(RETRYABLE))
S = GrpcStatus


def test_the_status_words_are_the_canonical_names() -> None:
    assert [s.value for s in GrpcStatus] == list(range(17))
    assert S.DEADLINE_EXCEEDED.word == "deadline_exceeded"
    assert S(14).word == "unavailable"


@pytest.mark.parametrize(
    ("code", "verdict", "retried_by_default", "retried_opted_in"),
    [
        (S.OK, Verdict.SUCCESS, False, False),
        (S.UNAVAILABLE, Verdict.FAILURE, True, True),
        (S.DEADLINE_EXCEEDED, Verdict.FAILURE, False, True),
        (S.INTERNAL, Verdict.FAILURE, False, True),
        (S.UNKNOWN, Verdict.FAILURE, False, False),
        (S.DATA_LOSS, Verdict.FAILURE, False, False),
        (S.RESOURCE_EXHAUSTED, Verdict.SUCCESS, False, True),
        *(
            (code, Verdict.SUCCESS, False, False)
            for code in (S.CANCELLED, S.INVALID_ARGUMENT, S.NOT_FOUND, S.ALREADY_EXISTS, S.PERMISSION_DENIED)
        ),
        *(
            (code, Verdict.SUCCESS, False, False)
            for code in (S.FAILED_PRECONDITION, S.ABORTED, S.OUT_OF_RANGE, S.UNIMPLEMENTED, S.UNAUTHENTICATED)
        ),
    ],
)
def test_every_status_row_of_the_table(
    code: GrpcStatus, verdict: Verdict, retried_by_default: bool, retried_opted_in: bool
) -> None:
    for end in (StreamEnd.COMPLETE, StreamEnd.LOST, StreamEnd.REFUSED):  # a grpc-status settles it however it ended
        outcome = classify(DEFAULT, grpc_status=int(code), end=end)
        assert (outcome.verdict, outcome.status, outcome.retryable) == (verdict, code, retried_by_default)
        assert outcome.kind is None
        assert outcome.label == (code.word if verdict is Verdict.FAILURE else None)
    assert classify(OPTED_IN, grpc_status=int(code)).retryable is retried_opted_in


def test_a_stream_lost_without_a_status_is_a_failure_never_retried() -> None:
    outcome = classify(OPTED_IN, grpc_status=None, http_status=200, end=StreamEnd.LOST)
    assert outcome == GrpcOutcome(
        Verdict.FAILURE,
        S.UNAVAILABLE,
        retryable=False,
        kind=FailureKind.RESET,
        retry_kind=FailureKind.RESET,
        label="reset",
    )
    assert classify(DEFAULT, grpc_status=None, http_status=None, end=StreamEnd.LOST).verdict is Verdict.FAILURE


def test_a_refused_stream_is_a_failure_retried_as_a_connect_error() -> None:
    outcome = classify(DEFAULT, grpc_status=None, http_status=None, end=StreamEnd.REFUSED)
    assert outcome == GrpcOutcome(
        Verdict.FAILURE,
        S.UNAVAILABLE,
        retryable=True,
        kind=FailureKind.RESET,
        retry_kind=FailureKind.CONNECT_ERROR,
        label="refused_stream",
    )
    # even with nothing opted in: a refused stream reached no handler
    assert classify(GrpcRules(retry_codes=frozenset()), grpc_status=None, end=StreamEnd.REFUSED).retryable


@pytest.mark.parametrize("status", [None, 0, 14, 13])
def test_the_clients_own_cancel_is_ignored_whatever_came_before(status: int | None) -> None:
    outcome = classify(OPTED_IN, grpc_status=status, end=StreamEnd.CLIENT_CANCELLED)
    assert outcome == GrpcOutcome(Verdict.IGNORED, S.CANCELLED, retryable=False)


@pytest.mark.parametrize(
    ("http_status", "grpc"),
    [
        (400, S.INTERNAL),
        (401, S.UNAUTHENTICATED),
        (403, S.PERMISSION_DENIED),
        (404, S.UNIMPLEMENTED),
        (429, S.UNAVAILABLE),
        (502, S.UNAVAILABLE),
        (503, S.UNAVAILABLE),
        (504, S.UNAVAILABLE),
        (200, S.UNKNOWN),  # a 200 without grpc-status: the call has no status
        (500, S.UNKNOWN),
        (301, S.UNKNOWN),
        (418, S.UNKNOWN),
    ],
)
def test_an_answer_without_grpc_status_maps_by_its_http_status(http_status: int, grpc: GrpcStatus) -> None:
    assert status_from_http(http_status) is grpc
    outcome = classify(DEFAULT, grpc_status=None, http_status=http_status)
    assert outcome.status is grpc
    assert outcome.verdict is (Verdict.FAILURE if grpc in DEFAULT_FAILURE_ON else Verdict.SUCCESS)
    assert outcome.retryable is (grpc is S.UNAVAILABLE)


def test_a_status_outside_0_to_16_is_unknown() -> None:
    assert classify(DEFAULT, grpc_status=17).status is S.UNKNOWN
    assert classify(DEFAULT, grpc_status=-1).status is S.UNKNOWN
    assert [parse_grpc_status(v) for v in (None, b"0", b"14", b"16", b"17", b"x", b"", b"-1", b"0014")] == [
        None,
        0,
        14,
        16,
        2,
        2,
        2,
        2,
        2,
    ]


def test_failure_codes_are_configurable_and_ok_is_never_one() -> None:
    rules = GrpcRules(failure_codes=frozenset({S.OK, S.RESOURCE_EXHAUSTED}))
    assert classify(rules, grpc_status=0).verdict is Verdict.SUCCESS
    assert classify(rules, grpc_status=8).verdict is Verdict.FAILURE
    assert classify(rules, grpc_status=14).verdict is Verdict.SUCCESS


ENDS = st.sampled_from(list(StreamEnd))
CODES = st.frozensets(st.sampled_from(list(GrpcStatus)))
RETRY_CODES = st.frozensets(st.sampled_from(sorted(RETRYABLE)))


@given(CODES, RETRY_CODES, st.none() | st.integers(-2, 20), st.none() | st.integers(100, 599), ENDS)
def test_retryable_is_exactly_what_decide_retrys_outcome_check_says(
    failure: frozenset[int], retry: frozenset[int], status: int | None, http: int | None, end: StreamEnd
) -> None:
    rules = GrpcRules(failure_codes=failure, retry_codes=retry)
    outcome = classify(rules, grpc_status=status, http_status=http, end=end)
    assert outcome.retryable is rules.retry_rules(3).outcome_allows(outcome.retry_kind, outcome.status)


def _decide(rules: GrpcRules, outcome: GrpcOutcome, **kw: object) -> NoRetry | None:
    args: dict[str, object] = {
        "attempts": 1,
        "method": GRPC_METHOD,
        "kind": outcome.retry_kind,
        "status": outcome.status,
        "body_replayable": True,
        "backoff": itertools.repeat(0.1),
        "retry_after": None,
        "max_delay": 1.0,
        "now": 0.0,
        "deadline": 10.0,
    } | kw
    return decide_retry(rules.retry_rules(2), **args).reason  # type: ignore[arg-type]


def test_decide_retry_decides_grpc_retries() -> None:
    unavailable = classify(DEFAULT, grpc_status=14)
    assert _decide(DEFAULT, unavailable) is None
    assert _decide(DEFAULT, unavailable, attempts=3) is NoRetry.RETRIES_EXHAUSTED
    assert _decide(DEFAULT, classify(DEFAULT, grpc_status=4)) is NoRetry.OUTCOME_NOT_RETRIED
    assert _decide(DEFAULT, classify(DEFAULT, grpc_status=None, end=StreamEnd.LOST)) is NoRetry.OUTCOME_NOT_RETRIED
    assert _decide(DEFAULT, classify(DEFAULT, grpc_status=None, end=StreamEnd.REFUSED)) is None
    assert _decide(DEFAULT, unavailable, method="GET") is NoRetry.METHOD_NOT_RETRIED


def test_pushback_is_honoured_up_to_max_delay_and_a_refusal_stops_retries() -> None:
    exhausted = classify(OPTED_IN, grpc_status=8)
    assert _decide(OPTED_IN, exhausted, retry_after=parse_pushback(b"500")) is None
    assert _decide(OPTED_IN, exhausted, retry_after=parse_pushback(b"5000")) is NoRetry.RETRY_AFTER_TOO_LONG
    assert _decide(OPTED_IN, exhausted, retry_after=parse_pushback(b"-1")) is NoRetry.RETRY_AFTER_TOO_LONG
    rules = OPTED_IN.retry_rules(2)
    decision = decide_retry(
        rules,
        attempts=1,
        method=GRPC_METHOD,
        kind=None,
        status=exhausted.status,
        body_replayable=True,
        backoff=iter([0.9]),
        retry_after=parse_pushback(b"250"),
        max_delay=1.0,
        now=0.0,
        deadline=10.0,
    )
    assert decision.delay == 0.25


def test_deadline_exceeded_is_retried_only_within_the_callers_deadline() -> None:
    rules = GrpcRules(retry_codes=frozenset({S.DEADLINE_EXCEEDED}))
    caller = rules.caller_deadline(100.0, 2.0)
    assert caller == 102.0
    deadline = rules.attempts_deadline(100.0, 15.0, caller)
    assert deadline == 102.0
    late = classify(rules, grpc_status=4)
    assert _decide(rules, late, now=101.899, deadline=deadline) is None  # + 0.1 backoff = 101.999
    assert _decide(rules, late, now=101.9, deadline=deadline) is NoRetry.DEADLINE  # would start on the deadline


def test_the_callers_deadline_is_capped_then_offset() -> None:
    rules = GrpcRules(timeout_offset=0.05, max_timeout=1.0)
    assert rules.caller_deadline(10.0, None) is None
    assert rules.caller_deadline(10.0, 0.5) == pytest.approx(10.45)
    assert rules.caller_deadline(10.0, 30.0) == pytest.approx(10.95)
    assert rules.caller_deadline(10.0, 0.01) == pytest.approx(9.96)  # already up: answer deadline_exceeded
    assert GrpcRules.attempts_deadline(10.0, 15.0, None) == 25.0
    assert GrpcRules.attempts_deadline(10.0, 15.0, 12.0) == 12.0
    assert GrpcRules.attempts_deadline(10.0, 1.0, 12.0) == 11.0
    assert GrpcRules.attempts_deadline(10.0, math.inf, None) == math.inf


def test_rules_refuse_to_retry_a_status_outside_the_table() -> None:
    with pytest.raises(ValueError, match="may not be retried"):
        GrpcRules(retry_codes=frozenset({S.UNKNOWN}))


def test_only_four_statuses_may_be_retried_and_the_rest_say_why() -> None:
    assert {s for s in GrpcStatus if why_not_retryable(s) is None} == {
        S.UNAVAILABLE,
        S.DEADLINE_EXCEEDED,
        S.INTERNAL,
        S.RESOURCE_EXHAUSTED,
    }
    assert "twice" in (why_not_retryable(S.UNKNOWN) or "")
    assert "success" in (why_not_retryable(S.OK) or "")
    assert "invalid_argument" in (why_not_retryable(S.INVALID_ARGUMENT) or "")
