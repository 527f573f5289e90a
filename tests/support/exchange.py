"""A mock exchange API (aiohttp, on 127.0.0.1) that counts and punishes the way exchanges document it.

- A sliding window of ``per`` seconds: a request that would make more than ``limit`` weight in the last ``per``
  seconds (half-open interval ``(t - per, t]``, at arrival) is answered ``429`` with ``Retry-After``.
- Sending again while a Retry-After runs is answered ``418`` (Binance's automated IP ban).
- ``X-MBX-USED-WEIGHT-1M`` on every answer: the weight used in the window, the sidecar's plus ``external``
  (another client on the same IP that this one cannot see).
- ``/api/v3/depth`` costs ``depth_weight``; everything else costs 1.
- ``script_429`` answers the next requests 429 with a given Retry-After value (a cool-down test's trigger).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Exchange:
    limit: int = 10
    per: float = 1.0
    retry_after: int = 1
    depth_weight: int = 5
    external: int = 0  # weight someone else spends in every window
    report_usage: bool = False
    arrivals: list[tuple[float, int, int]] = field(default_factory=list)  # (time, weight, status)
    script_429: deque[str] = field(default_factory=deque)  # Retry-After values to answer with, in turn
    bare_418: int = 0  # the next requests answered 418 without a Retry-After
    _window: deque[tuple[float, int]] = field(default_factory=deque)
    _banned_until: float = 0.0
    url: str = ""

    def used(self, now: float) -> int:
        while self._window and self._window[0][0] <= now - self.per:
            self._window.popleft()
        return sum(weight for _, weight in self._window)

    async def handle(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        weight = self.depth_weight if request.path.startswith("/api/v3/depth") else 1
        headers: dict[str, str] = {}
        if self.bare_418:
            self.bare_418 -= 1
            status = 418
        elif self.script_429:
            status = 429
            headers["Retry-After"] = self.script_429.popleft()
            self._banned_until = now  # a scripted 429 does not ban
        elif now < self._banned_until:
            status = 418  # sent during a Retry-After: banned
        elif self.used(now) + self.external + weight > self.limit:
            status = 429
            headers["Retry-After"] = str(self.retry_after)
            self._banned_until = now + self.retry_after
        else:
            status = 200
            self._window.append((now, weight))
        self.arrivals.append((now, weight, status))
        if self.report_usage:
            headers["X-MBX-USED-WEIGHT-1M"] = str(self.used(now) + self.external)
        return web.Response(status=status, text='{"ok": true}' if status == 200 else "{}", headers=headers)

    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for _, _, status in self.arrivals:
            counts[status] = counts.get(status, 0) + 1
        return counts

    def max_in_window(self, per: float | None = None) -> int:
        """The most weight that reached the exchange in any interval ``(t - per, t]``, 429s and 418s included:
        what the exchange's own counter would have seen."""
        per = self.per if per is None else per
        times = [(t, w) for t, w, _ in self.arrivals]
        best = 0
        for i, (t, _) in enumerate(times):
            best = max(best, sum(w for u, w in times[: i + 1] if u > t - per))
        return best


@contextlib.asynccontextmanager
async def running_exchange(exchange: Exchange) -> AsyncIterator[Exchange]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", exchange.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    exchange.url = f"http://127.0.0.1:{port}"
    try:
        yield exchange
    finally:
        await runner.cleanup()
