"""Two HTTP targets behind one listener: outlier ejection, its return, its cap, and retries on another target.

Ejection and breaker time run on a ``ManualClock``: the test moves time across the boundaries instead of
sleeping past them.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp

from proxy.resilience.clock import ManualClock
from tests.support.admin import breakers, metrics
from tests.support.sidecar import free_port, get, manual_sidecar, write_policy
from tests.support.upstream import scripted_upstream, status


def policy(tmp_path: Path, a: str, b: str, **overrides: object) -> Path:
    upstream: dict[str, object] = {
        "listen": f"127.0.0.1:{free_port()}",
        "targets": [a, b],
        "outlier": {
            "consecutive_failures": 2,
            "interval": "10s",
            "base_ejection": "30s",
            "max_ejection": "300s",
            "max_ejected_percent": 50,
        },
        "breaker": {"failure_threshold": 100},
    }
    upstream.update(overrides)
    return write_policy(tmp_path / "policy.yaml", {"api": upstream})


async def test_failing_target_is_ejected_and_returns_after_its_ejection_time(tmp_path: Path) -> None:
    clock = ManualClock()
    async with (
        scripted_upstream(status(500)) as bad,
        scripted_upstream() as good,
        manual_sidecar(policy(tmp_path, bad.url, good.url), clock) as sidecar,
        aiohttp.ClientSession() as session,
    ):
        # Round robin: bad, good, bad → its second failure in a row ejects it.
        codes = [(await get(session, sidecar, "api"))[0] for _ in range(3)]
        assert codes == [500, 200, 500]
        assert bad.hits == 2
        state = (await breakers(session, sidecar))["api"]
        bad_state = next(t for t in state["targets"] if t["target"] == bad.url)
        assert bad_state["ejected"] is True and bad_state["ejection_reason"] == "2_consecutive_5xx"
        assert bad_state["ejected_until"] is not None
        assert state["state"] == "closed"  # 2 failures: far from the breaker's threshold
        exposition = await metrics(session, sidecar)
        # Label order in the exposition is the library's business: look for both orders.
        for url, value in ((bad.url, "1.0"), (good.url, "0.0")):
            assert (
                f'sidecar_target_ejected{{target="{url}",upstream="api"}} {value}' in exposition
                or f'sidecar_target_ejected{{upstream="api",target="{url}"}} {value}' in exposition
            ), exposition

        # While ejected, all traffic goes to the healthy target.
        for _ in range(10):
            assert (await get(session, sidecar, "api"))[0] == 200
        assert bad.hits == 2 and good.hits == 11

        # One hair before its ejection time it is still out; at it, it is back in rotation.
        clock.advance(29.999)
        for _ in range(4):
            assert (await get(session, sidecar, "api"))[0] == 200
        assert bad.hits == 2
        clock.advance(0.001)
        codes = [(await get(session, sidecar, "api"))[0] for _ in range(4)]
        assert sorted(codes) == [200, 200, 500, 500]
        assert bad.hits == 4
        # Two more failures in a row: ejected again, now for twice as long (60 s).
        state = (await breakers(session, sidecar))["api"]
        bad_state = next(t for t in state["targets"] if t["target"] == bad.url)
        assert bad_state["ejected"] is True and bad_state["ejections"] == 2
        clock.advance(59.999)
        await get(session, sidecar, "api")
        assert bad.hits == 4
        clock.advance(0.001)
        for _ in range(2):
            await get(session, sidecar, "api")
        assert bad.hits == 5


async def test_with_both_targets_failing_ejection_stops_at_the_cap_and_the_breaker_decides(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    async with (
        scripted_upstream(status(500)) as a,
        scripted_upstream(status(500)) as b,
        manual_sidecar(
            policy(tmp_path, a.url, b.url, breaker={"failure_threshold": 6, "open_duration": "5s"}), clock
        ) as sidecar,
        aiohttp.ClientSession() as session,
    ):
        codes = [(await get(session, sidecar, "api"))[0] for _ in range(6)]
        assert codes == [500] * 6
        state = (await breakers(session, sidecar))["api"]
        ejected = [t for t in state["targets"] if t["ejected"]]
        assert len(ejected) == 1  # 50 % of two targets: the other stays in, however often it fails
        kept = next(t for t in state["targets"] if not t["ejected"])
        assert kept["consecutive_failures"] >= 2
        assert state["state"] == "open"
        # The breaker answers now, with no upstream attempt.
        hits = a.hits + b.hits
        code, headers, _ = await get(session, sidecar, "api")
        assert code == 503 and headers["x-sidecar-reason"] == "breaker_open"
        assert a.hits + b.hits == hits


async def test_a_retry_goes_to_the_other_target(tmp_path: Path) -> None:
    # Least-request with equal load picks at random, so without "exclude" a retry would land on the failing
    # target again about half the time; with it, every request that meets the bad target is saved.
    clock = ManualClock()
    async with (
        scripted_upstream(status(503)) as bad,
        scripted_upstream() as good,
        manual_sidecar(
            policy(
                tmp_path,
                bad.url,
                good.url,
                balance="least_request",
                outlier=None,
                retry={"max_retries": 1, "base_delay": 0, "max_delay": 0, "jitter": False, "budget": None},
            ),
            clock,
        ) as sidecar,
        aiohttp.ClientSession() as session,
    ):
        attempts = []
        for _ in range(24):
            code, headers, _ = await get(session, sidecar, "api")
            assert code == 200
            attempts.append(headers.get("x-sidecar-attempts", "1"))
        assert good.hits == 24
        assert bad.hits == attempts.count("2") > 0
