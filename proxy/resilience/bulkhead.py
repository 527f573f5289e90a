"""The bulkhead: at most ``max_concurrent`` requests in flight per upstream, ``max_pending`` waiting.

Over the limits the sidecar answers 503 ``overload`` at once; an overload is the sidecar protecting the
upstream, never a sign the upstream failed, so it never counts against the breaker.

HTTP requests may wait in line (``enter``); TCP connections only ever ``try_enter``: a relay slot is held for
the life of a connection, so waiting for one would mostly mean a client hanging on a silent socket.
"""

from __future__ import annotations

import asyncio
from collections import deque

from proxy.metrics import UpstreamStats
from proxy.policy.model import LimitsPolicy


class Bulkhead:
    def __init__(self, policy: LimitsPolicy, stats: UpstreamStats) -> None:
        self.policy = policy
        self.stats = stats
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_enter(self) -> bool:
        """Take a slot without waiting."""
        if self.stats.inflight < self.policy.max_concurrent and not self._waiters:
            self.stats.inflight += 1
            return True
        return False

    async def enter(self) -> bool:
        """Take a slot, waiting up to ``pending_timeout`` in line; False means overload."""
        if self.try_enter():
            return True
        policy = self.policy
        if len(self._waiters) >= policy.max_pending or policy.pending_timeout <= 0:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.stats.pending += 1
        handed_over = False
        try:
            async with asyncio.timeout(policy.pending_timeout):
                await waiter
            handed_over = True  # the slot was handed over by ``leave``
        except TimeoutError:
            handed_over = waiter.done() and not waiter.cancelled()  # handed over just as time ran out
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.leave()  # the caller is gone: pass the slot on
            raise
        finally:
            self.stats.pending -= 1
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        return handed_over

    def leave(self) -> None:
        # Hand the slot straight to the first live waiter, so a newcomer cannot jump the line.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.stats.inflight -= 1
