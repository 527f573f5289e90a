"""Live reload, in-process: what survives a reload, what changes, and what a broken file leaves alone.

The sidecar runs on the test's event loop, so states are read straight from its runtimes; the subprocess tests
next door cover signals, the file watch and steady traffic end to end.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import proxy.server
from proxy.server import Sidecar
from tests.support.eventually import eventually
from tests.support.sidecar import admin_url, free_port, running_sidecar, write_policy
from tests.support.upstream import delay, scripted_upstream, status


def ups(port: int, target: str, **extra: Any) -> dict[str, Any]:
    return {"listen": f"127.0.0.1:{port}", "targets": [target], **extra}


async def get(session: aiohttp.ClientSession, port: int, path: str = "/") -> tuple[int, str]:
    async with session.get(f"http://127.0.0.1:{port}{path}") as response:
        await response.read()
        return response.status, response.headers.get("x-sidecar-reason", "")


def state(sidecar: Sidecar, name: str) -> str:
    return sidecar.runtimes[name].effective_state().value


async def test_good_reload_keeps_unchanged_breakers_and_applies_new_thresholds(tmp_path: Path) -> None:
    async with (
        scripted_upstream(status(500)) as down,
        scripted_upstream(status(500)) as flaky,
        scripted_upstream() as ok,
        aiohttp.ClientSession() as session,
    ):
        *listen, admin = [free_port() for _ in range(5)]
        ports = dict(zip(("down", "flaky", "ok", "added"), listen, strict=True))
        upstreams = {
            "down": ups(ports["down"], down.url, breaker={"failure_threshold": 2}),
            "flaky": ups(ports["flaky"], flaky.url, breaker={"failure_threshold": 5}),
            "ok": ups(ports["ok"], ok.url),
        }
        policy = write_policy(tmp_path / "policy.yaml", upstreams, admin_port=admin)
        async with running_sidecar(policy) as sidecar:
            for _ in range(2):
                assert (await get(session, ports["down"]))[0] == 500
            assert await get(session, ports["down"]) == (503, "breaker_open")
            for _ in range(2):
                assert (await get(session, ports["flaky"]))[0] == 500
            assert state(sidecar, "flaky") == "closed"
            down_stats = sidecar.runtimes["down"].stats

            # down: other keys change, breaker does not. flaky: threshold 5 → 2. added: a new listener.
            upstreams["down"]["timeouts"] = {"connect": "300ms", "per_try": "1s", "total": "3s"}
            upstreams["flaky"]["breaker"] = {"failure_threshold": 2}
            upstreams["added"] = ups(ports["added"], ok.url)
            write_policy(policy, upstreams, admin_port=admin)
            assert await sidecar.reload("test") is True

            assert state(sidecar, "down") == "open"  # kept, with its counters
            assert sidecar.runtimes["down"].stats is down_stats
            hits = down.hits
            assert await get(session, ports["down"]) == (503, "breaker_open")
            assert down.hits == hits
            # The new breaker starts from zero failures: two more open it (five would have been needed before).
            for _ in range(2):
                assert (await get(session, ports["flaky"]))[0] == 500
            assert state(sidecar, "flaky") == "open"
            assert await get(session, ports["added"]) == (200, "")
            assert sidecar.process_stats.reloads == {"success": 1, "failure": 0}


async def test_removed_listener_drains_in_flight_requests_then_stops(tmp_path: Path) -> None:
    async with scripted_upstream(delay(0.6)) as slow, scripted_upstream() as ok, aiohttp.ClientSession() as session:
        keep, gone, admin = [free_port() for _ in range(3)]
        policy = write_policy(
            tmp_path / "policy.yaml", {"keep": ups(keep, ok.url), "gone": ups(gone, slow.url)}, admin_port=admin
        )
        async with running_sidecar(policy) as sidecar:
            assert (await get(session, keep))[0] == 200  # opens a keep-alive connection to reuse after
            in_flight = asyncio.create_task(get(session, gone))
            await eventually(lambda: slow.hits == 1)
            write_policy(policy, {"keep": ups(keep, ok.url)}, admin_port=admin)
            assert await sidecar.reload("test") is True
            assert await in_flight == (200, "")  # finished on the retired listener
            assert (await get(session, keep))[0] == 200

            async def refused() -> bool:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", gone)
                except OSError:
                    return True
                writer.close()
                return False

            await eventually(refused, timeout=5, interval=0.05, what="the removed listener refusing connections")
            assert "gone" not in sidecar.listeners


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda t: t.replace("failure_threshold: 3", "failure_threshold: -3"),
            "upstreams.api.breaker.failure_threshold: must be ≥ 1, got -3",
        ),
        (
            lambda t: t.replace("failure_threshold: 3", "failure_treshold: 3"),
            "upstreams.api.breaker.failure_treshold: unknown key (did you mean 'failure_threshold'?)",
        ),
        (lambda t: t.replace("failure_threshold: 3", "failure_threshold: [3"), "<root>: invalid YAML"),
        (
            lambda t: t.replace(
                "    breaker:\n",
                "    rate_limit:\n      limits: [{requests: 10, per: 1s, window: rolling}]\n    breaker:\n",
            ),
            "policy.yaml:24:40: upstreams.api.rate_limit.limits[0].window: must be one of sliding, fixed",
        ),
    ],
)
async def test_broken_reload_keeps_the_running_policy(tmp_path: Path, edit: Any, expected: str) -> None:
    async with scripted_upstream() as ok, aiohttp.ClientSession() as session:
        port, admin = [free_port() for _ in range(2)]
        policy = write_policy(
            tmp_path / "policy.yaml", {"api": ups(port, ok.url, breaker={"failure_threshold": 3})}, admin_port=admin
        )
        async with running_sidecar(policy) as sidecar:
            before = sidecar.config
            loaded = sidecar.loaded
            assert loaded is not None
            policy.write_text(edit(policy.read_text()))
            assert await sidecar.reload("test") is False
            assert sidecar.config is before and sidecar.loaded is loaded
            assert sidecar.process_stats.reloads == {"success": 0, "failure": 1}
            assert any(expected in line for line in sidecar.last_reload_error), sidecar.last_reload_error
            assert all(line.startswith(f"{policy}:") for line in sidecar.last_reload_error)
            assert await get(session, port) == (200, "")

            async def config_info() -> dict[str, Any]:
                async with session.get(admin_url(sidecar) + "/health") as response:
                    info: dict[str, Any] = json.loads(await response.read())["config"]
                    return info

            # The admin thread may answer from a report published just before the reload.
            info = await eventually(
                config_info,
                until=lambda info: bool(info["last_reload_errors"]),
                timeout=3,
                interval=0.05,
                what="/health showing the rejected reload",
            )
            assert info["sha256"] == loaded.sha256
            assert any(expected in line for line in info["last_reload_errors"])


async def test_health_shows_the_loaded_files_hash_and_time(tmp_path: Path) -> None:
    async with scripted_upstream() as ok, aiohttp.ClientSession() as session:
        port, admin = [free_port() for _ in range(2)]
        policy = write_policy(tmp_path / "policy.yaml", {"api": ups(port, ok.url)}, admin_port=admin)
        async with running_sidecar(policy) as sidecar:

            async def config_info() -> dict[str, Any]:
                async with session.get(admin_url(sidecar) + "/health") as response:
                    info: dict[str, Any] = json.loads(await response.read())["config"]
                    return info

            first = await config_info()
            assert first["path"] == str(policy)
            assert first["sha256"] == hashlib.sha256(policy.read_bytes()).hexdigest()
            write_policy(policy, {"api": ups(port, ok.url, breaker={"failure_threshold": 9})}, admin_port=admin)
            assert await sidecar.reload("test")
            second = await eventually(  # admin may answer from cache
                config_info,
                until=lambda info: info["sha256"] != first["sha256"],
                timeout=3,
                interval=0.05,
                what="/health showing the new file's sha256",
            )
            assert second["sha256"] == hashlib.sha256(policy.read_bytes()).hexdigest()
            assert second["loaded_at"] >= first["loaded_at"]


class WatcherLooks:
    """Counts reads of the policy file — the watcher reads it once per look — so a test can wait until the
    watcher has looked at a file state, instead of sleeping and hoping it did."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = proxy.server._read

        def counting(path: str) -> bytes:
            self.count += 1
            return real(path)

        monkeypatch.setattr(proxy.server, "_read", counting)

    async def more(self, looks: int) -> None:
        """Wait for ``looks`` more reads (a change needs two looks to be reloaded, so three see any)."""
        target = self.count + looks
        await eventually(lambda: self.count >= target, timeout=5, what=f"{looks} more looks of the watcher")


async def test_watch_debounces_a_multi_step_save_into_one_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    looks = WatcherLooks(monkeypatch)
    async with scripted_upstream() as ok:
        port, admin = [free_port() for _ in range(2)]
        policy = write_policy(tmp_path / "policy.yaml", {"api": ups(port, ok.url)}, admin_port=admin)
        async with running_sidecar(policy) as sidecar:
            sidecar._spawn(sidecar.watch(interval=0.05))
            final = write_policy(
                tmp_path / "next.yaml", {"api": ups(port, ok.url, breaker={"failure_threshold": 7})}, admin_port=admin
            ).read_text()
            # An editor's save: truncate, write part, write the rest — all within one look of the watcher.
            policy.write_text("")
            policy.write_text(final[: len(final) // 2])
            policy.write_text(final)
            await eventually(lambda: sidecar.process_stats.reloads["success"] == 1, timeout=5)
            assert sidecar.config is not None
            assert sidecar.config.upstream("api").breaker.failure_threshold == 7
            # Unchanged content afterwards (and a touch) triggers nothing more.
            policy.write_text(final)
            await looks.more(3)
            assert sidecar.process_stats.reloads == {"success": 1, "failure": 0}


async def test_sighup_style_reload_is_not_repeated_by_the_watcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    looks = WatcherLooks(monkeypatch)
    async with scripted_upstream() as ok:
        port, admin = [free_port() for _ in range(2)]
        policy = write_policy(tmp_path / "policy.yaml", {"api": ups(port, ok.url)}, admin_port=admin)
        async with running_sidecar(policy) as sidecar:
            sidecar._spawn(sidecar.watch(interval=0.05))
            write_policy(policy, {"api": ups(port, ok.url, breaker={"failure_threshold": 4})}, admin_port=admin)
            assert await sidecar.reload("SIGHUP")
            await looks.more(3)
            assert sidecar.process_stats.reloads == {"success": 1, "failure": 0}
