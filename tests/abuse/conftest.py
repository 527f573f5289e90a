"""One real ``sidecar run`` subprocess per parser axis, shared by the abuse and fuzz modules (the ``stack``
fixture; what it is made of is in tests/support/abuse.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.abuse import PARSERS, TOKEN, UPSTREAM_OK, BackgroundLoop, Canary, Stack
from tests.support.raw import RecordingUpstream, _Recorder
from tests.support.sidecar import free_port, policy_listen, sidecar_process, write_policy


@pytest.fixture(scope="package", params=sorted(PARSERS))
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    background = BackgroundLoop()
    servers: list[asyncio.AbstractServer] = []

    async def serve(factory: Any, port: int) -> None:
        servers.append(await asyncio.get_running_loop().create_server(factory, "127.0.0.1", port))

    upstream = RecordingUpstream(port=free_port(), response=UPSTREAM_OK)
    evil = RecordingUpstream(port=free_port(), response=UPSTREAM_OK)
    canary_port = free_port()
    try:
        background.run(serve(lambda: _Recorder(upstream), upstream.port))
        background.run(serve(lambda: _Recorder(evil), evil.port))
        background.run(serve(Canary, canary_port))
        admin_port = free_port()
        policy = write_policy(
            tmp_path_factory.mktemp(request.param) / "abuse.yaml",
            {"svc": {"targets": [upstream.url]}, "evil": {"targets": [evil.url]}},
            defaults={
                "timeouts": {"connect": "500ms", "per_try": "1s", "total": "3s", "idle": "1s"},
                "breaker": {"failure_threshold": 1000},
            },
            admin_port=admin_port,
            http={"header_timeout": "2s"},
        )
        with sidecar_process(policy, env={**PARSERS[request.param], "SEAWALL_TEST_TOKEN": TOKEN}) as process:
            yield Stack(
                request.param,
                process,
                policy_listen(policy, "svc")[1],
                policy_listen(policy, "evil")[1],
                admin_port,
                upstream,
                evil,
                canary_port,
            )
    finally:
        for server in servers:
            background.loop.call_soon_threadsafe(server.close)
        with contextlib.suppress(Exception):
            background.stop()
