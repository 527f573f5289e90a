"""An upstream's rate limit reads dates (an HTTP-date Retry-After) against the injected clock's wall time, never
the machine's: on a ManualClock a cool-down is exact, whatever the date on the machine running the test."""

from __future__ import annotations

from email.utils import formatdate

from proxy.policy.loader import load_text
from proxy.resilience.clock import ManualClock
from proxy.runtime import UpstreamRuntime

POLICY = """\
upstreams:
  ex:
    listen: 127.0.0.1:18080
    targets: [http://127.0.0.1:18081]
    rate_limit: {limits: [{requests: 100, per: 1s}], cooldown_on: [429]}
"""
WALL = 1_900_000_000.0  # a date no machine running this test is at


def test_an_http_date_retry_after_pauses_the_upstream_until_that_date_on_the_clocks_wall_time() -> None:
    config, issues = load_text(POLICY)
    assert config is not None, issues
    clock = ManualClock(wall_start=WALL)
    rate = UpstreamRuntime(config.upstreams[0], clock).rate
    assert rate is not None
    until = formatdate(WALL + 30, usegmt=True).encode()
    assert rate.settle_answer(429, {b"retry-after": until}.get)
    assert rate.describe()["cooldown_seconds"] == 30.0
    clock.advance(29.5)
    assert rate.describe()["cooldown_seconds"] == 0.5
