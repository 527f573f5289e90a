"""Hypothesis fuzz of request sequences against a real sidecar process (both parser axes, see test_abuse.py).

Each example is a pipelined sequence of valid and invalid requests (random methods, targets, versions, headers,
bodies and framings, sent in random pieces), closed by a well-formed ``Connection: close`` request. Whatever
the bytes, the sidecar must:

* never crash — the process stays up and ``/live`` answers after every example;
* never answer malformed HTTP, and never send two responses to one request — at most one per request sent,
  the upstream's answers first and at most one answer of its own (a rejection closes the connection) last;
* never forward a request it rejected — the recording upstream gets exactly as many requests as the client
  got answers carrying the upstream's status (201).
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.abuse.wire import Responses, talk
from tests.support.abuse import Stack

_examples = itertools.count()

TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$%&'*+.^`|~"
BAD_BYTES = [b"\r", b"\n", b"\x00", b"\x0b", b"\xa0", b"\xff", b" ", b"\t", b"\x7f", b":"]

methods = st.one_of(
    st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]),
    st.sampled_from([b"get", b"G ET", b"CONNECT", b"GET\x00", b"PRI", b"TRACE", b"", b"M" * 40]),
)
versions = st.one_of(
    st.just(b"HTTP/1.1"),
    st.sampled_from([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"http/1.1", b"HTTP/1.1 ", b"HTTP/1", b"HTTP/01.1"]),
)
token = st.text(TOKEN_CHARS, min_size=1, max_size=12).map(str.encode)
value = st.one_of(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20).map(str.encode),
    st.tuples(
        st.text("abc ", max_size=5).map(str.encode),
        st.sampled_from(BAD_BYTES),
        st.text("abc", max_size=5).map(str.encode),
    ).map(b"".join),
)
special_headers = st.sampled_from(
    [
        (b"Host", b"fuzz"),
        (b"Host", b"127.0.0.1:1"),
        (b"Connection", b"close"),
        (b"Connection", b"keep-alive, x-a"),
        (b"Expect", b"100-continue"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Transfer-Encoding", b"gzip, chunked"),
        (b"Content-Length", b"0"),
        (b"Content-Length", b"-1"),
        (b"Content-Length", b"+3"),
        (b"Content-Length", b""),
        (b"X-Forwarded-For", b"1.2.3.4"),
        (b"Upgrade", b"websocket"),
        (b"TE", b"trailers"),
    ]
)
framings = st.sampled_from(["none", "length", "length_short", "chunked", "chunked_bad", "both"])


@st.composite
def request(draw: st.DrawFn, tag: bytes, index: int) -> bytes:
    method = draw(methods)
    suffix = draw(
        st.one_of(
            st.text("abc/%?=&.~-_", max_size=12).map(str.encode),
            st.sampled_from([b" x", b"\x00", b"\x7f", b"\xff", b"\t", b"#frag"]),
        )
    )
    target = b"/fz/" + tag + b"/%d" % index + suffix
    if draw(st.integers(0, 9)) == 0:
        target = draw(st.sampled_from([b"http://127.0.0.1:1", b"*", b"127.0.0.1:1", b"//x"])) + target
    headers = [(b"Host", b"svc")] if draw(st.integers(0, 9)) else []
    headers += draw(st.lists(st.one_of(st.tuples(token, value), special_headers), max_size=5))
    body = draw(st.binary(max_size=40))
    framing = draw(framings)
    if framing in ("length", "both"):
        headers.append((b"Content-Length", b"%d" % len(body)))
    if framing == "length_short":
        headers.append((b"Content-Length", b"%d" % (len(body) // 2)))
    if framing in ("chunked", "chunked_bad", "both"):
        headers.append((b"Transfer-Encoding", b"chunked"))
        cut = draw(st.integers(0, len(body)))
        chunks = [part for part in (body[:cut], body[cut:]) if part]
        size = (lambda n: b"%x" % n) if framing != "chunked_bad" else (lambda n: b"0_%x" % n)
        body = b"".join(size(len(c)) + b"\r\n" + c + b"\r\n" for c in chunks) + b"0\r\n\r\n"
    elif framing == "none":
        body = b""
    eol = b"\r\n" if draw(st.integers(0, 19)) else b"\n"
    head = method + b" " + target + b" " + draw(versions) + eol
    head += b"".join(name + b": " + val + eol for name, val in headers)
    return head + eol + body


@st.composite
def sequence(draw: st.DrawFn) -> tuple[bytes, int, list[int]]:
    tag = b"e%d" % next(_examples)
    requests = [draw(request(tag, i)) for i in range(draw(st.integers(1, 4)))]
    closing = b"GET /fz/" + tag + b"/end HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"
    payload = b"".join(requests) + closing
    pieces = sorted(set(draw(st.lists(st.integers(1, max(1, len(payload) - 1)), max_size=3))))
    return payload, len(requests) + 1, pieces


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
@given(case=sequence())
def test_request_sequences_never_crash_double_answer_or_forward_a_rejected_request(
    stack: Stack, case: tuple[bytes, int, list[int]]
) -> None:
    payload, sent, pieces = case
    before = len(stack.upstream.requests)
    raw = talk(stack.port, payload, timeout=3.0, pieces=pieces)
    answers = Responses(raw)
    assert answers.error is None, f"malformed answer {answers.error}: {raw[:300]!r}"
    final = [r for r in answers.items if r.status >= 200]  # 100 Continue is interim, not an answer
    assert len(final) <= sent, f"{len(final)} answers to {sent} requests"
    statuses = [r.status for r in final]
    forwarded = len(stack.upstream.requests) - before
    assert forwarded == statuses.count(201), f"upstream saw {forwarded}, client got {statuses}: {payload[:300]!r}"
    own = [i for i, r in enumerate(final) if r.status != 201]
    assert own in ([], [len(final) - 1]), f"the sidecar's own answer must be the last one: {statuses}"
    assert all(r.complete for r in final), statuses
    assert stack.alive(), "the sidecar process died or stopped answering /live"
