"""``rate_limit:`` in the policy language: parsed, inherited from defaults, judged at its lines, in the schema,
explained, and turned into the engine's limits (``UpstreamPolicy.rate_limit_specs``)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from proxy.policy.check import check_command
from proxy.policy.explain import explain_command, explain_upstream
from proxy.policy.loader import load_text
from proxy.policy.model import SidecarConfig, UpstreamPolicy
from proxy.policy.rate_model import (
    RateLimitObserve,
    RateLimitPolicy,
    RateLimitWindow,
    RouteRateLimit,
    SharedRateLimit,
)
from proxy.policy.schema import build_schema, to_plain
from proxy.resilience.ratelimit import LimitSpec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "examples" / "exchange-api.yaml"

# The issue's policy, as an operator writes it (line numbers matter below: HEAD ends on line 6).
HEAD = """\
defaults:
  timeouts: {per_try: 2s, total: 10s}
upstreams:
  ex:
    listen: 127.0.0.1:15001
    targets: [https://api.exchange.example]
"""
FULL = (
    HEAD
    + """\
    rate_limit:
      limits:
        - {requests: 1200, per: 1m, window: fixed}
        - {requests: 10, per: 1s}
      margin: 20ms
      max_wait: 500ms
      cooldown_on: [429, 418]
      max_cooldown: 1h
      observe: {used: X-MBX-USED-WEIGHT-1M, limit: 0}
      shared: {redis: "redis://redis:6379/0", key: exchange-ip-1, fallback_share: 1, timeout: 10ms}
    routes:
      - match: {path_prefix: /api/v3/depth}
        weight: 10
      - match: {path_prefix: /api/v3/order}
        name: orders
        rate_limit: {limits: [{requests: 10, per: 1s}], max_wait: 0s}
"""
)


def load(text: str) -> SidecarConfig:
    config, issues = load_text(text, "p.yaml", environ={})
    assert config is not None, [str(i) for i in issues]
    assert [i for i in issues if i.severity == "error"] == []
    return config


def issues_of(text: str) -> list[str]:
    _, issues = load_text(text, "p.yaml", environ={})
    return [str(i) for i in issues]


def test_the_issues_policy_parses_into_the_model() -> None:
    up = load(FULL).upstream("ex")
    assert up.rate_limit == RateLimitPolicy(
        limits=(RateLimitWindow(1200, 60.0, "fixed"), RateLimitWindow(10, 1.0, "sliding")),
        margin=0.02,
        max_wait=0.5,
        cooldown_on=(429, 418),
        max_cooldown=3600.0,
        observe=RateLimitObserve(used="x-mbx-used-weight-1m", limit=0),  # header names match case-insensitively
        shared=SharedRateLimit(redis="redis://redis:6379/0", key="exchange-ip-1", fallback_share=1, timeout=0.01),
    )
    depth, orders = up.routes
    assert (depth.name, depth.weight, depth.rate_limit) == ("routes[0]", 10, None)
    assert (orders.name, orders.weight) == ("orders", 1)
    assert orders.rate_limit == RouteRateLimit(limits=(RateLimitWindow(10, 1.0),), max_wait=0.0)


def test_the_engine_gets_the_upstreams_limits_then_each_routes_own_under_its_name() -> None:
    up = load(FULL).upstream("ex")
    assert up.rate_limit_specs() == (
        LimitSpec(1200, 60.0, fixed=True, scope=None, margin=0.0),  # a fixed window has no use for a margin
        LimitSpec(10, 1.0, fixed=False, scope=None, margin=0.02),
        LimitSpec(10, 1.0, fixed=False, scope="orders", margin=0.02),
    )
    depth, orders = up.routes
    assert [up.rate_limit_max_wait(r) for r in (None, depth, orders)] == [0.5, 0.5, 0.0]


def test_an_unnamed_routes_limits_are_scoped_by_its_position() -> None:
    up = load(
        HEAD + "    rate_limit: {}\n    routes:\n      - match: {path: /a}\n"
        "      - match: {path: /b}\n        rate_limit: {limits: [{requests: 5, per: 2s}]}\n"
    ).upstream("ex")
    assert up.rate_limit_specs() == (LimitSpec(5, 2.0, scope="routes[1]", margin=0.02),)
    assert up.rate_limit_max_wait(up.routes[1]) == 0.0  # the route wrote none: the upstream's (default 0)


def test_defaults_and_absence() -> None:
    """Absent: off. ``rate_limit: {}``: no limit of its own, only the cool-down on 429/418 + Retry-After."""
    config = load(HEAD + "  other:\n    listen: 127.0.0.1:15002\n    targets: [http://b:80]\n    rate_limit: {}\n")
    plain, cooling = config.upstream("ex"), config.upstream("other")
    assert plain.rate_limit is None and plain.rate_limit_specs() == ()
    assert plain.rate_limit_max_wait(None) == 0.0
    assert cooling.rate_limit == RateLimitPolicy()
    rate = cooling.rate_limit
    assert rate is not None
    assert (rate.limits, rate.margin, rate.max_wait, rate.cooldown_on, rate.max_cooldown) == (
        (),
        0.02,
        0.0,
        (429, 418),
        3600.0,
    )
    assert rate.observe is None and rate.shared is None
    assert cooling.rate_limit_specs() == ()


def test_observe_standard_is_a_word_and_a_key() -> None:
    for written in ("standard", "{standard: true}"):
        up = load(HEAD + f"    rate_limit: {{limits: [{{requests: 5, per: 1s}}], observe: {written}}}\n").upstream("ex")
        assert up.rate_limit is not None and up.rate_limit.observe == RateLimitObserve(standard=True)


def test_defaults_are_inherited_key_by_key_and_a_list_is_replaced_whole() -> None:
    text = """\
defaults:
  rate_limit:
    limits: [{requests: 100, per: 1m}]
    max_wait: 1s
    shared: {redis: "redis://r:6379/0", key: common}
upstreams:
  a:
    listen: 127.0.0.1:15001
    targets: [http://a:80]
  b:
    listen: 127.0.0.1:15002
    targets: [http://b:80]
    rate_limit:
      limits: [{requests: 5, per: 1s}]
      shared: {key: b-only}
  db:
    protocol: tcp
    listen: 127.0.0.1:15432
    targets: [db:5432]
"""
    config = load(text)
    a, b, db = (config.upstream(n).rate_limit for n in ("a", "b", "db"))
    assert a is not None and b is not None
    assert a.limits == (RateLimitWindow(100, 60.0),) and a.max_wait == 1.0
    assert b.limits == (RateLimitWindow(5, 1.0),) and b.max_wait == 1.0  # limits replaced, max_wait inherited
    assert b.shared == SharedRateLimit(redis="redis://r:6379/0", key="b-only")
    assert db is None  # a tcp upstream has no requests to count: what it inherits is dropped, not an error


ERRORS = [
    ("    rate_limit: {limit: []}\n", "p.yaml:7:18: upstreams.ex.rate_limit.limit: unknown key (did you mean 'limits'?)"),
    ("    rate_limit: {limits: {requests: 5, per: 1s}}\n", "p.yaml:7:18: upstreams.ex.rate_limit.limits: expected a list"),
    ("    rate_limit:\n      limits: [{requests: 5, per: 1 sec}]\n",
     "p.yaml:8:30: upstreams.ex.rate_limit.limits[0].per: expected a duration like 250ms, 1s or 2m, got '1 sec'"),
    ("    rate_limit:\n      limits: [{requests: 5, per: 0s}]\n",
     "p.yaml:8:30: upstreams.ex.rate_limit.limits[0].per: must be > 0, got 0s"),
    ("    rate_limit:\n      limits: [{requests: 0, per: 1s}]\n",
     "p.yaml:8:17: upstreams.ex.rate_limit.limits[0].requests: must be ≥ 1, got 0"),
    ("    rate_limit:\n      limits: [{requests: 5, per: 1s, window: slidng}]\n",
     "p.yaml:8:39: upstreams.ex.rate_limit.limits[0].window: must be one of sliding, fixed (did you mean 'sliding'?)"),
    ("    rate_limit:\n      limits:\n        - {requests: 5}\n",
     "p.yaml:9:11: upstreams.ex.rate_limit.limits[0].per: per is required"),
    ("    rate_limit:\n      limits: [{requests: 5, per: 1s, burst: 2}]\n",
     "p.yaml:8:39: upstreams.ex.rate_limit.limits[0].burst: unknown key"),
    ("    rate_limit: {cooldown_on: [429, 200]}\n",
     "p.yaml:7:37: upstreams.ex.rate_limit.cooldown_on[1]: a cool-down status is a 4xx or 5xx, got 200"),
    ("    rate_limit: {cooldown_on: [too_many]}\n",
     "p.yaml:7:32: upstreams.ex.rate_limit.cooldown_on[0]: expected a status code, got 'too_many'"),
    ("    rate_limit: {max_cooldown: forever}\n", "p.yaml:7:18: upstreams.ex.rate_limit.max_cooldown: expected a duration"),
    ("    rate_limit: {margin: -5ms}\n", "p.yaml:7:18: upstreams.ex.rate_limit.margin: expected a duration"),
    ("    rate_limit:\n      shared: {redis: 'http://redis:6379', key: k}\n",
     "p.yaml:8:16: upstreams.ex.rate_limit.shared.redis: expected a Redis URL"),
    ("    rate_limit:\n      shared: {redis: 'unix://redis.sock', key: k}\n",
     "p.yaml:8:16: upstreams.ex.rate_limit.shared.redis: a unix:// URL names an absolute socket path"),
    ("    rate_limit:\n      shared: {redis: 'redis://r:6379/0', key: ''}\n",
     "p.yaml:8:43: upstreams.ex.rate_limit.shared.key: a shared key is 1–200 visible ASCII characters"),
    ("    rate_limit:\n      shared: {redis: 'redis://r:6379/0'}\n",
     "p.yaml:8:7: upstreams.ex.rate_limit.shared.key: key is required"),
    ("    rate_limit:\n      shared: {redis: 'redis://r', key: k, fallback_share: 0}\n",
     "p.yaml:8:44: upstreams.ex.rate_limit.shared.fallback_share: must be ≥ 1, got 0"),
    ("    rate_limit:\n      shared: {redis: 'redis://r', key: k, timeout: 0s}\n",
     "p.yaml:8:44: upstreams.ex.rate_limit.shared.timeout: must be > 0, got 0s"),
    ("    rate_limit:\n      observe: everything\n",
     "p.yaml:8:7: upstreams.ex.rate_limit.observe: expected a mapping of keys or 'standard', got 'everything'"),
    ("    rate_limit:\n      observe: {used: 'X MBX'}\n",
     "p.yaml:8:17: upstreams.ex.rate_limit.observe.used: expected a header name"),
    ("    rate_limit:\n      limits: [{requests: 5, per: 1s}]\n      observe: {reset: X-Reset}\n",
     "p.yaml:9:7: upstreams.ex.rate_limit.observe: name a header to read: used or remaining (or write standard)"),
    ("    rate_limit:\n      limits: [{requests: 5, per: 1s}]\n      observe: {used: X-Used, limit: 1}\n",
     "p.yaml:9:31: upstreams.ex.rate_limit.observe.limit: limit 1 is not an entry of rate_limit.limits (0 to 0)"),
    ("    rate_limit:\n      observe: {used: X-Used}\n",
     "p.yaml:8:7: upstreams.ex.rate_limit.observe.limit: limit 0 is not an entry of rate_limit.limits (it is empty)"),
    # A route's weight must fit every limit that applies to it: the upstream's and the route's own.
    ("    rate_limit: {limits: [{requests: 1200, per: 1m}, {requests: 10, per: 1s}]}\n"
     "    routes:\n      - match: {path: /a}\n        weight: 20\n",
     "p.yaml:10:9: upstreams.ex.routes[0].weight: can never be sent: weight 20 > 10 requests per 1s "
     "(upstreams.ex.rate_limit.limits[1])"),
    ("    rate_limit: {limits: [{requests: 100, per: 1m, window: fixed}]}\n"
     "    routes:\n      - match: {path: /a}\n        weight: 5\n"
     "        rate_limit: {limits: [{requests: 4, per: 1s}]}\n",
     "p.yaml:10:9: upstreams.ex.routes[0].weight: can never be sent: weight 5 > 4 requests per 1s "
     "(upstreams.ex.routes[0].rate_limit.limits[0])"),
    ("    rate_limit: {}\n    routes:\n      - {match: {path: /a}, weight: 0}\n",
     "p.yaml:9:29: upstreams.ex.routes[0].weight: must be ≥ 1, got 0"),
    ("    rate_limit: {}\n    routes:\n      - {match: {path: /a}, rate_limit: {max_wait: soon}}\n",
     "p.yaml:9:42: upstreams.ex.routes[0].rate_limit.max_wait: expected a duration"),
    ("    rate_limit: {}\n    routes:\n      - {match: {path: /a}, rate_limit: {weight: 2}}\n",
     "p.yaml:9:42: upstreams.ex.routes[0].rate_limit.weight: unknown key"),
    # Keys nothing would count.
    ("    routes:\n      - {match: {path: /a}, weight: 3}\n",
     "p.yaml:8:29: upstreams.ex.routes[0].weight: nothing counts it: upstreams.ex has no rate_limit"),
    ("    routes:\n      - {match: {path: /a}, rate_limit: {limits: [{requests: 1, per: 1s}]}}\n",
     "p.yaml:8:29: upstreams.ex.routes[0].rate_limit: nothing counts it: upstreams.ex has no rate_limit"),
    ("    rate_limit:\n      limits: [{requests: 5, per: 1s}]\n  db:\n    protocol: tcp\n    listen: 127.0.0.1:15432\n"
     "    targets: [db:5432]\n    rate_limit: {}\n",
     "p.yaml:13:5: upstreams.db.rate_limit: a tcp upstream relays bytes: there are no requests to count"),
]  # fmt: skip


@pytest.mark.parametrize(("upstream", "expected"), ERRORS)
def test_check_rejects_a_bad_rate_limit_at_its_line(upstream: str, expected: str) -> None:
    found = issues_of(HEAD + upstream)
    assert any(issue.startswith(expected) for issue in found), found
    config, _ = load_text(HEAD + upstream, "p.yaml", environ={})
    assert config is None


def test_a_bad_limit_is_told_once_and_does_not_judge_weights_against_a_stand_in() -> None:
    found = issues_of(
        HEAD
        + "    rate_limit: {limits: [{requests: many, per: 1s}]}\n    routes:\n      - {match: {path: /a}, weight: 50}\n"
    )
    assert found == [
        "p.yaml:7:28: upstreams.ex.rate_limit.limits[0].requests: expected an integer, got 'many'",
    ]


def test_a_weight_of_one_written_on_an_upstream_without_rate_limit_is_harmless() -> None:
    load(HEAD + "    routes:\n      - {match: {path: /a}, weight: 1}\n")


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        (
            "    rate_limit: {max_wait: 30s}\n",
            "p.yaml:7:18: upstreams.ex.rate_limit.max_wait: warning: max_wait (30s) is longer than timeouts.total "
            "(10s): callers sized to total give up before their turn comes",
        ),
        (
            "    rate_limit: {}\n    routes:\n"
            "      - match: {path: /a}\n        timeouts: {total: 3s}\n        rate_limit: {max_wait: 5s}\n",
            "p.yaml:11:22: upstreams.ex.routes[0].rate_limit.max_wait: warning: max_wait (5s) is longer than "
            "timeouts.total (3s)",
        ),
    ],
)
def test_a_wait_longer_than_the_deadline_is_a_warning(upstream: str, expected: str) -> None:
    """Not an error: a batch caller may wait that long; but callers sized to total give up first."""
    config, issues = load_text(HEAD + upstream, "p.yaml", environ={})
    assert config is not None
    assert [str(i) for i in issues if str(i).startswith(expected)], [str(i) for i in issues]


def test_inherited_by_a_tcp_upstream_it_is_no_error_but_written_there_it_is() -> None:
    text = "defaults:\n  rate_limit: {limits: [{requests: 5, per: 1s}]}\nupstreams:\n  db:\n    protocol: tcp\n"
    text += "    listen: 127.0.0.1:15432\n    targets: [db:5432]\n"
    assert issues_of(text) == []
    written = text + "    rate_limit: {max_wait: 1s}\n"
    assert issues_of(written) == [
        "p.yaml:8:5: upstreams.db.rate_limit: a tcp upstream relays bytes: there are no requests to count"
    ]


SHARED = """\
defaults:
  rate_limit:
    limits: [{requests: 1200, per: 1m, window: fixed}]
    shared: {redis: "redis://redis:6379/0", key: exchange-ip-1}
upstreams:
  spot:
    listen: 127.0.0.1:15001
    targets: [https://api.exchange.example]
  futures:
    listen: 127.0.0.1:15002
    targets: [https://fapi.exchange.example]
"""


def test_upstreams_of_one_file_on_one_key_must_count_it_alike() -> None:
    """One exchange, one IP: its APIs may share a budget, but not count it differently."""
    config = load(SHARED)
    assert config.upstream("spot").rate_limit == config.upstream("futures").rate_limit
    differs = SHARED + "    rate_limit: {margin: 50ms}\n"
    assert issues_of(differs) == [
        "p.yaml:4:45: upstreams.futures.rate_limit.shared.key: 'exchange-ip-1' is also upstreams.spot's budget, "
        "counted with other limits or margin: every sidecar and upstream on a key must count the same limits"
    ]
    assert issues_of(SHARED + "    rate_limit: {margin: 50ms, shared: {key: futures-ip-1}}\n") == []
    other_redis = SHARED + "    rate_limit: {limits: [], shared: {redis: 'redis://other:6379/0'}}\n"
    assert issues_of(other_redis) == []


# -- the schema --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(build_schema())


def test_the_schema_documents_every_rate_limit_key() -> None:
    defs = build_schema()["$defs"]
    assert set(defs["RateLimitPolicy"]["properties"]) == {
        "limits",
        "margin",
        "max_wait",
        "cooldown_on",
        "max_cooldown",
        "observe",
        "shared",
    }
    assert defs["RateLimitPolicy"]["properties"]["limits"]["items"] == {"$ref": "#/$defs/RateLimitWindow"}
    assert defs["RateLimitWindow"]["required"] == ["requests", "per"]
    assert defs["RateLimitWindow"]["properties"]["window"]["anyOf"][0]["enum"] == ["sliding", "fixed"]
    assert defs["SharedRateLimit"]["required"] == ["redis", "key"]
    assert set(defs["RateLimitObserve"]["properties"]) == {"used", "remaining", "reset", "limit", "standard"}
    assert set(defs["RouteRateLimit"]["properties"]) == {"limits", "max_wait"}
    assert {"weight", "rate_limit"} <= set(defs["Route"]["properties"])
    assert "rate_limit" in defs["Defaults"]["properties"] and "rate_limit" in defs["Upstream"]["properties"]
    for name in ("RateLimitPolicy", "RateLimitWindow", "RateLimitObserve", "SharedRateLimit", "RouteRateLimit"):
        for key, prop in defs[name]["properties"].items():
            assert prop.get("description"), f"{name}.{key}"
    assert defs["RateLimitPolicy"]["properties"]["max_cooldown"]["default"] == "1h"


def _doc(rate_limit: Any, routes: Any = None) -> dict[str, Any]:
    upstream: dict[str, Any] = {"listen": "127.0.0.1:15001", "targets": ["http://a:80"], "rate_limit": rate_limit}
    if routes is not None:
        upstream["routes"] = routes
    return {"upstreams": {"a": upstream}}


GOOD = [
    ({},),
    ({"limits": [{"requests": 1200, "per": "1m", "window": "fixed"}, {"requests": 10, "per": 1}]},),
    ({"limits": [{"requests": 5, "per": "1s"}], "observe": "standard", "cooldown_on": [429, "503"]},),
    ({"limits": [{"requests": 9, "per": "1s"}], "observe": {"remaining": "X-RateLimit-Remaining", "reset": "X-R"}},),
    ({"shared": {"redis": "rediss://:secret@redis.internal:6380/2", "key": "k", "fallback_share": 3}},),
    ({"shared": {"redis": "unix:///run/redis/redis.sock", "key": "k"}},),
    ({"limits": [{"requests": 10, "per": "1s"}]}, [{"match": {"path": "/a"}, "weight": 10}]),
    ({}, [{"match": {"path": "/a"}, "rate_limit": {"limits": [{"requests": 1, "per": "1s"}], "max_wait": None}}]),
]
BAD = [
    ({"limits": [{"requests": 0, "per": "1s"}]},),
    ({"limits": [{"requests": 5}]},),
    ({"limits": [{"requests": 5, "per": "1s", "window": "rolling"}]},),
    ({"cooldown_on": [302]},),
    ({"observe": "everything"},),
    ({"observe": {"used": "X Used"}},),
    ({"shared": {"redis": "http://r:80", "key": "k"}},),
    ({"shared": {"redis": "redis://r", "key": ""}},),
    ({"shared": {"key": "k"}},),
    ({"burst": 5},),
    ({}, [{"match": {"path": "/a"}, "weight": 0}]),
    ({}, [{"match": {"path": "/a"}, "rate_limit": {"margin": "1ms"}}]),
]


@pytest.mark.parametrize("case", GOOD)
def test_schema_and_loader_accept_the_same_rate_limits(case: tuple[Any, ...], validator: Any) -> None:
    doc = _doc(*case)
    assert list(validator.iter_errors(doc)) == []
    config, issues = load_text(yaml.safe_dump(doc), "p.yaml", environ={})
    assert config is not None, [str(i) for i in issues]


@pytest.mark.parametrize("case", BAD)
def test_schema_and_loader_reject_the_same_rate_limits(case: tuple[Any, ...], validator: Any) -> None:
    doc = _doc(*case)
    assert list(validator.iter_errors(doc)), "the schema accepted it"
    config, _ = load_text(yaml.safe_dump(doc), "p.yaml", environ={})
    assert config is None, "the loader accepted it"


def test_the_effective_rate_limit_explain_prints_reads_back_the_same(validator: Any) -> None:
    """What explain shows (to_plain) is a policy an operator could paste: the schema and the loader take it as is."""
    up = load(FULL).upstream("ex")
    doc = _doc(to_plain(up.rate_limit), [{"match": {"path": "/a"}, "weight": 10}])
    assert list(validator.iter_errors(doc)) == []
    again = load(yaml.safe_dump(doc)).upstream("a")
    assert again.rate_limit == up.rate_limit


def test_the_example_is_valid_for_the_schema(validator: Any) -> None:
    assert list(validator.iter_errors(yaml.safe_load(EXAMPLE.read_text(encoding="utf-8")))) == []


# -- explain -----------------------------------------------------------------------------------------------------


def _said(up: UpstreamPolicy) -> str:
    return " ".join(explain_upstream(up).consequences)


def test_explain_says_the_limits_the_wait_the_cooldown_the_weights_and_the_shared_budget() -> None:
    ex = explain_upstream(load(FULL).upstream("ex"))
    text = " ".join(ex.consequences)
    assert (
        "Rate limit: at most 1200 per calendar minute and 10 req/s sustained (sliding, +20ms margin), in weight" in text
    )
    assert "A caller waits ≤ 500ms for its tokens, first come first served, else is answered 429 rate_limited" in text
    assert "429/418 + Retry-After pause the upstream (≤ 1h)" in text and "429 upstream_cooldown" in text
    assert "route routes[0] (/api/v3/depth) costs 10" in text
    assert "route orders also counts against 10 req/s sustained (sliding, +20ms margin) of its own" in text
    assert "x-mbx-used-weight-1m (used) corrects the count of limit 0 (1200 per calendar minute)" in text
    assert "Shared through redis key exchange-ip-1 (redis://redis:6379/0)" in text
    assert "each sidecar counts 1/1 of the limits locally" in text
    assert ex.contradictions == []
    (_, depth), (_, orders) = ex.routes
    assert depth.consequences[-1] == "Each request of this route costs 10 against the upstream's rate limit."
    assert "answered 429 rate_limited with Retry-After at once (max_wait 0)" in " ".join(orders.consequences)


def test_explain_without_limits_and_without_rate_limit() -> None:
    assert "Rate limit" not in _said(load(HEAD).upstream("ex"))
    text = _said(load(HEAD + "    rate_limit: {cooldown_on: []}\n").upstream("ex"))
    assert "Rate limit: no limit of its own" in text and "pause nothing (cooldown_on is empty)" in text
    other = _said(
        load(
            HEAD + "    rate_limit: {limits: [{requests: 600, per: 5m, window: fixed}, {requests: 3, per: 2s}]}\n"
        ).upstream("ex")
    )
    assert "at most 600 per fixed 5m window (aligned to the epoch) and 3 per 2s sustained" in other


def test_explain_flags_what_the_rate_limit_cancels_out() -> None:
    up = load(HEAD + "    retry: {retry_on: [5xx, 429]}\n    rate_limit: {cooldown_on: [429, 503], max_wait: 10s}\n")
    flags = explain_upstream(up.upstream("ex")).contradictions
    assert any(f.startswith("retry.retry_on covers 429, 503, which rate_limit.cooldown_on") for f in flags), flags
    assert any("rate_limit.max_wait (10s) is not shorter than total (10s)" in f for f in flags), flags


def test_explain_hides_a_redis_password(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + "    rate_limit:\n      shared: {redis: 'redis://app:s3cret@redis:6379/0', key: k}\n")
    out = io.StringIO()
    assert explain_command(str(path), None, out) == 0
    assert "s3cret" not in out.getvalue() and "redis://app:***@redis:6379/0" in out.getvalue()


# -- the example ---------------------------------------------------------------------------------------------------


def test_the_example_passes_sidecar_check_and_counts_as_an_exchange_does() -> None:
    out = io.StringIO()
    assert check_command([str(EXAMPLE)], out, environ={}) == 0
    assert out.getvalue() == f"{EXAMPLE}: OK (1 upstream: exchange)\n"
    config, _ = load_text(EXAMPLE.read_text(encoding="utf-8"), str(EXAMPLE), environ={})
    assert config is not None
    up = config.upstream("exchange")
    assert up.rate_limit_specs() == (
        LimitSpec(1200, 60.0, fixed=True, margin=0.0),
        LimitSpec(10, 1.0, margin=0.02),
        LimitSpec(50, 10.0, scope="orders", margin=0.02),
    )
    assert {r.name: r.weight for r in up.routes} == {"depth": 10, "klines": 2, "orders": 1}
    assert up.rate_limit is not None and up.rate_limit.shared is not None
    assert up.rate_limit.shared.key == "exchange-ip-1" and up.rate_limit.shared.fallback_share == 3
