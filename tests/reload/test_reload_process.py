"""Live reload of a real ``sidecar run`` process under steady traffic: SIGHUP, the file watch, broken edits.

A client loop sends a request every few milliseconds through one listener for the whole test (bounded by a count
and a deadline); every one of them must succeed, whatever the reloads around it do.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from proxy.policy.loader import load_text
from tests.support.eventually import eventually
from tests.support.sidecar import SidecarProcess, free_port, sidecar_process, write_policy
from tests.support.upstream import delay, scripted_upstream, status

RATE = 0.01  # seconds between requests of the steady load
MAX_REQUESTS = 3000  # bound on the load loop whatever happens


def ups(port: int, target: str, **extra: Any) -> dict[str, Any]:
    return {"listen": f"127.0.0.1:{port}", "targets": [target], **extra}


@contextlib.asynccontextmanager
async def steady_load(session: aiohttp.ClientSession, port: int) -> AsyncIterator[Counter[str]]:
    """Requests at a steady rate until the block ends; yields a tally of outcomes ("200", "503 overload", …)."""
    tally: Counter[str] = Counter()
    stop = asyncio.Event()

    async def loop() -> None:
        for _ in range(MAX_REQUESTS):
            if stop.is_set():
                return
            try:
                async with session.get(f"http://127.0.0.1:{port}/load") as response:
                    await response.read()
                    tally[f"{response.status} {response.headers.get('x-sidecar-reason', '')}".strip()] += 1
            except aiohttp.ClientError as exc:
                tally[type(exc).__name__] += 1
            await asyncio.sleep(RATE)

    task = asyncio.create_task(loop())
    try:
        yield tally
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def get(session: aiohttp.ClientSession, port: int) -> tuple[int, str]:
    async with session.get(f"http://127.0.0.1:{port}/") as response:
        await response.read()
        return response.status, response.headers.get("x-sidecar-reason", "")


async def admin_json(session: aiohttp.ClientSession, proc: SidecarProcess, path: str) -> Any:
    async with session.get(proc.admin + path) as response:
        return json.loads(await response.read())


async def reloads(session: aiohttp.ClientSession, proc: SidecarProcess) -> dict[str, int]:
    async with session.get(proc.admin + "/metrics") as response:
        text = await response.text()
    found = dict(re.findall(r'^sidecar_config_reloads_total\{result="(\w+)"\} (\d+)', text, re.M))
    return {k: int(float(v)) for k, v in found.items()}


def logged_errors(proc: SidecarProcess) -> list[str]:
    lines = []
    for raw in proc.log().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(raw)
            if entry.get("event") == "config_error":
                lines.append(entry["msg"])
    return lines


async def test_sighup_reload_under_load(tmp_path: Path) -> None:
    async with (
        scripted_upstream() as ok,
        scripted_upstream(status(500)) as down,
        scripted_upstream(status(500)) as flaky,
        scripted_upstream(delay(0.8)) as slow,
        aiohttp.ClientSession() as session,
    ):
        *listen, admin = [free_port() for _ in range(6)]
        port = dict(zip(("api", "down", "flaky", "gone", "added"), listen, strict=True))
        upstreams = {
            "api": ups(port["api"], ok.url),
            "down": ups(port["down"], down.url, breaker={"failure_threshold": 2}),
            "flaky": ups(port["flaky"], flaky.url, breaker={"failure_threshold": 5}),
            "gone": ups(port["gone"], slow.url),
        }
        policy = write_policy(tmp_path / "policy.yaml", upstreams, admin_port=admin)
        with sidecar_process(policy, "--no-watch") as proc:
            async with steady_load(session, port["api"]) as tally:
                for _ in range(2):
                    assert (await get(session, port["down"]))[0] == 500
                assert await get(session, port["down"]) == (503, "breaker_open")
                for _ in range(2):
                    assert (await get(session, port["flaky"]))[0] == 500
                in_flight = asyncio.create_task(get(session, port["gone"]))
                await eventually(
                    lambda: slow.hits > 0, timeout=5, interval=0.01, what="the slow request reaching its upstream"
                )

                # The edit: down keeps its breaker policy, flaky's threshold drops to 2, gone goes, added comes.
                upstreams["down"]["timeouts"] = {"connect": "300ms", "per_try": "1s", "total": "3s"}
                upstreams["flaky"]["breaker"] = {"failure_threshold": 2}
                del upstreams["gone"]
                upstreams["added"] = ups(port["added"], ok.url)
                write_policy(policy, upstreams, admin_port=admin)
                new_sha = hashlib.sha256(policy.read_bytes()).hexdigest()
                proc.signal(signal.SIGHUP)

                async def applied() -> bool:
                    return bool((await admin_json(session, proc, "/health"))["config"]["sha256"] == new_sha)

                await eventually(applied, timeout=8.0, interval=0.05, what="/health showing the new sha256")
                assert await in_flight == (200, "")  # the removed listener drained it
                hits = down.hits
                assert await get(session, port["down"]) == (503, "breaker_open")  # still open
                assert down.hits == hits
                for _ in range(2):
                    assert (await get(session, port["flaky"]))[0] == 500
                assert await get(session, port["flaky"]) == (503, "breaker_open")  # the new threshold
                assert flaky.hits == 4
                assert await get(session, port["added"]) == (200, "")

                async def gone_refused() -> bool:
                    try:
                        _, writer = await asyncio.open_connection("127.0.0.1", port["gone"])
                    except OSError:
                        return True
                    writer.close()
                    return False

                await eventually(
                    gone_refused, timeout=8.0, interval=0.05, what="the removed listener refusing connections"
                )
                assert await reloads(session, proc) == {"success": 1, "failure": 0}
                after = tally.total()  # a little steady traffic after the reload too
                await eventually(lambda: tally.total() >= after + 10, what="ten more steady requests after the reload")
            assert set(tally) == {"200"}, tally
            assert tally["200"] >= 20


async def test_broken_edits_are_rejected_with_the_exact_line_and_traffic_continues(tmp_path: Path) -> None:
    async with scripted_upstream() as ok, aiohttp.ClientSession() as session:
        port, admin = [free_port() for _ in range(2)]
        policy = write_policy(
            tmp_path / "policy.yaml", {"api": ups(port, ok.url, breaker={"failure_threshold": 3})}, admin_port=admin
        )
        good = policy.read_text()
        good_sha = hashlib.sha256(good.encode()).hexdigest()
        # defaults say failure_threshold: 5, so this is the upstream's own line
        (line_no,) = [i for i, line in enumerate(good.splitlines(), 1) if "failure_threshold: 3" in line]
        edits = {
            "negative threshold": good.replace("failure_threshold: 3", "failure_threshold: -3"),
            "typo'd key": good.replace("failure_threshold: 3", "failure_treshold: 3"),
            "bad YAML": good.replace("failure_threshold: 3", "failure_threshold: [3"),
        }
        with sidecar_process(policy, "--no-watch") as proc:
            async with steady_load(session, port) as tally:
                for failures, (name, text) in enumerate(edits.items(), 1):
                    policy.write_text(text)
                    expected = [str(i) for i in load_text(text, str(policy))[1] if i.severity == "error"]
                    assert expected, name
                    proc.signal(signal.SIGHUP)

                    async def rejected(count: int = failures) -> bool:
                        return (await reloads(session, proc)).get("failure") == count

                    await eventually(
                        rejected, timeout=8.0, interval=0.05, what="the broken reload counted as a failure"
                    )
                    logged = logged_errors(proc)
                    for line in expected:
                        assert line in logged, (name, line, logged)
                    if name != "bad YAML":  # a YAML error is reported where the parser gave up
                        assert any(line.startswith(f"{policy}:{line_no}:") for line in expected), expected
                    health = await admin_json(session, proc, "/health")
                    assert health["config"]["sha256"] == good_sha
                    assert health["config"]["last_reload_errors"] == expected
                assert await reloads(session, proc) == {"success": 0, "failure": 3}
                # Fixing the file makes it load again.
                policy.write_text(good.replace("failure_threshold: 3", "failure_threshold: 4"))
                proc.signal(signal.SIGHUP)

                async def recovered() -> bool:
                    return (await reloads(session, proc)).get("success") == 1

                await eventually(recovered, timeout=8.0, interval=0.05, what="the fixed file reloaded")
            assert set(tally) == {"200"}, tally


async def test_file_watch_reload(tmp_path: Path) -> None:
    async with scripted_upstream() as ok, scripted_upstream(status(500)) as flaky, aiohttp.ClientSession() as session:
        api, bad, admin = [free_port() for _ in range(3)]
        upstreams = {"api": ups(api, ok.url), "flaky": ups(bad, flaky.url, breaker={"failure_threshold": 5})}
        policy = write_policy(tmp_path / "policy.yaml", upstreams, admin_port=admin)
        with sidecar_process(policy) as proc:  # the watch is on by default
            async with steady_load(session, api) as tally:
                upstreams["flaky"]["breaker"] = {"failure_threshold": 1}
                text = write_policy(tmp_path / "next.yaml", upstreams, admin_port=admin).read_text()
                policy.write_text(text[: len(text) // 3])  # an editor's first, partial write…
                policy.write_text(text)  # …and the rest, before the watcher's second look

                async def reloaded() -> bool:
                    return (await reloads(session, proc)).get("success") == 1

                await eventually(reloaded, timeout=8.0, interval=0.05, what="the watcher's reload counted")
                assert (await get(session, bad))[0] == 500
                assert await get(session, bad) == (503, "breaker_open")  # threshold 1 now
                assert (await reloads(session, proc)) == {"success": 1, "failure": 0}
            assert set(tally) == {"200"}, tally
