"""Admin inputs an attacker or a typo controls: each gets a 400 with a named error, changes nothing, and never
breaks /health or /breakers for anyone after it; header text reaches the logs only as a structured field."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import pytest

from tests.support.admin import get_json
from tests.support.sidecar import admin_url, free_port, running_sidecar, write_policy
from tests.support.upstream import scripted_upstream


@pytest.mark.parametrize("ttl", ["300000000000s", "604801", "0", "-1s", "nan", "1e400"])
async def test_an_absurd_ttl_is_refused_and_the_reports_keep_working(tmp_path: Path, token: str, ttl: str) -> None:
    async with scripted_upstream() as up:
        policy = write_policy(tmp_path / "p.yaml", {"pay": {"listen": f"127.0.0.1:{free_port()}", "targets": [up.url]}})
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            admin = admin_url(sidecar)
            url = f"{admin}/breakers/pay/force-open?ttl={ttl}"
            async with session.post(url, headers={"Authorization": f"Bearer {token}"}) as response:
                assert response.status == 400
                assert (await response.json())["error"] == "invalid_ttl"
            assert sidecar.runtimes["pay"].breaker.override is None
            assert (await get_json(session, f"{admin}/health"))[0] == 200
            assert (await get_json(session, f"{admin}/breakers"))[0] == 200


async def test_the_longest_ttl_allowed_is_a_week(tmp_path: Path, token: str) -> None:
    async with scripted_upstream() as up:
        policy = write_policy(tmp_path / "p.yaml", {"pay": {"listen": f"127.0.0.1:{free_port()}", "targets": [up.url]}})
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            url = f"{admin_url(sidecar)}/breakers/pay/force-open?ttl=604800"
            async with session.post(url, headers={"Authorization": f"Bearer {token}"}) as response:
                assert response.status == 200
            status, body = await get_json(session, f"{admin_url(sidecar)}/breakers")
            assert status == 200 and body["pay"]["override"] == "force_open" and body["pay"]["override_until"]


@pytest.mark.parametrize(("raw", "status"), [(b"Bearer \xff\xfe", b"403"), (b"Bearer t\x01ken", b"400")])
async def test_a_token_that_is_not_text_is_refused_not_a_crash(
    tmp_path: Path, token: str, raw: bytes, status: bytes
) -> None:
    async with scripted_upstream() as up:
        policy = write_policy(tmp_path / "p.yaml", {"pay": {"listen": f"127.0.0.1:{free_port()}", "targets": [up.url]}})
        async with running_sidecar(policy) as sidecar:
            address = sidecar.config.admin.listen  # type: ignore[union-attr]
            reader, writer = await asyncio.open_connection(address.host, address.port)
            writer.write(
                b"POST /breakers/pay/force-open HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: %s\r\n"
                b"Content-Length: 0\r\nConnection: close\r\n\r\n" % (address.host.encode(), address.port, raw)
            )
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert answer.split(b" ", 2)[1] == status, answer[:200]  # 403 wrong_token; aiohttp refuses control bytes
            assert sidecar.runtimes["pay"].breaker.override is None


async def test_an_operator_name_is_validated_and_kept_out_of_the_message_text(
    tmp_path: Path, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with scripted_upstream() as up:
        policy = write_policy(tmp_path / "p.yaml", {"pay": {"listen": f"127.0.0.1:{free_port()}", "targets": [up.url]}})
        async with running_sidecar(policy) as sidecar, aiohttp.ClientSession() as session:
            url = f"{admin_url(sidecar)}/breakers/pay/force-open"
            auth = {"Authorization": f"Bearer {token}"}
            async with session.post(url, headers={**auth, "X-Operator": "mallory reset by admin"}) as response:
                assert response.status == 400 and (await response.json())["error"] == "invalid_operator"
            assert sidecar.runtimes["pay"].breaker.override is None
            with caplog.at_level(logging.WARNING, logger="seawall.admin"):
                async with session.post(url, headers={**auth, "X-Operator": "oncall.alice"}) as response:
                    assert response.status == 200
            (record,) = [r for r in caplog.records if getattr(r, "event", "") == "breaker_override"]
            assert record.operator == "oncall.alice"  # type: ignore[attr-defined]
            assert "alice" not in record.getMessage()
