"""HTTPS and mTLS upstreams: real TLS servers on 127.0.0.1 with a throwaway CA (trustme), each verdict of the
sidecar compared with a direct client (aiohttp or ssl) given the same trust and certificate."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml

from proxy.server import Sidecar
from proxy.upstream.tls import SESSION_READ_LEAKS
from tests.support.eventually import eventually
from tests.support.sidecar import listener_url, policy_listen, running_sidecar, sidecar_process, write_policy
from tests.support.tls import (
    Leaf,
    ca_file,
    client_context,
    expired,
    leaf,
    server_context,
    threaded_tls_upstream,
    tls_upstream,
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_cert(ca: trustme.CA, tmp_path: Path) -> Leaf:
    return leaf(ca, tmp_path, "server", "localhost", "127.0.0.1")


def tls_policy(tmp_path: Path, target: str, tls: dict[str, Any] | None = None, **upstream: Any) -> Path:
    spec: dict[str, Any] = {"targets": [target], **upstream}
    if tls is not None:
        spec["tls"] = tls
    return write_policy(tmp_path / "policy.yaml", {"api": spec})


async def through(session: aiohttp.ClientSession, sidecar: Sidecar, method: str = "GET", path: str = "/x", **kw: Any):
    async with session.request(method, listener_url(sidecar, "api") + path, **kw) as response:
        return response.status, response.headers, await response.read()


async def direct(
    session: aiohttp.ClientSession, url: str, ctx: ssl.SSLContext, method: str = "GET", **kw: Any
) -> tuple[int, bytes] | str:
    """(status, body) straight from the server, or the TLS error's text."""
    try:
        async with session.request(method, url, ssl=ctx, **kw) as response:
            return response.status, await response.read()
    except aiohttp.ClientConnectorCertificateError as exc:
        return f"certificate: {exc.certificate_error}"
    except (aiohttp.ClientConnectorError, aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
        return f"tls: {exc}"


def failures(sidecar: Sidecar) -> tuple[dict[str, int], int]:
    """(failures by reason label, failures the breaker counted)."""
    rt = sidecar.runtimes["api"]
    return dict(rt.stats.failures), rt.breaker.snapshot(rt.clock.monotonic()).total_failures


async def test_streamed_uploads_share_one_pooled_tls_connection(
    ca: trustme.CA, server_cert: Leaf, tmp_path: Path
) -> None:
    """1 MiB bodies stream (past the replay buffer), chunked or with a length, and the TLS connection that
    carried each goes back to the pool once its last byte is sent: one handshake for all of them."""
    size = 1 << 20

    async def pieces() -> AsyncIterator[bytes]:
        for _ in range(16):
            yield b"u" * (size // 16)

    async with tls_upstream(server_context(server_cert)) as upstream:
        policy = tls_policy(tmp_path, upstream.url("localhost"), {"ca_file": str(ca_file(ca, tmp_path / "ca.pem"))})
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            for chunked in (True, False, True, False):
                status, _, body = await through(
                    session, sidecar, "POST", "/up", data=pieces() if chunked else b"u" * size
                )
                assert status == 200 and len(json.loads(body)["body"]) == size
            assert len(upstream.connections) == 1, "four streamed uploads, one pooled TLS connection"


async def test_get_and_post_through_the_sidecar_equal_direct_over_one_kept_alive_tls_connection(
    ca: trustme.CA, server_cert: Leaf, tmp_path: Path
) -> None:
    async with tls_upstream(server_context(server_cert)) as upstream:
        policy = tls_policy(tmp_path, upstream.url("localhost"), {"ca_file": str(ca_file(ca, tmp_path / "ca.pem"))})
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            for _ in range(5):
                status, _, body = await through(session, sidecar, "GET", "/x?q=1")
                assert status == 200, body
                seen = json.loads(body)
                assert seen["method"] == "GET" and seen["path"] == "/x?q=1"
                assert seen["host"] == f"localhost:{upstream.port}"  # the target's authority
                assert seen["alpn"] == "http/1.1"
            status, _, body = await through(session, sidecar, "POST", "/orders", data=b'{"qty": 3}')
            assert status == 200 and json.loads(body)["body"] == '{"qty": 3}'
            assert len(upstream.connections) == 1, "six requests, one pooled TLS connection"
            connections = len(upstream.connections)
            # The same requests straight to the server, with the same trust: the same answers.
            ctx = client_context(ca)
            status_direct = await direct(
                session, upstream.url("localhost") + "/orders", ctx, "POST", data=b'{"qty": 3}'
            )
            assert isinstance(status_direct, tuple) and status_direct[0] == 200
            assert json.loads(status_direct[1])["body"] == json.loads(body)["body"]
            assert len(upstream.connections) == connections + 1  # (the direct client's own)
            assert failures(sidecar) == ({}, 0)


@pytest.mark.parametrize("in_process", [True, False], ids=["asyncio-in-process", "uvloop-sidecar-run"])
async def test_a_new_connection_resumes_the_tls_session_of_the_last_one(
    ca: trustme.CA, server_cert: Leaf, tmp_path: Path, in_process: bool
) -> None:
    """asyncio's create_connection takes no SSLSession; the sidecar's client context offers the saved one in
    wrap_bio, which both asyncio's and uvloop's SSL transports call. The server says whether it resumed."""
    async with tls_upstream(server_context(server_cert), keepalive_timeout=0.3) as upstream:
        policy = tls_policy(tmp_path, upstream.url("localhost"), {"ca_file": str(ca_file(ca, tmp_path / "ca.pem"))})
        host, port = policy_listen(policy, "api")
        url = f"http://{host}:{port}/x"

        async def three_connections(session: aiohttp.ClientSession) -> None:
            for count in (1, 2, 3):
                async with session.get(url) as response:
                    assert response.status == 200, await response.text()
                # The upstream closes the idle connection (keepalive_timeout): the next request needs a new one.
                await eventually(lambda c=count: len(upstream.connections) == c, what="a connection per request")
                await asyncio.sleep(0.4)

        async with aiohttp.ClientSession() as session:
            if in_process:
                async with running_sidecar(policy) as sidecar:
                    await three_connections(session)
                    # Where reading a session leaks a copy of it (CPython before gh-116810's fix), only the
                    # first connection's is read: the next two resumed it. Elsewhere each one's is read.
                    reads = sidecar.tls_contexts["api"].session_reads
                    assert reads == (1 if SESSION_READ_LEAKS else 3), reads
            else:
                with sidecar_process(policy):
                    await three_connections(session)
        resumed = [upstream.resumed[c] for c in upstream.connections]
        assert resumed == [False, True, True], resumed


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
async def test_mtls_with_the_client_certificate_200_without_it_502_tls_error(
    ca: trustme.CA, server_cert: Leaf, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    """In TLS 1.2 the server refuses in the handshake; in 1.3 after it (an alert as the first answer)."""
    client = leaf(ca, tmp_path, "client", "trader-7")
    with threaded_tls_upstream(server_context(server_cert, client_ca=ca, max_version=version)) as server:
        url = f"https://localhost:{server.server_port}"
        ca_path = str(ca_file(ca, tmp_path / "ca.pem"))
        with_cert = {"ca_file": ca_path, "cert_file": str(client.cert_file), "key_file": str(client.key_file)}
        async with aiohttp.ClientSession() as session:
            async with running_sidecar(tls_policy(tmp_path, url, with_cert)) as sidecar:
                status, _, body = await through(session, sidecar)
                assert status == 200 and json.loads(body)["client"] == "trader-7"
            answer = await direct(session, url + "/x", client_context(ca, client))
            assert isinstance(answer, tuple) and answer[0] == 200
            assert json.loads(answer[1]) == json.loads(body)

            async with running_sidecar(tls_policy(tmp_path, url, {"ca_file": ca_path})) as sidecar:
                status, headers, body = await through(session, sidecar)
                assert (status, headers["x-sidecar-reason"]) == (502, "tls_error"), body
                assert failures(sidecar) == ({"tls_error": 1}, 1)
            answer = await direct(session, url + "/x", client_context(ca))
            assert isinstance(answer, str), f"the direct client without a certificate got {answer}"
            assert len(server.refused) >= 1


async def test_an_untrusted_certificate_is_502_tls_error_and_a_breaker_failure(
    server_cert: Leaf, tmp_path: Path
) -> None:
    """No ca_file: the system trust store, which does not know this CA."""
    async with tls_upstream(server_context(server_cert)) as upstream:
        async with running_sidecar(tls_policy(tmp_path, upstream.url("localhost"))) as sidecar:
            async with aiohttp.ClientSession() as session:
                status, headers, body = await through(session, sidecar)
                assert (status, headers["x-sidecar-reason"]) == (502, "tls_error")
                detail = json.loads(body)["detail"]
                assert "certificate verify failed: unable to get local issuer certificate" in detail
                # It counts as a connect failure: for the breaker (and the retry_on vocabulary, connect_error).
                assert failures(sidecar) == ({"tls_error": 1}, 1)
                answer = await direct(session, upstream.url("localhost") + "/x", client_context(None))
                assert isinstance(answer, str) and "unable to get local issuer certificate" in answer
        assert upstream.connections == [] or all(not r for r in upstream.resumed.values())


async def test_an_expired_certificate_is_502_tls_error(ca: trustme.CA, tmp_path: Path) -> None:
    old = expired(ca, tmp_path, "localhost")
    async with tls_upstream(server_context(old)) as upstream:
        policy = tls_policy(tmp_path, upstream.url("localhost"), {"ca_file": str(ca_file(ca, tmp_path / "ca.pem"))})
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            status, headers, body = await through(session, sidecar)
            assert (status, headers["x-sidecar-reason"]) == (502, "tls_error")
            assert "certificate has expired" in json.loads(body)["detail"]
            answer = await direct(session, upstream.url("localhost") + "/x", client_context(ca))
            assert isinstance(answer, str) and "certificate has expired" in answer


async def test_a_wrong_hostname_is_502_tls_error_until_server_name_names_the_certificate(
    ca: trustme.CA, tmp_path: Path
) -> None:
    cert = leaf(ca, tmp_path, "exchange", "api.exchange.test")
    ca_path = str(ca_file(ca, tmp_path / "ca.pem"))
    async with tls_upstream(server_context(cert)) as upstream, aiohttp.ClientSession() as session:
        url = upstream.url("127.0.0.1")  # an IP target: its certificate must name that IP, and it does not
        async with running_sidecar(tls_policy(tmp_path, url, {"ca_file": ca_path})) as sidecar:
            status, headers, body = await through(session, sidecar)
            assert (status, headers["x-sidecar-reason"]) == (502, "tls_error")
            assert "IP address mismatch" in json.loads(body)["detail"]
        answer = await direct(session, url + "/x", client_context(ca))
        assert isinstance(answer, str) and "mismatch" in answer

        fixed = {"ca_file": ca_path, "server_name": "api.exchange.test"}
        async with running_sidecar(tls_policy(tmp_path, url, fixed)) as sidecar:
            status, _, body = await through(session, sidecar)
            assert status == 200, body
        # Direct, with that name for SNI and verification: the same verdict.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", upstream.port, ssl=client_context(ca), server_hostname="api.exchange.test"
        )
        writer.write(b"GET /x HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        writer.close()


async def test_a_hostname_target_resolves_on_connect(ca: trustme.CA, server_cert: Leaf, tmp_path: Path) -> None:
    """``localhost`` is not resolved at load: the policy keeps the name, the connect resolves it (and would try
    each of its addresses); the certificate is verified against the name."""
    async with tls_upstream(server_context(server_cert)) as upstream:
        policy = tls_policy(tmp_path, upstream.url("localhost"), {"ca_file": str(ca_file(ca, tmp_path / "ca.pem"))})
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            assert sidecar.runtimes["api"].balancer.states[0].target.host == "localhost"
            assert sidecar.runtimes["api"].balancer.states[0].pool.server_hostname == "localhost"
            status, _, _ = await through(session, sidecar)
            assert status == 200


def _check(policy: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", str(policy)], check=False, capture_output=True, text=True, timeout=60
    )


def test_a_missing_or_bad_cert_file_is_a_check_error_at_its_line(ca: trustme.CA, tmp_path: Path) -> None:
    client = leaf(ca, tmp_path, "client", "trader-7")
    (tmp_path / "not-pem.crt").write_text("hello\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "admin: {listen: 127.0.0.1:19901}\n"
        "defaults:\n"
        "  tls:\n"
        "    cert_file: missing.crt\n"  # line 4: relative to the policy file's directory
        f"    key_file: {client.key_file.name}\n"
        "upstreams:\n"
        "  exchange:\n"
        "    listen: 127.0.0.1:19902\n"
        "    targets: [https://api.exchange.test]\n"
        "  quotes:\n"
        "    listen: 127.0.0.1:19903\n"
        "    targets: [https://quotes.exchange.test:8443]\n"
        "    tls:\n"
        "      ca_file: not-pem.crt\n"  # line 14
    )
    result = _check(policy)
    assert result.returncode == 1, result.stdout
    lines = result.stdout.splitlines()
    assert f"{policy}:4:5: defaults.tls.cert_file: cannot read missing.crt: No such file or directory" in lines
    assert any(
        line.startswith(f"{policy}:14:7: upstreams.quotes.tls.ca_file: not-pem.crt holds no PEM") for line in lines
    )
    assert len([line for line in lines if ":4:5:" in line]) == 1, "one error for the shared defaults, not one each"

    policy.write_text(policy.read_text().replace("missing.crt", client.cert_file.name).replace("not-pem.crt", "ca.pem"))
    ca_file(ca, tmp_path / "ca.pem")
    result = _check(policy)
    assert result.returncode == 0, result.stdout


def test_check_warns_about_verify_false_and_refuses_tls_on_a_tcp_upstream(tmp_path: Path) -> None:
    policy = write_policy(
        tmp_path / "policy.yaml",
        {
            "api": {"targets": ["https://127.0.0.1:9443"], "tls": {"verify": False}},
            "db": {"protocol": "tcp", "targets": ["127.0.0.1:5432"], "tls": {"ca_file": "ca.pem"}},
        },
    )
    result = _check(policy)
    assert result.returncode == 1
    assert "upstreams.api.tls.verify: warning: verify: false accepts any certificate" in result.stdout
    assert "upstreams.db.tls: a tcp upstream relays bytes and does not originate TLS" in result.stdout


async def test_a_reload_rereads_rotated_certificate_files_and_a_broken_one_keeps_the_old(
    ca: trustme.CA, server_cert: Leaf, tmp_path: Path
) -> None:
    """The server accepts client certificates of a second CA only. The files are rotated in place, the YAML is
    untouched: a reload reads them again. Then the key goes missing: that reload is refused and serving goes on."""
    other = trustme.CA()
    client = leaf(ca, tmp_path, "client", "old-identity")
    with threaded_tls_upstream(server_context(server_cert, client_ca=other)) as server:
        tls = {
            "ca_file": str(ca_file(ca, tmp_path / "ca.pem")),
            "cert_file": str(client.cert_file),
            "key_file": str(client.key_file),
        }
        policy = tls_policy(tmp_path, f"https://localhost:{server.server_port}", tls)
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            status, headers, _ = await through(session, sidecar)
            assert (status, headers["x-sidecar-reason"]) == (502, "tls_error")

            rotated = leaf(other, tmp_path, "rotated", "new-identity")
            shutil.copy(rotated.cert_file, client.cert_file)
            shutil.copy(rotated.key_file, client.key_file)
            assert await sidecar.reload("SIGHUP")
            status, _, body = await through(session, sidecar)
            assert status == 200 and json.loads(body)["client"] == "new-identity"

            context = sidecar.tls_contexts["api"]
            assert await sidecar.reload("SIGHUP")  # nothing changed: the context (and its sessions) is kept
            assert sidecar.tls_contexts["api"] is context

            client.key_file.unlink()
            assert not await sidecar.reload("SIGHUP")
            assert any("tls.key_file: cannot read" in e for e in sidecar.last_reload_error), sidecar.last_reload_error
            status, _, body = await through(session, sidecar)
            assert status == 200 and json.loads(body)["client"] == "new-identity"


async def test_the_health_check_speaks_tls_with_the_upstreams_context(
    ca: trustme.CA, server_cert: Leaf, tmp_path: Path
) -> None:
    health = {"path": "/health", "interval": "100ms", "timeout": "1s", "unhealthy_threshold": 1}
    async with tls_upstream(server_context(server_cert)) as upstream:
        trusted = {"ca_file": str(ca_file(ca, tmp_path / "ca.pem"))}
        async with running_sidecar(tls_policy(tmp_path, upstream.url("localhost"), trusted, health=health)) as sc:
            status = await eventually(
                lambda: sc.runtimes["api"].health.healthy is not None and sc.runtimes["api"].health
            )
            assert status.healthy, status.detail
        # Without the CA (the system store): the check fails the way a direct client does.
        async with running_sidecar(tls_policy(tmp_path, upstream.url("localhost"), {}, health=health)) as sc:
            status = await eventually(
                lambda: sc.runtimes["api"].health.healthy is not None and sc.runtimes["api"].health
            )
            assert not status.healthy
            assert "TLS failed: certificate verify failed: unable to get local issuer certificate" in status.detail
        async with aiohttp.ClientSession() as session:
            answer = await direct(session, upstream.url("localhost") + "/health", client_context(None))
            assert isinstance(answer, str) and "unable to get local issuer certificate" in answer


def test_the_policy_keeps_https_targets_and_their_tls_block(tmp_path: Path) -> None:
    policy = write_policy(
        tmp_path / "policy.yaml",
        {"api": {"targets": ["https://api.exchange.test", "https://[::1]:8443"], "tls": {"min_version": "TLSv1.3"}}},
    )
    from proxy.policy.loader import load_file

    config = load_file(policy)
    up = config.upstream("api")
    assert [str(t) for t in up.targets] == ["https://api.exchange.test", "https://[::1]:8443"]
    assert [t.port for t in up.targets] == [443, 8443]
    assert up.tls.min_version == "TLSv1.3" and up.tls.verify is True
    bad = yaml.safe_load(policy.read_text())
    bad["upstreams"]["api"]["tls"] = {"min_version": "TLSv1.1"}
    policy.write_text(yaml.safe_dump(bad))
    result = _check(policy)
    assert result.returncode == 1 and "must be one of TLSv1.2, TLSv1.3" in result.stdout


def test_the_exchange_example_checks_once_its_certificate_files_exist(ca: trustme.CA, tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "examples" / "exchange-api-mtls.yaml"
    client = leaf(ca, tmp_path, "client", "trader-7")
    env = {
        "EXCHANGE_CA_FILE": str(ca_file(ca, tmp_path / "ca.pem")),
        "EXCHANGE_CLIENT_CERT": str(client.cert_file),
        "EXCHANGE_CLIENT_KEY": str(client.key_file),
    }
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", str(example)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stdout
    assert "OK (2 upstreams: exchange-orders, market-data)" in result.stdout


def test_a_tls_block_in_defaults_is_ignored_by_tcp_upstreams_and_key_file_needs_cert_file() -> None:
    from proxy.policy.loader import load_text

    text = (
        "defaults:\n"
        "  tls: {server_name: api.exchange.test}\n"
        "upstreams:\n"
        "  api: {listen: 127.0.0.1:19911, targets: [https://10.0.0.1]}\n"
        "  db: {listen: 127.0.0.1:19912, protocol: tcp, targets: [10.0.0.2:5432]}\n"
    )
    config, issues = load_text(text)
    assert config is not None and not issues, issues
    assert config.upstream("api").tls.server_name == "api.exchange.test"
    config, issues = load_text(text.replace("{server_name: api.exchange.test}", "{key_file: client.key}"))
    assert config is None
    assert [str(i) for i in issues] == [
        "<string>:2:9: upstreams.api.tls.key_file: key_file needs cert_file (the certificate it signs)"
    ]
