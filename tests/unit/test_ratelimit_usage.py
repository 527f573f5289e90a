"""Reading an upstream's usage headers: the policy's named ones, the IETF draft's and the common X-RateLimit-*."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.resilience.ratelimit import GRANTED, LimitSpec, LocalBackend, Refusal, Verdict
from proxy.resilience.usage import Header, Observation, UsageHeaders, read_usage

WALL = 1_700_000_000.0  # "now" since the epoch
STANDARD = UsageHeaders(standard=True, limit=1)


def head(**headers: str) -> Header:
    """A header lookup over ``name=value`` pairs (``x_ratelimit_reset`` is ``x-ratelimit-reset``)."""
    table = {name.replace("_", "-").encode(): value.encode() for name, value in headers.items()}
    return table.get


def test_a_named_used_header_is_read_as_used() -> None:
    spec = UsageHeaders(used=b"X-MBX-USED-WEIGHT-1M", limit=2)
    assert spec.used == b"x-mbx-used-weight-1m"  # header names are looked up in lower case
    assert read_usage(spec, head(x_mbx_used_weight_1m="417"), WALL) == [Observation(2, used=417)]
    assert read_usage(spec, head(), WALL) == []


def test_named_remaining_and_reset_read_seconds_and_epoch_times() -> None:
    spec = UsageHeaders(remaining=b"x-left", reset=b"x-reset")
    assert read_usage(spec, head(x_left="5", x_reset="2.5"), WALL) == [Observation(0, remaining=5, reset=2.5)]
    epoch = read_usage(spec, head(x_left="5", x_reset=str(int(WALL) + 30)), WALL)
    assert epoch == [Observation(0, remaining=5, reset=30.0)]
    millis = read_usage(spec, head(x_left="5", x_reset=str(int(WALL) * 1000 + 1500)), WALL)
    assert millis == [Observation(0, remaining=5, reset=1.5)]
    past = read_usage(spec, head(x_left="5", x_reset=str(int(WALL) - 1)), WALL)
    assert past == [Observation(0, remaining=5, reset=None)]  # a reset already gone says nothing about when
    assert read_usage(spec, head(x_left="5"), WALL) == [Observation(0, remaining=5)]


def test_malformed_values_are_ignored() -> None:
    spec = UsageHeaders(used=b"u", remaining=b"r", reset=b"t")
    for bad in ("", "-3", "1.5", "abc", "12abc", " ", "nan", "inf", "1e400"):
        found = read_usage(spec, head(u=bad, r=bad, t=bad), WALL)
        assert found == [], bad
    assert read_usage(spec, head(u="7", t="soon"), WALL) == [Observation(0, used=7)]
    assert read_usage(spec, head(r="4", t="-1"), WALL) == [Observation(0, remaining=4)]


def test_the_current_ietf_draft_one_item_per_policy() -> None:
    found = read_usage(STANDARD, head(ratelimit='"default";r=50;t=30, "burst";r=0;t=1'), WALL)
    assert found == [Observation(1, remaining=50, reset=30.0), Observation(1, remaining=0, reset=1.0)]


def test_a_missing_t_is_the_policy_window() -> None:
    headers = head(ratelimit='"day";r=9, "a,b";r=3', ratelimit_policy='"day";q=100;w=86400, "a,b";q=5;w=10')
    found = read_usage(STANDARD, headers, WALL)
    assert found == [Observation(1, remaining=9, reset=86400.0), Observation(1, remaining=3, reset=10.0)]
    assert read_usage(STANDARD, head(ratelimit='"x";r=9'), WALL) == []  # no reset known: no cap


def test_earlier_drafts_and_the_common_headers() -> None:
    assert read_usage(STANDARD, head(ratelimit="limit=100, remaining=7, reset=12"), WALL) == [
        Observation(1, remaining=7, reset=12.0)
    ]
    old = head(ratelimit_remaining="3", ratelimit_reset="4")
    assert read_usage(STANDARD, old, WALL) == [Observation(1, remaining=3, reset=4.0)]
    github = head(x_ratelimit_remaining="59", x_ratelimit_reset=str(int(WALL) + 600))
    assert read_usage(STANDARD, github, WALL) == [Observation(1, remaining=59, reset=600.0)]
    seconds = head(x_ratelimit_remaining="0", x_ratelimit_reset="2")
    assert read_usage(STANDARD, seconds, WALL) == [Observation(1, remaining=0, reset=2.0)]
    # RateLimit-Reset is seconds from now by its draft: an epoch-sized value there is nonsense, not a time.
    assert read_usage(STANDARD, head(ratelimit_remaining="3", ratelimit_reset=str(int(WALL))), WALL) == []


def test_the_first_standard_form_present_wins_and_standard_is_off_by_default() -> None:
    both = head(ratelimit='"d";r=1;t=5', x_ratelimit_remaining="80", x_ratelimit_reset="60")
    assert read_usage(STANDARD, both, WALL) == [Observation(1, remaining=1, reset=5.0)]
    assert read_usage(UsageHeaders(), both, WALL) == []


def test_malformed_standard_headers_are_ignored() -> None:
    for bad in ('"d";r=x;t=5', '"d";r=5;t=-1', '"d;r=5;t=5', ";;,,", "=", '"d";r;t', "remaining=, reset=1"):
        assert read_usage(STANDARD, head(ratelimit=bad), WALL) == [], bad


@given(st.binary(max_size=60), st.binary(max_size=60))
def test_no_header_value_makes_it_raise(ratelimit: bytes, policy: bytes) -> None:
    table = {b"ratelimit": ratelimit, b"ratelimit-policy": policy, b"u": ratelimit, b"x-ratelimit-reset": policy}
    for found in read_usage(UsageHeaders(used=b"u", standard=True), table.get, WALL):
        assert found.remaining is None or found.remaining >= 0
        assert found.reset is None or found.reset > 0


def test_observations_slow_a_backend_down() -> None:
    backend = LocalBackend([LimitSpec(10, 1.0), LimitSpec(1200, 60.0, fixed=True)])
    for found in read_usage(STANDARD, head(ratelimit='"d";r=0;t=2'), WALL):
        found.apply(backend, 1000.0)
    assert backend.take_now(1, None, 1000.0) == Verdict(2.0, Refusal.RATE_LIMITED)
    assert backend.take_now(1, None, 1002.0) is GRANTED
    spec = UsageHeaders(used=b"x-mbx-used-weight-1m", limit=1)
    for found in read_usage(spec, head(x_mbx_used_weight_1m="1199"), WALL):
        found.apply(backend, 1002.0)
    assert backend.take_now(1, None, 1002.0) is GRANTED  # the 1200th of this calendar minute (960 s to 1020 s)
    assert backend.take_now(1, None, 1002.0) == Verdict(18.0, Refusal.RATE_LIMITED)
