"""Framing attacks, open-proxy attempts and header hygiene, with raw sockets on both sides of the sidecar."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.raw import exchange, recording_upstream
from tests.support.sidecar import free_port, policy_listen, running_sidecar, write_policy

SMUGGLING = {
    "cl_te": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
    "te_cl": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n",
    "duplicate_cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "conflicting_cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nhello",
    "empty_and_real_cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\nContent-Length: 5\r\n\r\nhello",
    "plus_cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1_0\r\n\r\nhello",
    "negative_cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -5\r\n\r\nhello",
    "hex_cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\nhello",
    "chunk_size_underscore": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0_2e\r\nhello\r\n0\r\n\r\n",
    "chunk_size_junk": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "te_chunked_chunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "te_gzip_chunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "te_nbsp": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \xa0chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "te_twice": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_http10": b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "cr_in_value": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\rb\r\n\r\n",
    "lf_in_value": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\nGET /evil HTTP/1.1\r\n\r\n",
    "nul_in_value": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n",
    "space_before_colon": b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
    "obs_fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\r\n b\r\n\r\n",
    "duplicate_host": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "missing_host": b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
async def test_ambiguous_framing_is_400_and_nothing_reaches_the_upstream(tmp_path: Path, name: str) -> None:
    async with recording_upstream() as upstream:
        policy = write_policy(tmp_path / "p.yaml", {"svc": {"targets": [upstream.url]}})
        async with running_sidecar(policy):
            host, port = policy_listen(policy, "svc")
            answer = await exchange(host, port, SMUGGLING[name])
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
        assert b"x-sidecar-reason: bad_request" in answer
        assert answer.count(b"HTTP/1.1 ") == 1
        assert upstream.raw == b"", f"{name}: the upstream saw {upstream.raw[:120]!r}"


async def test_absolute_form_and_host_never_choose_the_destination(tmp_path: Path) -> None:
    async with recording_upstream() as upstream, recording_upstream() as canary:
        policy = write_policy(tmp_path / "p.yaml", {"svc": {"targets": [upstream.url]}})
        async with running_sidecar(policy):
            host, port = policy_listen(policy, "svc")
            answer = await exchange(
                host,
                port,
                (
                    f"GET http://127.0.0.1:{canary.port}/secret?q=1 HTTP/1.1\r\nHost: 127.0.0.1:{canary.port}\r\n"
                    "Connection: close\r\n\r\n"
                ).encode(),
            )
            assert answer.startswith(b"HTTP/1.1 200")
            connect = await exchange(
                host,
                port,
                f"CONNECT 127.0.0.1:{canary.port} HTTP/1.1\r\nHost: 127.0.0.1:{canary.port}\r\n\r\n".encode(),
            )
            assert connect.startswith(b"HTTP/1.1 405")
        assert canary.connections == [], "the canary must never see a connection"
        assert [r[0] for r in upstream.requests] == [b"/secret?q=1"]
        sent_host = dict((k.lower(), v) for k, v in upstream.requests[0][1])[b"host"]
        assert sent_host == f"127.0.0.1:{upstream.port}".encode()


async def test_hop_by_hop_headers_are_stripped_both_ways_and_xff_appended(tmp_path: Path) -> None:
    response = (
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive, x-upstream-hop\r\n"
        b"keep-alive: timeout=5\r\nx-upstream-hop: secret\r\nproxy-connection: keep-alive\r\n"
        b"upgrade: h2c\r\nx-kept: yes\r\n\r\nok"
    )
    async with recording_upstream(response) as upstream:
        policy = write_policy(tmp_path / "p.yaml", {"svc": {"targets": [upstream.url]}})
        async with running_sidecar(policy):
            host, port = policy_listen(policy, "svc")
            answer = await exchange(
                host,
                port,
                (
                    b"GET /h HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, x-client-hop\r\nKeep-Alive: 300\r\n"
                    b"X-Client-Hop: secret\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\n"
                    b"X-Forwarded-For: 203.0.113.9\r\nX-End-To-End: kept\r\n\r\n"
                ),
                read_timeout=0.5,
            )
    sent = {k.lower(): v for k, v in upstream.requests[0][1]}
    for hop in (b"keep-alive", b"x-client-hop", b"proxy-connection", b"upgrade"):
        assert hop not in sent, hop
    # TE: trailers is the one hop-by-hop field passed on, as the sidecar's own (with its connection option).
    assert sent[b"te"] == b"trailers" and sent[b"connection"] == b"te"
    assert sent[b"x-end-to-end"] == b"kept"
    assert sent[b"x-forwarded-for"] == b"203.0.113.9, 127.0.0.1"
    head = answer.split(b"\r\n\r\n")[0].lower()
    for hop in (b"keep-alive:", b"x-upstream-hop", b"proxy-connection", b"upgrade:"):
        assert hop not in head, hop
    assert b"x-kept: yes" in head


async def test_pipelined_requests_are_answered_in_order_one_upstream_request_each(tmp_path: Path) -> None:
    async with recording_upstream() as upstream:
        policy = write_policy(tmp_path / "p.yaml", {"svc": {"targets": [upstream.url]}})
        async with running_sidecar(policy):
            host, port = policy_listen(policy, "svc")
            payload = b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(5))
            answer = await exchange(host, port, payload + b"GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200 OK") == 6
    assert [r[0] for r in upstream.requests] == [b"/0", b"/1", b"/2", b"/3", b"/4", b"/last"]


async def test_oversized_heads_are_refused_before_anything_is_forwarded(tmp_path: Path) -> None:
    async with recording_upstream() as upstream:
        policy = write_policy(tmp_path / "p.yaml", {"svc": {"targets": [upstream.url]}})
        async with running_sidecar(policy):
            host, port = policy_listen(policy, "svc")
            long_url = await exchange(host, port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
            many = await exchange(
                host,
                port,
                b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150)) + b"\r\n",
            )
            big = await exchange(host, port, b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 70000 + b"\r\n\r\n")
    assert long_url.startswith(b"HTTP/1.1 414")
    assert many.startswith(b"HTTP/1.1 431")
    assert big.startswith(b"HTTP/1.1 431")
    assert upstream.raw == b""


async def test_malicious_upstream_response_is_a_502(tmp_path: Path) -> None:
    for bad in (
        b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
    ):
        async with recording_upstream(bad) as upstream:
            policy = write_policy(tmp_path / "p.yaml", {"svc": {"targets": [upstream.url]}})
            async with running_sidecar(policy):
                host, port = policy_listen(policy, "svc")
                answer = await exchange(host, port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 502"), answer[:60]
        assert b"x-sidecar-reason: bad_response" in answer


async def test_slow_request_head_is_cut_off(tmp_path: Path) -> None:
    async with recording_upstream() as upstream:
        policy = write_policy(
            tmp_path / "p.yaml", {"svc": {"targets": [upstream.url]}}, http={"header_timeout": "300ms"}
        )
        async with running_sidecar(policy):
            host, port = policy_listen(policy, "svc")
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n")
            answer = await asyncio.wait_for(reader.read(), 3)
            writer.close()
    assert answer.startswith(b"HTTP/1.1 408")
    assert upstream.raw == b""


async def test_nothing_listens_but_the_configured_address(tmp_path: Path) -> None:
    port = free_port()
    async with recording_upstream() as upstream:
        policy = write_policy(tmp_path / "p.yaml", {"svc": {"targets": [upstream.url], "listen": f"127.0.0.1:{port}"}})
        async with running_sidecar(policy) as sidecar:
            assert sidecar.config is not None
            assert sidecar.config.admin.listen.host == "127.0.0.1"
            listener = sidecar.listeners["svc"]
            bound = {s.getsockname()[:2] for s in listener.server.sockets}
            assert bound == {("127.0.0.1", port)}
