"""Protocol probes tell a listening-but-wrong server from a healthy one, where a bare connect cannot."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.eventually import eventually
from tests.support.servers import tcp_server
from tests.support.sidecar import running_sidecar, tcp_policy


def answering(reply: bytes) -> object:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(64)
        writer.write(reply)
        await writer.drain()

    return serve


@pytest.mark.parametrize(
    ("probe", "reply", "healthy"),
    [
        ("redis", b"+PONG\r\n", True),
        ("redis", b"-NOAUTH Authentication required.\r\n", True),  # it answered: up, just password-protected
        ("redis", b"-ERR unknown command\r\n", False),
        ("postgres", b"N", True),
        ("postgres", b"S", True),
        ("postgres", b"E", False),
        ("connect", b"anything", True),
    ],
)
async def test_probe_verdict(tmp_path: Path, probe: str, reply: bytes, healthy: bool) -> None:
    async with tcp_server(answering(reply)) as (_, port):  # type: ignore[arg-type]
        policy, _ = tcp_policy(
            tmp_path, "dep", [f"127.0.0.1:{port}"], health={"interval": "50ms", "timeout": "1s", "probe": probe}
        )
        async with running_sidecar(policy) as sidecar:
            status = sidecar.runtimes["dep"].health
            await eventually(lambda: status.healthy is not None, timeout=3)
            assert status.healthy is healthy, status.detail
            if not healthy:
                assert "unexpected answer" in status.detail
