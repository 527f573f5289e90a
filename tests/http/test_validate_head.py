"""``validate_head``: what the listener refuses beyond llhttp, decided on bytes alone (no socket)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.http.request import Request, RequestRejected, mark_upgrade, origin_form, validate_head

HOST = [(b"Host", b"svc")]


def head(
    headers: list[tuple[bytes, bytes]],
    method: bytes = b"GET",
    url: bytes = b"/a?b=1",
    http11: bool = True,
    keep_alive: bool = True,
) -> Request:
    return validate_head(method, url, headers, http11, keep_alive, b"127.0.0.9")


def rejected(headers: list[tuple[bytes, bytes]], **kw: Any) -> tuple[int, str]:
    with pytest.raises(RequestRejected) as caught:
        head(headers, **kw)
    return caught.value.status, str(caught.value)


def test_a_plain_request_keeps_what_the_forwarder_needs() -> None:
    req = head(
        [*HOST, (b"Content-Length", b"12"), (b"Connection", b"keep-alive, X-Trace"), (b"Expect", b"100-continue")]
    )
    assert (req.method, req.path, req.host, req.content_length, req.chunked) == ("GET", b"/a?b=1", b"svc", 12, False)
    assert req.connection_tokens == frozenset({b"keep-alive", b"x-trace"})
    assert req.expect_continue and req.has_body and req.http11 and req.keep_alive
    assert req.client_ip == b"127.0.0.9" and req.body is None


def test_the_keep_alive_wish_and_version_travel_with_the_request() -> None:
    req = head([], http11=False, keep_alive=False)  # HTTP/1.0 may omit Host
    assert (req.http11, req.keep_alive, req.host) == (False, False, None)


def test_expect_continue_means_nothing_in_http_1_0() -> None:
    assert not head([(b"Expect", b"100-continue")], http11=False).expect_continue


def test_chunked_alone_is_the_only_transfer_coding_accepted() -> None:
    assert head([*HOST, (b"Transfer-Encoding", b" Chunked ")]).chunked
    for value in (b"gzip, chunked", b"chunked, gzip", b"identity", b"xchunked"):
        assert rejected([*HOST, (b"Transfer-Encoding", value)]) == (
            400,
            "Transfer-Encoding other than a single 'chunked'",
        )
    assert rejected([*HOST, (b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")])[0] == 400


def test_transfer_encoding_in_http_1_0_is_refused() -> None:
    assert rejected([(b"Transfer-Encoding", b"chunked")], http11=False) == (
        400,
        "Transfer-Encoding in an HTTP/1.0 request",
    )


def test_host_exactly_once_in_http_1_1() -> None:
    assert rejected([]) == (400, "missing Host header")
    assert rejected([*HOST, (b"host", b"evil")]) == (400, "several Host headers")


def test_connect_never_picks_a_destination() -> None:
    assert rejected(HOST, method=b"CONNECT", url=b"evil:443")[0] == 405


@pytest.mark.parametrize(
    ("url", "path"),
    [
        (b"/x", b"/x"),
        (b"*", b"*"),
        (b"http://evil.example:8080/p?q=1", b"/p?q=1"),
        (b"HTTPS://evil.example", b"/"),
    ],
)
def test_absolute_form_is_reduced_to_its_path(url: bytes, path: bytes) -> None:
    assert origin_form(url) == path
    assert head(HOST, url=url).path == path


@pytest.mark.parametrize("url", [b"evil.example:80", b"ftp://evil/x", b"x/y"])
def test_other_request_targets_are_refused(url: bytes) -> None:
    assert rejected(HOST, url=url) == (400, "request target must be a path")


def test_a_body_is_announced_by_length_or_chunking_only() -> None:
    assert not head([*HOST, (b"Content-Length", b"0")]).has_body
    assert not head(HOST).has_body
    assert head([*HOST, (b"Transfer-Encoding", b"chunked")]).has_body


UPGRADE = [*HOST, (b"Connection", b"Upgrade")]


@pytest.mark.parametrize(
    ("upgrade", "method", "http11", "forwarded"),
    [
        (b"websocket", b"GET", True, b"websocket"),
        (b"WebSocket", b"GET", True, b"WebSocket"),
        (b"h2c, websocket", b"GET", True, b"websocket"),  # h2c is never asked for, the rest is
        (b"h2c", b"GET", True, None),  # served as plain HTTP/1.1, Upgrade dropped (nginx)
        (b"websocket", b"GET", False, None),  # RFC 9110 §7.8: Upgrade is ignored in HTTP/1.0
        (b"websocket", b"OPTIONS", True, None),  # RFC 6455 handshakes are GETs
    ],
)
def test_what_of_an_upgrade_request_is_forwarded(
    upgrade: bytes, method: bytes, http11: bool, forwarded: bytes | None
) -> None:
    req = head([*UPGRADE, (b"Upgrade", upgrade)], method=method, http11=http11)
    assert mark_upgrade(req) is (forwarded is not None)
    assert req.upgrade == forwarded
    assert req.keep_alive is (forwarded is None)  # an upgrade is the last request read on its connection


@pytest.mark.parametrize("framing", [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")])
@pytest.mark.parametrize("upgrade", [b"websocket", b"h2c"])
def test_an_upgrade_request_with_a_body_is_refused(framing: tuple[bytes, bytes], upgrade: bytes) -> None:
    req = head([*UPGRADE, (b"Upgrade", upgrade), framing], method=b"POST")
    with pytest.raises(RequestRejected) as caught:
        mark_upgrade(req)
    assert caught.value.status == 400
