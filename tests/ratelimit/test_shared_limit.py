"""The Redis-shared rate-limit backend against a real ``redis-server``: one budget for every sidecar on a key.

Windows are short (fractions of a second) and waits come from Redis' own clock, so the tests assert the numbers
Redis computed (a fixed window's wait ends on a whole second of Redis time) instead of sleeping past edges.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from proxy.resilience.clock import SystemClock
from proxy.resilience.ratelimit import LimitSpec, LocalBackend, RateGate, Refusal, SharedState
from proxy.upstream.redis_script import SCRIPT_SHA
from proxy.upstream.shared_limit import RedisBackend
from tests.ratelimit import burst_worker
from tests.support.eventually import eventually
from tests.support.servers import RedisServer

REPO = Path(__file__).resolve().parents[2]


def make(
    server: RedisServer,
    specs: Sequence[LimitSpec],
    *,
    key: str = "exchange-ip-1",
    share: int = 1,
    timeout: float = 0.25,
    retry_interval: float = 1.0,
    on_change: Callable[[SharedState], None] | None = None,
) -> RedisBackend:
    """A backend as ``sidecar run`` would build it; the default timeout is generous for a loaded CI machine,
    the fallback tests set the real 10 ms."""
    return RedisBackend(
        specs,
        url=f"redis://127.0.0.1:{server.port}/0",
        key=key,
        fallback=LocalBackend(specs, epoch_offset=time.time() - time.monotonic(), share=share),
        clock=SystemClock(),
        timeout=timeout,
        retry_interval=retry_interval,
        on_change=on_change,
        upstream="exchange",
    )


@asynccontextmanager
async def backends(
    server: RedisServer, specs: Sequence[LimitSpec], n: int = 1, **kw: object
) -> AsyncIterator[list[RedisBackend]]:
    made = [make(server, specs, **kw) for _ in range(n)]  # type: ignore[arg-type]
    try:
        for backend in made:
            assert await backend.connect()
        yield made
    finally:
        for backend in made:
            await backend.close()


@asynccontextmanager
async def client(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.Redis(port=server.port, decode_responses=True)
    try:
        yield redis
    finally:
        await redis.aclose()


async def take(backend: RedisBackend, weight: int = 1, route: str | None = None) -> tuple[bool, float, Refusal | None]:
    verdict = await backend.take(weight, route, time.monotonic())
    return verdict.granted, verdict.wait, verdict.reason


# -- one backend: the semantics, counted in Redis ----------------------------------------------------------------


async def test_a_sliding_limit_grants_its_requests_then_waits_for_the_oldest_send(redis_server: RedisServer) -> None:
    async with backends(redis_server, [LimitSpec(5, 0.5)]) as (backend,):
        first = None
        for _ in range(5):
            assert (await take(backend))[0]
            first = first or backend.redis_time
        granted, wait, reason = await take(backend)
        assert not granted and reason is Refusal.RATE_LIMITED
        # the wait ends exactly when the first send has been in the window for 0.5 s (Redis' clock, µs)
        assert backend.redis_time + wait == pytest.approx(first + 0.5, abs=2e-6)
        assert backend.snapshot(time.monotonic()).limits[0].left == 0
        await asyncio.sleep(wait)
        assert (await take(backend))[0]
        assert backend.state is SharedState.SHARED


async def test_weights_count_and_a_refused_request_spends_nothing(redis_server: RedisServer) -> None:
    async with backends(redis_server, [LimitSpec(10, 5.0)]) as (backend,):
        assert (await take(backend, 4))[0]
        assert (await take(backend, 4))[0]
        assert not (await take(backend, 3))[0]  # 8 + 3 > 10: refused, nothing spent ...
        assert (await take(backend, 2))[0]  # ... so 2 still fit
        assert backend.snapshot(time.monotonic()).limits[0].left == 0
        granted, wait, reason = await take(backend, 11)
        assert (granted, wait, reason) == (False, math.inf, Refusal.RATE_LIMITED)  # never fits: no Redis call
        assert backend.take_now(11, None, time.monotonic()) is not None


async def test_a_fixed_limit_counts_calendar_windows_of_redis_time(redis_server: RedisServer) -> None:
    async with backends(redis_server, [LimitSpec(3, 1.0, fixed=True)]) as (backend,):
        for _ in range(7):  # 3 fit in a window; 7 reach a refusal even if a window turns meanwhile
            ok, wait, reason = await take(backend)
            if not ok:
                break
        assert not ok and reason is Refusal.RATE_LIMITED
        ends = backend.redis_time + wait
        assert ends == pytest.approx(round(ends), abs=2e-6)  # the next whole second of Redis' clock
        assert 0 < wait <= 1.0
        await asyncio.sleep(wait)
        assert (await take(backend))[0]


async def test_every_limit_that_applies_must_allow_and_scopes_count_their_route_only(
    redis_server: RedisServer,
) -> None:
    specs = [LimitSpec(3, 5.0), LimitSpec(2, 5.0, scope="depth"), LimitSpec(100, 60.0, fixed=True)]
    async with backends(redis_server, specs) as (backend,):
        assert (await take(backend, route="depth"))[0]
        assert (await take(backend, route="depth"))[0]
        assert not (await take(backend, route="depth"))[0]  # its own limit: 2
        assert (await take(backend, route="ticker"))[0]  # another route: the unscoped limit has 1 left
        assert not (await take(backend, route="ticker"))[0]
        left = [state.left for state in backend.snapshot(time.monotonic()).limits]
        assert left == [0, 0, 97]  # the refused takes spent on no limit, not even the fixed one
        assert (await take(backend, 3, route="depth"))[1] == math.inf  # 3 > the depth limit's 2: never


async def test_the_budget_is_one_for_every_backend_on_the_key_and_apart_for_another_key(
    redis_server: RedisServer,
) -> None:
    async with backends(redis_server, [LimitSpec(4, 5.0)], n=2) as (a, b):
        assert (await take(a))[0] and (await take(b))[0] and (await take(a))[0] and (await take(b))[0]
        assert not (await take(a))[0] and not (await take(b))[0]
        async with backends(redis_server, [LimitSpec(4, 5.0)], key="exchange-ip-2") as (other,):
            assert (await take(other))[0]


async def test_a_cool_down_stops_this_process_at_once_and_every_other_once_written(
    redis_server: RedisServer,
) -> None:
    async with backends(redis_server, [LimitSpec(100, 1.0)], n=2) as (a, b), client(redis_server) as redis:
        now = time.monotonic()
        a.cool_down(0.4, now)
        verdict = a.take_now(1, None, now)  # no I/O: refused by what this process knows
        assert verdict is not None and verdict.reason is Refusal.UPSTREAM_COOLDOWN
        assert verdict.wait == pytest.approx(0.4)
        ends = int(await eventually(lambda: redis.get("seawall:rl:{exchange-ip-1}:cool"), what="the cool-down written"))
        granted, wait, reason = await take(b)
        assert not granted and reason is Refusal.UPSTREAM_COOLDOWN
        assert b.redis_time + wait == pytest.approx(ends / 1e6, abs=2e-6)  # Redis' clock: one end for all
        assert b.snapshot(time.monotonic()).cooldown_left > 0  # b learnt it: its next takes need no Redis
        a.cool_down(0.1, time.monotonic())  # shorter: changes nothing
        await eventually(lambda: not a._writes, what="the write done")
        assert int(await redis.get("seawall:rl:{exchange-ip-1}:cool")) == ends
        await asyncio.sleep(wait)
        await eventually(lambda: take(b), until=lambda r: r[0], timeout=2, what="granted after the cool-down")


async def test_observed_usage_is_applied_to_the_shared_windows(redis_server: RedisServer) -> None:
    specs = [LimitSpec(10, 5.0), LimitSpec(10, 3600.0, fixed=True)]  # an hour: the window will not turn meanwhile
    async with backends(redis_server, specs, n=2) as (a, b), client(redis_server) as redis:
        now = time.monotonic()
        a.observe(0, now, used=7)  # someone else spent 7 of the sliding limit
        a.observe(1, now, remaining=2)  # no reset: used = 10 - 2 of the fixed one
        await eventually(lambda: not a._writes, what="the writes done")
        assert await redis.get("seawall:rl:{exchange-ip-1}:s:5+0:*:n") == "7"
        assert (await take(b, 2))[0]
        assert not (await take(b))[0]  # the fixed limit: 8 + 2 = 10
        assert [s.left for s in b.snapshot(time.monotonic()).limits] == [1, 0]
        a.observe(0, now, used=3)  # below the count: changes nothing, a correction only slows down
        await eventually(lambda: not a._writes, what="the write done")
        assert await redis.get("seawall:rl:{exchange-ip-1}:s:5+0:*:n") == "9"
        a.observe(0, now, used=25)  # past the limit: full for a whole window from now, in one entry
        await eventually(lambda: not a._writes, what="the write done")
        assert await redis.get("seawall:rl:{exchange-ip-1}:s:5+0:*:n") == "10"
        assert await redis.zcard("seawall:rl:{exchange-ip-1}:s:5+0:*") == 1
        granted, wait, _ = await take(b)
        assert not granted and wait > 4.9  # the longest wait of all: here the fixed hour's end
        assert [s.left for s in b.snapshot(time.monotonic()).limits] == [0, 0]


async def test_a_cap_from_remaining_and_reset_holds_for_every_backend(redis_server: RedisServer) -> None:
    async with backends(redis_server, [LimitSpec(50, 5.0)], n=2) as (a, b):
        now = time.monotonic()
        a.observe(0, now, remaining=2, reset=0.3)
        await eventually(lambda: not a._writes, what="the cap written")
        assert (await take(b))[0] and (await take(b))[0]
        granted, wait, reason = await take(b)
        assert not granted and reason is Refusal.RATE_LIMITED and 0 < wait <= 0.3
        assert (await take(a))[0] is False  # a's cap, written to Redis, spent by b
        await asyncio.sleep(wait)
        assert (await take(b))[0]


async def test_a_burst_of_concurrent_takes_goes_in_a_few_round_trips_on_one_connection(
    redis_server: RedisServer,
) -> None:
    async with backends(redis_server, [LimitSpec(50, 5.0)]) as (backend,), client(redis_server) as redis:
        await redis.config_resetstat()
        results = await asyncio.gather(*(take(backend) for _ in range(200)))
        assert sum(granted for granted, _, _ in results) == 50  # exactly the limit, the rest refused
        assert all(wait > 0 and reason is Refusal.RATE_LIMITED for granted, wait, reason in results if not granted)
        calls = (await redis.info("commandstats"))["cmdstat_evalsha"]["calls"]
        assert calls <= 10  # 200 takes: the first alone, the others together as one call of the script or a few
        assert len(await redis.client_list()) <= 2  # this test's client and the backend's one connection
        assert backend.snapshot(time.monotonic()).limits[0].left == 0


async def test_a_redis_that_lost_the_script_gets_it_again(redis_server: RedisServer) -> None:
    async with backends(redis_server, [LimitSpec(5, 5.0)]) as (backend,), client(redis_server) as redis:
        assert (await take(backend))[0]
        await redis.script_flush()
        assert (await redis.script_exists(SCRIPT_SHA)) == [False]
        assert (await take(backend))[0]  # EVALSHA → NOSCRIPT → EVAL, in one take
        assert (await redis.script_exists(SCRIPT_SHA)) == [True]
        assert backend.state is SharedState.SHARED
        assert backend.snapshot(time.monotonic()).limits[0].left == 3


async def test_without_connect_the_first_take_loads_the_script(redis_server: RedisServer) -> None:
    backend = make(redis_server, [LimitSpec(5, 5.0)])
    try:
        assert backend.take_now(1, None, time.monotonic()) is None  # Redis in use: the gate awaits take
        assert (await take(backend))[0]  # connects, EVALSHA → NOSCRIPT → SCRIPT LOAD → EVALSHA, within the timeout
        assert backend.state is SharedState.SHARED
    finally:
        await backend.close()


async def test_redis_down_at_start_then_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="seawall.ratelimit")
    workdir = tmp_path / "late-redis"
    workdir.mkdir()
    server = RedisServer(workdir)  # its port chosen, nothing listening yet
    backend = make(server, [LimitSpec(6, 5.0)], share=3, retry_interval=0.1)
    try:
        assert not await backend.connect()
        assert backend.state is SharedState.FALLBACK and shared_events(caplog) == ["fallback"]
        verdicts = [backend.take_now(1, None, time.monotonic()) for _ in range(3)]
        assert [v is not None and v.granted for v in verdicts] == [True, True, False]  # at once, the share: 6 / 3
        server.start()
        await eventually(
            lambda: backend.take_now(1, None, time.monotonic()) is None, what="Redis tried again in the background"
        )
        assert backend.state is SharedState.SHARED and shared_events(caplog) == ["fallback", "shared"]
        assert (await take(backend))[0]
    finally:
        await backend.close()
        server.stop()


async def test_idle_keys_expire(redis_server: RedisServer) -> None:
    specs = [LimitSpec(5, 0.2), LimitSpec(5, 0.2, fixed=True)]
    async with backends(redis_server, specs) as (backend,), client(redis_server) as redis:
        assert (await take(backend))[0]
        backend.cool_down(1.0, time.monotonic())
        await eventually(lambda: not backend._writes, what="the write done")
        assert len(await redis.keys("seawall:rl:*")) == 4  # the sliding set and its sum, the fixed hash, the cool-down
        # a fixed window's hash lives one second past its window's end, the cool-down until it ends
        await eventually(lambda: redis.keys("seawall:rl:*"), until=lambda keys: keys == [], timeout=5, what="keys gone")


# -- many backends, many processes: what Redis granted never exceeds a window --------------------------------------


def busiest(grants: Sequence[tuple[int, int]], spec: LimitSpec) -> int:
    """The most weight any one window of ``spec`` holds. ``grants`` are (time in µs, weight): exact integers."""
    grants = sorted(grants)
    if spec.fixed:
        per = round(spec.per * 1e6)
        per_window: dict[int, int] = {}
        for at, weight in grants:
            per_window[at // per] = per_window.get(at // per, 0) + weight
        return max(per_window.values(), default=0)
    span = round((spec.per + spec.margin) * 1e6)
    most = held = end = 0
    # the busiest half-open windows [t, t + span) are among those that start at a grant
    for start, (at, _) in enumerate(grants):
        while end < len(grants) and grants[end][0] < at + span:
            held += grants[end][1]
            end += 1
        most = max(most, held)
        held -= grants[start][1]
    return most


def test_several_processes_with_several_backends_stay_under_one_limit(redis_server: RedisServer) -> None:
    processes, per_process, duration = 3, 2, 2.5
    start = time.time() + 1.5  # every process has loaded and connected by then
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.ratelimit.burst_worker",
                str(redis_server.port),
                "burst",
                str(start),
                str(duration),
                str(per_process),
                str(seed),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in range(processes)
    ]
    reports = []
    try:
        for worker in workers:
            out, _ = worker.communicate(timeout=60)
            assert worker.returncode == 0
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    grants = [(at, weight) for r in reports for at, weight in r["grants"]]
    assert all(state == "shared" for r in reports for state in r["states"])
    assert all(len(r["grants"]) > 0 for r in reports)  # every process got a share
    sliding, fixed = burst_worker.SPECS
    most = busiest(grants, sliding), busiest(grants, fixed)
    print(
        f"\n{len(grants)} grants, weight {sum(w for _, w in grants)}; busiest windows: {most} of {sliding.requests, fixed.requests}"
    )
    # exact: no window holds one weight more than its limit, and the burst filled them: the 2.5 s run holds at
    # least 1.25 s of one fixed window, long enough for the sliding limit (40 per 0.5 s) to let 100 through
    assert most == (sliding.requests, fixed.requests)


async def test_two_gates_on_the_key_let_a_burst_of_twice_the_limit_through_in_time(redis_server: RedisServer) -> None:
    """The admission stage as the data plane will use it: a RateGate per sidecar in front of its RedisBackend."""
    spec = LimitSpec(10, 0.25)
    async with backends(redis_server, [spec], n=2) as made:
        gates = [RateGate(backend, SystemClock()) for backend in made]
        grants: list[tuple[int, int]] = []

        async def request(gate: RateGate) -> bool:
            verdict = await gate.acquire(1, None, max_wait=1.0)
            if verdict.granted:
                grants.append((round(gate.backend.redis_time * 1e6), 1))  # type: ignore[attr-defined]
            return verdict.granted

        began = time.monotonic()
        results = await asyncio.gather(*(request(gates[i % 2]) for i in range(40)))
        took = time.monotonic() - began
        assert all(results)  # 40 = 4 windows' worth, within max_wait
        assert busiest(grants, spec) == spec.requests
        assert 0.25 * 3 <= took < 1.5  # the fourth window's sends could not go before 3 windows had passed
        assert [gate.snapshot(time.monotonic()).waiting for gate in gates] == [0, 0]


def test_a_cool_down_outside_the_event_loop_reaches_the_fallback_only(redis_server: RedisServer) -> None:
    backend = make(redis_server, [LimitSpec(5, 1.0)])
    now = time.monotonic()
    backend.cool_down(1.0, now)  # e.g. from a thread: nothing to run the write on, and no error
    verdict = backend.take_now(1, None, now + 0.5)
    assert verdict is not None and verdict.reason is Refusal.UPSTREAM_COOLDOWN
    assert backend._fallback.take_now(1, None, now + 0.5).reason is Refusal.UPSTREAM_COOLDOWN  # type: ignore[union-attr]
    asyncio.run(backend.close())


# -- Redis gone: the fallback share, at once; Redis back: shared again --------------------------------------------


def shared_events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.state for r in caplog.records if getattr(r, "event", None) == "rate_limit_shared"]  # type: ignore[attr-defined]


async def run_through_outage(
    server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    *,
    break_redis: Callable[[], None],
    mend_redis: Callable[[], None],
) -> None:
    caplog.set_level(logging.INFO, logger="seawall.ratelimit")
    changes: list[SharedState] = []
    specs = [LimitSpec(30, 0.5)]
    async with backends(server, specs, share=3, timeout=0.01, retry_interval=0.3, on_change=changes.append) as (
        backend,
    ):
        latencies: list[float] = []
        fallback_grants: list[tuple[int, int]] = []

        async def step() -> None:
            began = time.monotonic()
            verdict = await backend.take(1, None, began)
            latencies.append(time.monotonic() - began)
            if verdict.granted and backend.state is SharedState.FALLBACK:
                fallback_grants.append((round(began * 1e6), 1))

        # Redis in use (a round trip over 10 ms on a loaded machine would switch to the fallback: wait it out)
        await eventually(step, until=lambda _: backend.state is SharedState.SHARED, what="shared")
        changes.clear()
        caplog.clear()
        break_redis()
        latencies.clear()
        for _ in range(200):  # ~1 s of traffic; Redis is tried again in the background every 0.3 s
            await step()
            await asyncio.sleep(0.005)
        assert backend.state is SharedState.FALLBACK
        assert backend.snapshot(time.monotonic()).shared is SharedState.FALLBACK
        worst = max(latencies)
        print(f"\nworst take while Redis was down: {worst * 1e3:.1f} ms (timeout 10 ms)")
        assert worst < 0.1  # 10 ms + the scheduling of a loaded 2-core machine, never a socket's default
        assert sum(latency > 0.005 for latency in latencies) <= 1  # only the call that found Redis gone waited
        assert fallback_grants  # traffic went on ...
        # ... within the local share, 30 / 3: counted at the time the caller passed, or (after a failed call to
        # Redis) up to ``worst`` later, so no window of 0.5 s - worst of those times holds more than 10
        assert busiest(fallback_grants, LimitSpec(10, 0.5 - worst)) <= 10
        assert changes == [SharedState.FALLBACK] and shared_events(caplog) == ["fallback"]  # said once
        mend_redis()
        await eventually(step, until=lambda _: backend.state is SharedState.SHARED, timeout=5, what="shared again")
        assert changes == [SharedState.FALLBACK, SharedState.SHARED]
        assert shared_events(caplog) == ["fallback", "shared"]


async def test_redis_killed_mid_run_traffic_goes_on_within_the_fallback_share(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    def kill() -> None:
        assert redis_server.proc is not None
        redis_server.proc.kill()
        redis_server.proc.wait()
        redis_server.proc = None

    await run_through_outage(redis_server, caplog, break_redis=kill, mend_redis=redis_server.start)


async def test_redis_frozen_mid_run_costs_a_request_at_most_the_timeout(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    assert redis_server.proc is not None
    pid = redis_server.proc.pid
    try:
        # a Redis that accepts nothing and answers nothing (a stopped process): only timeouts can tell
        await run_through_outage(
            redis_server,
            caplog,
            break_redis=lambda: os.kill(pid, signal.SIGSTOP),
            mend_redis=lambda: os.kill(pid, signal.SIGCONT),
        )
    finally:
        os.kill(pid, signal.SIGCONT)


# -- cost ----------------------------------------------------------------------------------------------------------


async def test_the_cost_of_a_take_with_redis_on_loopback(redis_server: RedisServer) -> None:
    specs = [LimitSpec(1_000_000, 1.0), LimitSpec(1_000_000, 60.0, fixed=True)]  # never reached: every take spends
    async with backends(redis_server, specs) as (backend,), client(redis_server) as redis:
        for _ in range(200):
            await take(backend)
        times = []
        for _ in range(2000):
            began = time.perf_counter()
            verdict = await backend.take(1, None, time.monotonic())
            times.append(time.perf_counter() - began)
            assert verdict.granted
        pings = []
        for _ in range(2000):
            began = time.perf_counter()
            await redis.ping()
            pings.append(time.perf_counter() - began)
    take_us, ping_us = statistics.median(times) * 1e6, statistics.median(pings) * 1e6
    print(
        f"\ntake with Redis on loopback: median {take_us:.0f} µs, p99 {sorted(times)[1979] * 1e6:.0f} µs; PING {ping_us:.0f} µs"
    )
    assert take_us < 5000
