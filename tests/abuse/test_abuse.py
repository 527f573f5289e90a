"""Abuse: smuggling, open-proxy attempts, header hygiene, malicious upstreams, slow clients and the admin gate.

Every test runs against a real ``sidecar run`` subprocess, once per parser axis (the ``stack`` fixture):

* ``aiohttp-c`` — the default: aiohttp's C-extension HTTP parser.
* ``aiohttp-pure`` — the same sidecar started with ``AIOHTTP_NO_EXTENSIONS=1``: aiohttp's pure-Python parser.

What the axis covers: the **admin plane** (``/live``, ``/breakers``, the token and Origin gate) is served by
aiohttp, so its request parsing really differs between the two runs. The **data plane** (the listeners) parses
with llhttp through httptools under both — ``AIOHTTP_NO_EXTENSIONS`` does not touch it — so for the listener
tests the two runs are the same parser twice, against a separately started process; they are kept on both axes
so that a future change of the listener's parser is covered without touching this file.

The in-process framing tests in ``tests/proxy/test_http_hygiene.py`` are reused (their vector list), not copied;
what is added here is the real process, the second axis, a smuggled follow-up request behind every vector, more
TE/CL obfuscations, the admin plane, malicious upstream framing, and slow clients.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.abuse.wire import KeepAliveClient, Responses, talk
from tests.proxy.test_http_hygiene import SMUGGLING
from tests.support.abuse import TOKEN, UPSTREAM_OK, Canary, Stack

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"

# Obfuscations beyond the hygiene list. "reject": 400, nothing forwarded. "accept": a valid spelling of
# chunked; the body is de-chunked and re-framed by the sidecar, so the follow-up is a separate, proper request.
EXTRA = {
    "te_tab_before_value": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\n\r\n" + CHUNKED_HELLO,
        "accept",
    ),
    "te_tab_after_value": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\t\r\n\r\n" + CHUNKED_HELLO,
        "reject",
    ),  # llhttp is stricter than RFC 9112 here; refusing is the safe side
    "te_value_upper_case": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: CHUNKED\r\n\r\n" + CHUNKED_HELLO,
        "accept",
    ),
    "te_name_mixed_case": (
        b"POST / HTTP/1.1\r\nHost: a\r\ntRANSFER-eNCODING: chunked\r\n\r\n" + CHUNKED_HELLO,
        "accept",
    ),
    "te_tab_in_name": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding\t: chunked\r\n\r\n" + CHUNKED_HELLO, "reject"),
    "te_vertical_tab": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \x0bchunked\r\n\r\n" + CHUNKED_HELLO,
        "reject",
    ),
    "te_chunked_identity": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n" + CHUNKED_HELLO,
        "reject",
    ),
    "te_identity": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\nhello", "reject"),
    "te_xchunked": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n" + CHUNKED_HELLO, "reject"),
    "te_folded": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n" + CHUNKED_HELLO, "reject"),
    "te_then_cl_lowercase": (
        b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 30\r\n\r\n" + CHUNKED_HELLO,
        "reject",
    ),
    "cl_list": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello", "reject"),
    "cl_inner_space": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1 0\r\n\r\nhelloworld", "reject"),
    "cl_overflow": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\nhello", "reject"),
    "chunk_size_overflow": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff5\r\nhello\r\n0\r\n\r\n",
        "reject",
    ),
    "chunk_size_negative": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
        "reject",
    ),
    "chunk_bare_lf": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n", "reject"),
    "bare_lf_head": (b"GET / HTTP/1.1\nHost: a\n\n", "reject"),
    "bare_cr_head": (b"GET / HTTP/1.1\rHost: a\r\n\r\n", "reject"),
    "nul_in_target": (b"GET /a\x00b HTTP/1.1\r\nHost: a\r\n\r\n", "reject"),
    "bad_version": (b"GET / HTTP/1.x\r\nHost: a\r\n\r\n", "reject"),
    "duplicate_host_case": (b"GET / HTTP/1.1\r\nHost: a\r\nhOST: 127.0.0.1\r\n\r\n", "reject"),
    "lf_in_value_smuggles_header": (
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\nTransfer-Encoding: chunked\r\n\r\n",
        "reject",
    ),
}
VECTORS = {name: (payload, "reject") for name, payload in SMUGGLING.items()} | EXTRA


def _paths(stack: Stack, since: int) -> list[bytes]:
    return [url for url, _, _ in stack.upstream.requests[since:]]


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_request_smuggling_vectors(stack: Stack, name: str) -> None:
    payload, expected = VECTORS[name]
    requests_before, bytes_before = len(stack.upstream.requests), stack.forwarded_bytes()
    raw = talk(stack.port, payload + SMUGGLED, timeout=1.0)
    answers = Responses(raw)
    assert answers.error is None, f"{name}: the client got malformed HTTP: {raw[:200]!r}"
    if expected == "reject":
        assert answers.statuses == [400], f"{name}: {raw[:200]!r}"
        assert answers.items[0].header(b"x-sidecar-reason") == b"bad_request"
        assert stack.forwarded_bytes() == bytes_before, f"{name}: something reached the upstream"
    else:
        assert answers.statuses == [201, 201], f"{name}: {raw[:300]!r}"
        assert _paths(stack, requests_before) == [b"/", b"/smuggled"]
        _, headers, body = stack.upstream.requests[requests_before]
        assert body == b"hello"
        framing = [k.lower() for k, _ in headers if k.lower() in (b"content-length", b"transfer-encoding")]
        assert len(framing) == 1, f"{name}: the upstream must see exactly one framing header, got {headers}"
    assert b"/smuggled" not in b"".join(_paths(stack, requests_before)[:1])


@pytest.mark.parametrize("shape", ["long_target", "many_headers", "huge_header"])
def test_oversized_heads_are_4xx_and_nothing_is_forwarded(stack: Stack, shape: str) -> None:
    head = {
        "long_target": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
        "many_headers": b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150)) + b"\r\n",
        "huge_header": b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 70_000 + b"\r\n\r\n",
    }[shape]
    before = stack.forwarded_bytes()
    answers = Responses(talk(stack.port, head))
    assert answers.statuses == [{"long_target": 414}.get(shape, 431)]
    assert stack.forwarded_bytes() == before
    # The admin plane (aiohttp's parser on this axis) refuses them too, and stays up.
    admin = Responses(talk(stack.admin_port, head.replace(b"GET /", b"GET /live", 1)))
    assert admin.statuses and 400 <= admin.statuses[0] < 500, admin.statuses
    assert stack.alive()


@pytest.mark.parametrize(
    "target",
    ["absolute", "absolute_https", "absolute_userinfo", "authority_form", "connect", "host_header", "options_absolute"],
)
def test_open_proxy_attempts_never_reach_the_canary(stack: Stack, target: str) -> None:
    canary = f"127.0.0.1:{stack.canary_port}".encode()
    line = {
        "absolute": b"GET http://" + canary + b"/secret HTTP/1.1",
        "absolute_https": b"GET https://" + canary + b"/secret HTTP/1.1",
        "absolute_userinfo": b"GET http://user:pw@" + canary + b"/secret HTTP/1.1",
        "authority_form": b"GET " + canary + b" HTTP/1.1",
        "connect": b"CONNECT " + canary + b" HTTP/1.1",
        "host_header": b"GET /secret HTTP/1.1",
        "options_absolute": b"OPTIONS http://" + canary + b" HTTP/1.1",
    }[target]
    payload = line + b"\r\nHost: " + canary + b"\r\nConnection: close\r\n\r\n"
    for port in (stack.port, stack.admin_port):
        answers = Responses(talk(port, payload, timeout=0.5))
        assert len(answers.items) == 1
        if port == stack.port and target == "connect":
            assert answers.statuses == [405]
    assert Canary.connections == 0, "a listener must only ever connect to its configured targets"


def test_hop_by_hop_and_connection_named_headers_are_stripped_and_xff_appended(stack: Stack) -> None:
    before = len(stack.upstream.requests)
    payload = (
        b"POST /h HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret, x-forwarded-for, content-length\r\n"
        b"X-Secret: hop\r\nKeep-Alive: 300\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Connection: keep-alive\r\n"
        b"X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-For: 198.51.100.7, 10.0.0.1\r\n"
        b"Content-Length: 5\r\n\r\nhello" + b"GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    answers = Responses(talk(stack.port, payload))
    assert answers.statuses == [201, 201]
    _, headers, body = stack.upstream.requests[before]
    sent = {}
    for name, value in headers:
        assert name.lower() not in sent, f"{name!r} sent twice"
        sent[name.lower()] = value
    for hop in (b"x-secret", b"keep-alive", b"upgrade", b"proxy-connection"):
        assert hop not in sent, hop
    assert sent[b"te"] == b"trailers" and sent[b"connection"] == b"te", "TE: trailers passes, as the sidecar's own"
    assert body == b"hello" and sent[b"content-length"] == b"5", "naming Content-Length in Connection is ignored"
    # Spoofed entries are kept (the sidecar cannot know them false) but the real peer is always appended last.
    assert sent[b"x-forwarded-for"] == b"203.0.113.9, 198.51.100.7, 10.0.0.1, 127.0.0.1"


RESPONSE_SPLITTING = {
    "bare_cr_in_value": b"HTTP/1.1 200 OK\r\nX-A: a\rSet-Cookie: injected=1\r\ncontent-length: 2\r\n\r\nok",
    "nul_in_value": b"HTTP/1.1 200 OK\r\nX-A: a\x00injected\r\ncontent-length: 2\r\n\r\nok",
    "bare_lf_in_value": b"HTTP/1.1 200 OK\r\nX-A: a\nSet-Cookie: injected=1\r\ncontent-length: 2\r\n\r\nok",
    "cl_and_te": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "space_before_colon": b"HTTP/1.1 200 OK\r\ncontent-length : 2\r\nx-injected: 1\r\n\r\nok",
}


@pytest.mark.parametrize("name", sorted(RESPONSE_SPLITTING))
def test_malicious_upstream_header_is_a_502(stack: Stack, name: str) -> None:
    stack.evil.response = RESPONSE_SPLITTING[name]
    try:
        raw = talk(stack.evil_port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    finally:
        stack.evil.response = UPSTREAM_OK
    answers = Responses(raw)
    assert answers.error is None and answers.statuses == [502], raw[:200]
    assert answers.items[0].header(b"x-sidecar-reason") == b"bad_response"
    assert b"injected" not in raw


def test_malformed_upstream_body_after_a_good_head_is_truncated_not_smuggled(stack: Stack) -> None:
    stack.evil.response = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n"
        b"zz\r\nHTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\ninjected\r\n0\r\n\r\n"
    )
    try:
        raw = talk(stack.evil_port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    finally:
        stack.evil.response = UPSTREAM_OK
    answers = Responses(raw)
    # Too late for a 502 once the head may have gone out: a cut-short body, one status line, nothing injected.
    assert len(answers.items) == 1 and b"injected" not in raw, raw
    assert answers.statuses == [502] or not answers.items[0].complete, raw


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_bytes_beyond_the_upstream_answer_never_reach_the_client(stack: Stack, method: bytes) -> None:
    """An upstream that appends a second response (or a body to a HEAD answer) must not desync the client."""
    ok_then_evil = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    stack.evil.response = ok_then_evil + b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\nx-injected: 1\r\n\r\ninjected"
    try:
        raw = talk(
            stack.evil_port,
            method + b" /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
    finally:
        stack.evil.response = UPSTREAM_OK
    assert b"injected" not in raw, raw
    # A client that knows the first answer is to a HEAD reads it without a body.
    answers = Responses(raw, head_only=1 if method == b"HEAD" else 0)
    assert answers.error is None, raw
    assert answers.statuses == [200, 200] and answers.items[-1].body == b"ok", raw


def test_slowloris_is_cut_by_the_header_deadline_and_normal_p99_holds(stack: Stack) -> None:
    def p99(samples: int) -> float:
        client = KeepAliveClient(stack.port)
        timings = []
        try:
            for _ in range(samples):
                started = time.perf_counter()
                assert client.get() == 201
                timings.append(time.perf_counter() - started)
        finally:
            client.close()
        return statistics.quantiles(timings, n=100)[98]

    def best_of_three() -> float:
        # Scheduling noise on a 2-core machine only ever adds latency: the best of three windows is the signal.
        return min(p99(150) for _ in range(3))

    def under_trickle() -> tuple[float, float, list[dict[str, Any]]]:
        baseline = best_of_three()
        trickle = subprocess.Popen(
            [sys.executable, "-m", "tests.abuse.trickle", str(stack.port), "200", "0.1", "5"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert trickle.stdout is not None
            assert trickle.stdout.readline().strip() == "ready"
            started = time.monotonic()
            loaded = best_of_three()
            assert time.monotonic() - started < 1.5, "measure while all 200 connections are still trickling"
            return baseline, loaded, json.loads(trickle.stdout.readline())
        finally:
            if trickle.poll() is None:
                trickle.kill()
            trickle.wait(5)

    p99(50)  # warm the pool and the caches
    # Other work on the machine can spike any one measurement; a real regression (the loop blocked by the
    # trickle) fails every attempt, so up to three attempts are made. 1 ms of allowance covers timer
    # granularity at sub-millisecond p99s.
    seen = []
    for _ in range(3):
        baseline, loaded, summary = under_trickle()
        seen.append(f"{baseline * 1e3:.2f} ms alone, {loaded * 1e3:.2f} ms beside 200 trickling")
        if loaded <= 2 * baseline + 0.001:
            break
    print("slowloris p99:", "; ".join(seen))
    assert loaded <= 2 * baseline + 0.001, f"normal p99 under slowloris out of 2x in every attempt: {seen}"
    statuses = [s["status"] for s in summary]
    assert statuses.count("408") == 200, statuses
    assert all(1.9 <= s["after"] < 3.0 for s in summary), "each is cut at the 2 s header deadline, not later"
    assert stack.alive()


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_slow_post_body_is_cut_off_and_never_forwarded(stack: Stack, framing: str) -> None:
    before = stack.forwarded_bytes()
    head = b"POST /slow HTTP/1.1\r\nHost: a\r\n" + (
        b"Content-Length: 100\r\n\r\n" if framing == "length" else b"Transfer-Encoding: chunked\r\n\r\n64\r\n"
    )
    with socket.create_connection(("127.0.0.1", stack.port), 3) as sock:
        sock.sendall(head + b"x" * 10)
        started = time.monotonic()
        raw = b""
        try:
            while chunk := sock.recv(65536):
                raw += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        elapsed = time.monotonic() - started
    answers = Responses(raw)
    assert answers.statuses == [408], raw[:200]
    assert 0.9 <= elapsed < 2.0, elapsed
    assert stack.forwarded_bytes() == before, "a small body is read whole before any upstream sees it"


def _admin_post(stack: Stack, path: str, headers: dict[str, str]) -> int:
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    raw = talk(
        stack.admin_port, f"POST {path} HTTP/1.1\r\n{lines}Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
    )
    return Responses(raw).statuses[0]


def test_admin_token_is_checked_for_any_wrong_token(stack: Stack) -> None:
    host = {"Host": f"127.0.0.1:{stack.admin_port}"}
    path = "/breakers/svc/reset"
    assert _admin_post(stack, path, host) == 401
    # Wrong tokens of the same length and of other lengths are refused alike (hmac.compare_digest).
    for wrong in ("x" * len(TOKEN), TOKEN[:-1] + "X", TOKEN[:5], TOKEN + "x", "", "\u00e9" * 3):
        assert _admin_post(stack, path, {**host, "Authorization": f"Bearer {wrong}"}) in (401, 403), wrong
    assert _admin_post(stack, path, {**host, "Authorization": f"Bearer {'y' * len(TOKEN)}"}) == 403
    assert _admin_post(stack, path, {**host, "Authorization": "Bearer short"}) == 403
    assert _admin_post(stack, path, {**host, "Authorization": f"Bearer {TOKEN}"}) == 200


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "null",
        "http://localhost.evil.example:{port}",
        "https://127.0.0.1:{port}",
        "http://127.0.0.1:1",
    ],
)
def test_mutating_admin_calls_with_a_foreign_origin_are_refused(stack: Stack, origin: str) -> None:
    headers = {
        "Host": f"127.0.0.1:{stack.admin_port}",
        "Authorization": f"Bearer {TOKEN}",
        "Origin": origin.format(port=stack.admin_port),
    }
    assert _admin_post(stack, "/breakers/svc/force-open", headers) == 403
    assert _svc_status(stack) == 201, "the breaker must not have been forced open"
    same = {**headers, "Origin": f"http://127.0.0.1:{stack.admin_port}"}
    assert _admin_post(stack, "/breakers/svc/reset", same) == 200


@pytest.mark.parametrize("vector", ["cl_te", "te_cl", "duplicate_cl", "te_nbsp", "lf_in_value"])
def test_admin_plane_smuggling_never_runs_the_hidden_call(stack: Stack, vector: str) -> None:
    """The hidden request (a force-open with the right token) must never run, whichever aiohttp parser."""
    hidden = (
        f"POST /breakers/svc/force-open HTTP/1.1\r\nHost: 127.0.0.1:{stack.admin_port}\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    chunk = b"%x\r\n%b\r\n0\r\n\r\n" % (len(hidden), hidden)
    payload = {
        "cl_te": b"POST /live HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"0\r\n\r\n"
        + hidden,
        "te_cl": b"POST /live HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n"
        % len(chunk)
        + chunk,
        "duplicate_cl": b"POST /live HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: %d\r\n\r\n"
        % len(hidden)
        + hidden,
        "te_nbsp": b"POST /live HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \xa0chunked\r\n\r\n" + chunk,
        "lf_in_value": b"POST /live HTTP/1.1\r\nHost: a\r\nX-A: a\nContent-Length: 0\r\n\r\n" + hidden,
    }[vector]
    try:
        raw = talk(stack.admin_port, payload, timeout=1.0)
        answers = Responses(raw)
        assert len(answers.items) == 1, f"{vector}: the admin plane answered a smuggled request: {raw[:300]!r}"
        assert _svc_status(stack) == 201, f"{vector}: the hidden force-open ran"
        assert stack.alive()
    finally:
        host = {"Host": f"127.0.0.1:{stack.admin_port}", "Authorization": f"Bearer {TOKEN}"}
        _admin_post(stack, "/breakers/svc/reset", host)  # never leave a forced breaker to the next test


def _svc_status(stack: Stack) -> int:
    return Responses(talk(stack.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")).statuses[0]


@pytest.mark.parametrize(
    "bad",
    [
        b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n0\r\n\r\n",
    ],
    ids=["bad_head", "bad_chunked_body"],
)
def test_a_malformed_request_pipelined_behind_a_good_one_is_answered_in_its_turn(stack: Stack, bad: bytes) -> None:
    """The 400 must not overtake the answer to the request before it (which the upstream is processing)."""
    before = len(stack.upstream.requests)
    raw = talk(stack.port, b"POST /first HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello" + bad)
    answers = Responses(raw)
    assert answers.statuses == [201, 400], raw[:400]
    assert _paths(stack, before) == [b"/first"]
