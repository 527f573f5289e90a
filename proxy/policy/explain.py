"""``sidecar explain PATH [UPSTREAM]``: what a policy will actually do, in plain words.

For each upstream: the effective policy after ``defaults`` are merged in, then its consequences, computed the
way ``proxy.http.forwarder`` behaves (each try gets ``min(per_try, time left)``; whether a retry follows, and
after which delay, is ``proxy.resilience.retry.decide_retry``'s answer, as in the forwarder; every failed try is
recorded by the breaker; the retry budget caps retries to a share of recent requests), and finally the
contradictions: settings that quietly cancel each other out.

``explain_upstream`` is pure (a policy in, an ``Explanation`` out) so tests can check the arithmetic directly.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO

import yaml

from proxy.policy.check import check_file
from proxy.policy.explain_grpc import grpc_deadline_words, grpc_failure_words, grpc_retry_words
from proxy.policy.explain_rates import for_route, rate_limit_words, route_words, without_password
from proxy.policy.model import RoutePolicy, UpstreamPolicy
from proxy.policy.schema import to_plain
from proxy.policy.values import format_duration
from proxy.resilience.failures import FAILED_ANSWER, FailureKind
from proxy.resilience.retry import RetryRules, backoff_delays, decide_retry

# Outcomes the forwarder records as breaker failures, in the words of ``x-sidecar-reason``.
_HTTP_FAILURES = (*FailureKind, f"{FAILED_ANSWER} answers")
# What the tcp relay records: a connect that fails (timing out included) is a connect_error.
_TCP_FAILURES = f"{FailureKind.CONNECT_ERROR}, {FailureKind.TIMEOUT} (on connect)"
_NEVER_RETRIED_BY_DEFAULT = ("POST", "PATCH")
_WIDTH = 110


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _d(seconds: float) -> str:
    return format_duration(round(seconds, 6))


@dataclass
class Explanation:
    name: str
    attempts: int  # 1 + max_retries (http)
    backoffs: list[float]  # before retry 1, 2, … (no jitter: the longest each can be)
    unbounded_wait: float  # attempts × per_try + backoffs
    worst_wait: float  # bounded by total
    attempts_when_timing_out: int  # tries that can start when every try runs to per_try
    amplification: float  # worst-case upstream requests per client request, without the budget
    consequences: list[str] = field(default_factory=list)
    contradictions: list[str] = field(default_factory=list)
    routes: list[tuple[RoutePolicy, Explanation]] = field(default_factory=list)


def _backoffs(policy: UpstreamPolicy) -> list[float]:
    """The forwarder's backoff schedule without jitter (the longest each delay can be), one per retry."""
    retry = policy.retry
    return list(itertools.islice(backoff_delays(retry.base_delay, retry.max_delay, jitter=False), retry.max_retries))


def _attempts_when_timing_out(policy: UpstreamPolicy, backoffs: list[float]) -> int:
    """Tries that start when every one runs the full per_try and is then retried if ``decide_retry`` allows
    (as if timeouts were retried, for every method, with no budget and no breaker in the way)."""
    t, retry = policy.timeouts, policy.retry
    rules = RetryRules(retry.max_retries, frozenset({FailureKind.TIMEOUT}), frozenset(), frozenset({"GET"}))
    schedule = iter(backoffs)
    now, tries = 0.0, 0
    while now < t.total:
        tries += 1
        now += min(t.per_try, t.total - now)
        decision = decide_retry(
            rules,
            attempts=tries,
            method="GET",
            kind=FailureKind.TIMEOUT,
            status=0,
            body_replayable=True,
            backoff=schedule,
            retry_after=None,
            max_delay=retry.max_delay,
            now=now,
            deadline=t.total,
        )
        if not decision.retry:
            break
        now += decision.delay
    return tries


def _retried_outcomes(policy: UpstreamPolicy) -> str:
    retry = policy.retry
    words: list[str] = []
    for value in retry.retry_on:
        if isinstance(value, int):
            words.append(str(value))
        elif value == "gateway_error":
            words.append("502/503/504")
        elif value == "retriable_4xx":
            words.append("409")
        else:
            words.append(value)
    return ", ".join(words) if words else "nothing"


def _retries_possible(policy: UpstreamPolicy) -> bool:
    retry = policy.retry
    if policy.protocol == "grpc":  # refused streams are retried whatever grpc.retry_on says
        return retry.max_retries > 0
    return policy.protocol == "http" and retry.max_retries > 0 and bool(retry.methods) and bool(retry.retry_on)


def _budget_closed(policy: UpstreamPolicy) -> bool:
    """A budget of ratio 0 and no floor: it never allows a retry."""
    budget = policy.retry.budget
    return budget is not None and budget.ratio == 0 and budget.min_per_second == 0


def explain_upstream(policy: UpstreamPolicy, replay_buffer_bytes: int | None = None) -> Explanation:
    t, retry = policy.timeouts, policy.retry
    http = policy.protocol != "tcp"  # http and grpc: the same attempts, backoff and deadlines
    backoffs = _backoffs(policy) if http else []
    attempts = 1 + retry.max_retries if http else 1
    unbounded = attempts * t.per_try + sum(backoffs) if http else t.connect
    worst = min(t.total, unbounded) if http else t.connect
    timing_out = _attempts_when_timing_out(policy, backoffs) if http else 1
    amplification = float(attempts) if _retries_possible(policy) and not _budget_closed(policy) else 1.0
    ex = Explanation(policy.name, attempts, backoffs, unbounded, worst, timing_out, amplification)
    ex.consequences += _waiting(policy, ex) if http else _tcp_waiting(policy)
    ex.consequences += grpc_deadline_words(policy)
    ex.consequences += _retries(policy, ex, replay_buffer_bytes)
    ex.consequences += _breaker(policy, ex)
    ex.consequences += _health(policy)
    rate_said, rate_flags = rate_limit_words(policy)
    ex.consequences += rate_said
    ex.contradictions += rate_flags
    ex.contradictions += _contradictions(policy, ex)
    for route in policy.routes:
        # A route is the upstream with its own timeouts, retry and wait for tokens: the same arithmetic, the same
        # flags, and what its weight and own limits add.
        route_ex = explain_upstream(for_route(policy, route), replay_buffer_bytes)
        route_ex.consequences += route_words(policy, route)
        ex.routes.append((route, route_ex))
    return ex


def _waiting(policy: UpstreamPolicy, ex: Explanation) -> list[str]:
    """How long an http caller can wait, and what each timeout bounds."""
    t, limits = policy.timeouts, policy.limits
    parts = f"{ex.attempts} attempt{'s' if ex.attempts > 1 else ''} × {_d(t.per_try)} per_try"
    if ex.backoffs:
        parts += " + backoff " + " + ".join(_d(b) for b in ex.backoffs)
    bound = "bounded by" if ex.unbounded_wait > t.total else "within"
    said = [
        f"A caller waits at most {_d(ex.worst_wait)} for response headers: {parts} = {_d(ex.unbounded_wait)}, "
        f"{bound} total {_d(t.total)}. Connecting counts within each try (at most {_d(t.connect)})."
    ]
    if limits.max_pending > 0 and limits.pending_timeout > 0:
        said.append(
            f"When {limits.max_concurrent} requests are already in flight, up to "
            f"{limits.max_pending} more wait up to {_d(limits.pending_timeout)} for a slot "
            "(that wait counts against total); beyond that they are answered 503 overload at once."
        )
    said.append(
        f"Timeouts: per_try {_d(t.per_try)} runs from the request's last byte sent to the response head (a slow "
        f"upload is not cut by it); total {_d(t.total)} bounds all attempts and backoff until a head is chosen; "
        f"then bodies stream without either, and only a silence longer than idle {_d(t.idle)} in either "
        "direction cuts one off: an upstream's silence is a timeout the breaker counts, a client's is answered "
        "408 (or its body cut) and never counted."
    )
    return said


def _tcp_waiting(policy: UpstreamPolicy) -> list[str]:
    return [
        f"A client connection waits at most {_d(policy.timeouts.connect)} for the upstream connection to open; "
        "after that bytes are relayed as-is, without timeouts or retries (tcp)."
    ]


def _retries(policy: UpstreamPolicy, ex: Explanation, replay_buffer_bytes: int | None) -> list[str]:
    """What is retried, and the upstream load that makes."""
    retry = policy.retry
    if policy.protocol == "tcp":
        return ["Nothing is retried: a tcp upstream is a byte relay (the retry settings do not apply)."]
    if not _retries_possible(policy):
        return ["Nothing is retried: every request makes exactly one attempt (1× upstream load)."]
    grpc = policy.protocol == "grpc"
    said = grpc_retry_words(policy) if grpc else _http_retry_words(policy, replay_buffer_bytes)
    if retry.jitter:
        said.append("Backoff has full jitter: each delay is a random draw between 0 and the value shown.")
    said += _retry_load(policy, ex.attempts)
    if ex.attempts_when_timing_out < ex.attempts:
        said.append(
            f"When every try times out, only {ex.attempts_when_timing_out} of the {ex.attempts} attempts fit in "
            f"total {_d(policy.timeouts.total)}; the rest only happen for failures that come back fast."
        )
    return said


def _http_retry_words(policy: UpstreamPolicy, replay_buffer_bytes: int | None) -> list[str]:
    retry = policy.retry
    said = [
        f"Retried: {_retried_outcomes(policy)} — for {', '.join(retry.methods)} requests only, up to "
        f"{retry.max_retries} time{'s' if retry.max_retries > 1 else ''}, on another target when there is one. "
        f"An upstream's Retry-After is honoured up to max_delay {_d(retry.max_delay)}."
    ]
    if replay_buffer_bytes is not None:
        said.append(f"Requests with bodies over {replay_buffer_bytes} bytes are streamed and never retried.")
    return said


def _retry_load(policy: UpstreamPolicy, attempts: int) -> list[str]:
    """The worst-case upstream load retries make, and what the retry budget caps it to."""
    retry, budget = policy.retry, policy.retry.budget
    if budget is None:
        return [
            f"Worst-case upstream load: {attempts}× the client traffic (1 + max_retries); no retry budget "
            "caps it, so a failing upstream gets every retry."
        ]
    if _budget_closed(policy):
        return []  # a contradiction, flagged as one
    floor = budget.min_per_second
    capped = 1 + min(budget.ratio, retry.max_retries)
    text = (
        f"Worst-case upstream load: {attempts}× the client traffic (1 + max_retries) without the "
        f"budget; the retry budget caps it to about {capped:g}× (retries ≤ {budget.ratio:g} × "
        f"requests) plus {floor:g} retries/s"
    )
    if retry.max_retries > budget.ratio and floor > 0:
        crossover = floor / (retry.max_retries - budget.ratio)
        text += f"; below ≈{crossover:.3g} requests/s that floor still allows every retry"
    return [text + "."]


def _breaker(policy: UpstreamPolicy, ex: Explanation) -> list[str]:
    """What the breaker counts, when it opens, what it answers while open, how it closes."""
    breaker, http = policy.breaker, policy.protocol != "tcp"
    counted = ", ".join(_HTTP_FAILURES) if http else _TCP_FAILURES
    not_counted = (
        "4xx answers, client aborts and requests the sidecar rejected itself."
        if http
        else "connections the client closes."
    )
    said = [
        grpc_failure_words(policy)
        if policy.protocol == "grpc"
        else f"Counted as failures by the breaker: {counted}. Not counted: {not_counted}",
        f"The breaker opens after {_opens_after(policy)}. It then stays open {_d(breaker.open_duration)}, "
        f"{_open_answer(policy)}; then lets {_count(breaker.half_open_max_calls, 'probe')} through: a success "
        f"closes it, a failure keeps it open another {_d(breaker.open_duration)}.",
    ]
    if _retries_possible(policy) and breaker.failure_threshold <= ex.attempts:
        said.append(
            f"Every failed try counts, so one request's {ex.attempts} attempts alone can reach the threshold "
            f"of {breaker.failure_threshold}."
        )
    if not breaker.enforce:
        said.append("Shadow mode (enforce: false): the breaker is evaluated and reported but never rejects a request.")
    return said


def _opens_after(policy: UpstreamPolicy) -> str:
    breaker = policy.breaker
    opens = (
        f"{breaker.failure_threshold} failure{'s' if breaker.failure_threshold > 1 else ''} within {_d(breaker.window)}"
    )
    if breaker.failure_rate_threshold is not None:
        opens += (
            f", or when {breaker.failure_rate_threshold:g}% of at least {breaker.minimum_calls} calls in "
            "the window fail"
        )
    if breaker.slow_call_rate_threshold is not None and breaker.slow_call_duration is not None:
        opens += (
            f", or when {breaker.slow_call_rate_threshold:g}% of them take {_d(breaker.slow_call_duration)} or longer"
        )
    return opens


def _open_answer(policy: UpstreamPolicy) -> str:
    if policy.protocol == "tcp":
        return "refusing connections"
    if policy.protocol == "grpc":
        return "answering trailers-only grpc-status 14 UNAVAILABLE (breaker_open) with grpc-retry-pushback-ms"
    if policy.fallback is not None:
        return f"answering {policy.fallback.status} from the fallback"
    return "answering 503 breaker_open with Retry-After"


def _health(policy: UpstreamPolicy) -> list[str]:
    """How active checks end the breaker's open interval early."""
    h = policy.health
    if h is None:
        return []
    return [
        f"Health is checked every {_d(h.interval)} ({'critical' if h.critical else 'not critical'}: "
        + ("/health answers 503 while it fails)." if h.critical else "/health only reports it).")
        + (
            " A passing check after the breaker opened ends the open interval early"
            if h.healthy_threshold == 1
            else f" {h.healthy_threshold} passing checks in a row after the breaker opened end the open interval early"
        )
        + f" (half-open, health_check_passed) instead of after {_d(policy.breaker.open_duration)}: the next "
        + ("connection" if policy.protocol == "tcp" else "request")
        + " is the probe that closes or re-opens it. Once such a probe fails (a check that passes while the "
        "calls fail), only open_duration ends the breaker's open intervals until it closes."
    ]


def _contradictions(policy: UpstreamPolicy, ex: Explanation) -> list[str]:
    """Settings that quietly cancel each other out."""
    t, breaker = policy.timeouts, policy.breaker
    http = policy.protocol != "tcp"
    flags = []
    if t.per_try < t.connect:
        flags.append(
            f"per_try ({_d(t.per_try)}) is shorter than connect ({_d(t.connect)}): a slow connect is cut off "
            "by per_try first, so connect never applies."
        )
    if http:
        flags += _retry_contradictions(policy, ex)
    if breaker.slow_call_duration is not None and http and breaker.slow_call_duration >= t.per_try:
        flags.append(
            f"slow_call_duration ({_d(breaker.slow_call_duration)}) is not shorter than per_try "
            f"({_d(t.per_try)}): a try is cut off as a timeout before it can count as slow."
        )
    if breaker.open_duration == 0:
        flags.append(
            "breaker.open_duration is 0: an open breaker lets the next request through at once, so it never sheds load."
        )
    if http and policy.limits.pending_timeout >= t.total and policy.limits.max_pending > 0:
        flags.append(
            f"limits.pending_timeout ({_d(policy.limits.pending_timeout)}) is not shorter than total "
            f"({_d(t.total)}): a request can spend its whole deadline queued and then fail without a try."
        )
    if policy.health is not None and policy.health.timeout >= policy.health.interval:
        flags.append(
            f"health.timeout ({_d(policy.health.timeout)}) is not shorter than health.interval "
            f"({_d(policy.health.interval)}): checks pile up on a hanging upstream."
        )
    return flags


def _retry_contradictions(policy: UpstreamPolicy, ex: Explanation) -> list[str]:
    """Retry settings an http upstream can never act on, or should not."""
    t, retry = policy.timeouts, policy.retry
    flags = []
    if _retries_possible(policy) and ex.backoffs and t.total < t.per_try + ex.backoffs[0]:
        flags.append(
            f"total ({_d(t.total)}) is shorter than one try plus one backoff ({_d(t.per_try)} + "
            f"{_d(ex.backoffs[0])}): after a timed-out try no retry can start, so retries are dead for timeouts."
        )
    if _budget_closed(policy) and retry.max_retries > 0:
        flags.append(
            "retry.budget has ratio 0 and min_per_second 0: no retry is ever allowed, so max_retries "
            f"{retry.max_retries} has no effect (set budget: null to turn the budget off instead)."
        )
    if policy.protocol == "grpc":  # retry_on and methods are HTTP's: a grpc upstream has grpc.retry_on
        return flags
    if retry.max_retries > 0 and not retry.methods:
        flags.append("retry.methods is empty: max_retries has no effect.")
    if retry.max_retries > 0 and not retry.retry_on:
        flags.append("retry.retry_on is empty: max_retries has no effect.")
    risky = [m for m in retry.methods if m in _NEVER_RETRIED_BY_DEFAULT] if retry.max_retries else []
    if risky:
        flags.append(
            f"{' and '.join(risky)} {'is' if len(risky) == 1 else 'are'} in retry.methods: a request the "
            "upstream processed but whose answer was lost is sent again, so it may be applied twice. Only "
            "safe when the upstream's handlers are idempotent."
        )
    return flags


def describe_match(route: RoutePolicy) -> str:
    m = route.match
    where = f"path {m.path}" if m.path is not None else f"path_prefix {m.path_prefix}"
    return f"{', '.join(m.methods)} {where}" if m.methods is not None else f"any method, {where}"


def render(policy: UpstreamPolicy, ex: Explanation) -> str:
    targets = ", ".join(str(target) for target in policy.targets)
    lines = [f"upstream {policy.name} ({policy.protocol}): {policy.listen} → {targets}", "", "  effective policy:"]
    effective = to_plain(policy)
    effective.pop("listen", None)
    effective.pop("targets", None)
    effective.pop("routes", None)
    if policy.protocol == "grpc":  # what a grpc upstream retries is grpc.retry_on; every call is a POST
        for key in ("retry_on", "methods"):
            effective["retry"].pop(key, None)
        effective.pop("fallback", None)
        if effective.get("health"):
            effective["health"].pop("path", None)
    else:
        effective.pop("grpc", None)
        if effective.get("health"):
            effective["health"].pop("service", None)
    shared = (effective.get("rate_limit") or {}).get("shared")
    if shared:
        shared["redis"] = without_password(shared["redis"])
    lines += _yaml(effective, "    ")
    lines += _meaning(ex, "  ")
    if ex.routes:
        lines += ["", "  routes (first match wins; a request no route matches gets the policy above):"]
    for route, route_ex in ex.routes:
        lines += ["", f"    route {route.name}: {describe_match(route)}", "", "      effective policy:"]
        retry = to_plain(route.retry)
        retry.pop("budget", None)  # the upstream's, shared
        if policy.protocol == "grpc":
            retry.pop("retry_on", None)
            retry.pop("methods", None)
        shown = {"timeouts": to_plain(route.timeouts), "retry": retry}
        if policy.rate_limit is not None:
            shown |= {"weight": route.weight, "rate_limit": to_plain(route.rate_limit)}
        lines += _yaml(shown, "        ")
        # What differs from the upstream's own: the waiting and the retrying (the breaker is the upstream's).
        differs = [c for c in route_ex.consequences if c not in ex.consequences and not c.startswith("Counted")]
        lines += _meaning(dataclasses.replace(route_ex, consequences=differs), "      ")
    return "\n".join(lines) + "\n"


def _yaml(value: object, indent: str) -> list[str]:
    body = yaml.safe_dump(value, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)
    return [indent + line for line in body.rstrip().splitlines()]


def _meaning(ex: Explanation, indent: str) -> list[str]:
    lines = ["", f"{indent}what it means:"]
    for text in ex.consequences:
        lines += textwrap.wrap(text, _WIDTH, initial_indent=f"{indent}  - ", subsequent_indent=f"{indent}    ")
    if ex.contradictions:
        lines += ["", f"{indent}contradictions:"]
        for text in ex.contradictions:
            lines += textwrap.wrap(text, _WIDTH, initial_indent=f"{indent}  ! ", subsequent_indent=f"{indent}    ")
    return lines


def explain_command(path: str, upstream: str | None, out: IO[str], environ: Mapping[str, str] | None = None) -> int:
    report = check_file(path, environ)
    if report.config is None:
        for issue in report.issues:
            out.write(f"{issue}\n")
        return 1
    config = report.config
    policies = list(config.upstreams)
    if upstream is not None:
        names = [u.name for u in policies]
        if upstream not in names:
            close = difflib.get_close_matches(upstream, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            out.write(f"{path}: no upstream named {upstream!r}{hint}; it has: {', '.join(names)}\n")
            return 1
        policies = [config.upstream(upstream)]
    blocks = [render(p, explain_upstream(p, config.http.replay_buffer_bytes)) for p in policies]
    out.write("\n".join(blocks))
    return 0
