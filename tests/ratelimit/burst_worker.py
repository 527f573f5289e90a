"""One OS process of the shared-budget burst test: its own event loop and ``backends`` RedisBackends on one key.

    python -m tests.ratelimit.burst_worker PORT KEY START DURATION BACKENDS SEED

Waits until wall time START, then each backend sends as fast as the budget allows for DURATION seconds (a
refused take sleeps the wait it was told, as the gate does) and prints one JSON line: every grant as
[Redis time of the grant in µs, weight].
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

import uvloop

from proxy.resilience.clock import SystemClock
from proxy.resilience.ratelimit import LimitSpec, LocalBackend
from proxy.upstream.shared_limit import RedisBackend

# The budget every process shares: a sliding limit and a fixed one, both reached by the burst.
SPECS = (LimitSpec(40, 0.5), LimitSpec(100, 2.0, fixed=True))
WEIGHTS = (1, 1, 1, 2, 3)


async def sender(backend: RedisBackend, until: float, rng: random.Random) -> list[tuple[int, int]]:
    grants: list[tuple[int, int]] = []
    clock = SystemClock()
    while (now := time.monotonic()) < until:
        weight = rng.choice(WEIGHTS)
        verdict = await backend.take(weight, None, now)
        if verdict.granted:
            grants.append((round(backend.redis_time * 1e6), weight))
        else:
            await clock.sleep(min(verdict.wait, until - time.monotonic(), 0.05))
    return grants


async def main(port: int, key: str, start: float, duration: float, backends: int, seed: int) -> None:
    rng = random.Random(seed)
    clock = SystemClock()
    epoch = time.time() - time.monotonic()
    made = [
        RedisBackend(
            SPECS,
            url=f"redis://127.0.0.1:{port}/0",
            key=key,
            fallback=LocalBackend(SPECS, epoch_offset=epoch),
            clock=clock,
            timeout=0.5,  # a loaded CI machine: this test is about exactness, not about the fallback
        )
        for _ in range(backends)
    ]
    for backend in made:
        assert await backend.connect(), "Redis unreachable"
    await asyncio.sleep(max(0.0, start - time.time()))
    until = time.monotonic() + duration
    results = await asyncio.gather(*(sender(b, until, random.Random(rng.random())) for b in made))
    states = [b.state.value for b in made]
    for backend in made:
        await backend.close()
    print(json.dumps({"grants": [g for r in results for g in r], "states": states}))


if __name__ == "__main__":
    port, key, start, duration, backends, seed = sys.argv[1:7]
    uvloop.run(main(int(port), key, float(start), float(duration), int(backends), int(seed)))
