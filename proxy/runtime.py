"""One upstream's live state: its policy and the breaker, budget, targets, bulkhead and counters enforcing it.

A reload builds a new ``UpstreamRuntime`` from the new policy and hands over what must survive: the breaker
(when its policy did not change), the counters, and the connection pools (when the targets did not change).
Requests already in flight keep the runtime they started with.
"""

from __future__ import annotations

import collections
import enum
import logging
import random
import time

from proxy.logs import Throttled
from proxy.metrics import RateView, UpstreamStats, UpstreamView
from proxy.policy.model import RetryPolicy, RoutePolicy, Timeouts, UpstreamPolicy
from proxy.ratelimits import UpstreamRateLimit, limit_label
from proxy.resilience.breaker import CircuitBreaker, Event, Permit, State, Transition
from proxy.resilience.budget import RetryBudget
from proxy.resilience.bulkhead import Bulkhead
from proxy.resilience.clock import Clock
from proxy.resilience.retry import RetryRules
from proxy.upstream.balancer import Balancer, TargetState
from proxy.upstream.errors import OutOfResources
from proxy.upstream.h2pool import H2Pool
from proxy.upstream.health import CheckResult, HealthStatus
from proxy.upstream.pool import DEFAULT_MAX_HEAD_BYTES
from proxy.upstream.tls import ClientContext

log = logging.getLogger("seawall.breaker")
health_log = logging.getLogger("seawall.health")
_exhausted = Throttled(logging.getLogger("seawall.resources"))

RECENT_TRANSITIONS = 20
HEALTH_PASSED = Event.HEALTH_PASSED.value


class Outcome(enum.Enum):
    """What one attempt tells about the upstream (``UpstreamRuntime.settle``)."""

    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"  # no verdict: a stale pooled connection, the client's fault, a cool-down answer


def _rules(retry: RetryPolicy) -> RetryRules:
    return RetryRules(retry.max_retries, retry.retry_kinds(), retry.retry_statuses(), frozenset(retry.methods))


class Route:
    """What one exchange takes from its route: timeouts, retry settings and rules, precomputed. The upstream's
    own policy is the route (``name`` None) of every request no ``routes:`` entry matches."""

    __slots__ = ("_exact", "_methods", "_prefix", "name", "rate_max_wait", "retry", "rules", "timeouts", "weight")

    def __init__(self, name: str | None, timeouts: Timeouts, retry: RetryPolicy, policy: RoutePolicy | None = None):
        self.name = name
        self.timeouts = timeouts
        self.retry = retry
        self.rules = _rules(retry)
        self.weight = policy.weight if policy is not None else 1  # tokens one request costs (rate_limit)
        own = policy.rate_limit if policy is not None else None
        self.rate_max_wait = own.max_wait if own is not None else None  # None: the upstream's max_wait
        match = policy.match if policy is not None else None
        self._exact = match.path.encode() if match is not None and match.path is not None else None
        self._prefix = match.path_prefix.encode() if match is not None and match.path_prefix is not None else b""
        self._methods = frozenset(match.methods) if match is not None and match.methods is not None else None

    def matches(self, path: bytes, method: str) -> bool:
        """``path`` without its query string."""
        if self._methods is not None and method not in self._methods:
            return False
        if self._exact is not None:
            return path == self._exact
        return path.startswith(self._prefix)


class UpstreamRuntime:
    stats: UpstreamStats
    breaker: CircuitBreaker
    budget: RetryBudget | None
    balancer: Balancer
    health: HealthStatus
    bulkhead: Bulkhead

    def __init__(
        self,
        policy: UpstreamPolicy,
        clock: Clock,
        previous: UpstreamRuntime | None = None,
        idle_timeout: float = 30.0,
        max_response_head: int = DEFAULT_MAX_HEAD_BYTES,
        tls: ClientContext | None = None,
    ) -> None:
        self.policy = policy
        self.tls = tls  # the client context of the https targets (and their health checks)
        self.name = policy.name
        self.clock = clock
        self.stats = previous.stats if previous is not None else UpstreamStats()
        self.recent_transitions: collections.deque[Transition] = (
            previous.recent_transitions if previous is not None else collections.deque(maxlen=RECENT_TRANSITIONS)
        )
        same_breaker = previous is not None and previous.policy.breaker == policy.breaker
        if previous is not None and same_breaker:
            self.breaker = previous.breaker
            self.breaker.on_transition = self._on_transition
        else:
            self.breaker = CircuitBreaker(policy.name, policy.breaker.settings(), self._on_transition)
        retry = policy.retry
        self.default_route = Route(None, policy.timeouts, retry)
        # Empty for an upstream without routes: the forwarder then never looks (no cost per request).
        self.routes = tuple(Route(r.name, r.timeouts, r.retry, r) for r in policy.routes)
        if previous is not None and previous.policy.retry.budget == retry.budget:
            self.budget = previous.budget
        else:
            self.budget = RetryBudget(retry.budget.ratio, retry.budget.min_per_second) if retry.budget else None
        if (
            previous is not None
            and previous.policy.targets == policy.targets
            and (previous.policy.outlier == policy.outlier and previous.policy.balance == policy.balance)
        ):
            self.balancer = previous.balancer
            for pool in self.balancer.pools():
                pool.max_head_bytes = max_response_head  # new connections take the reloaded limit
            self.balancer.set_tls(tls)
        else:
            self.balancer = Balancer(
                policy.targets,
                policy.balance,
                policy.outlier,
                idle_timeout,
                max_head_bytes=max_response_head,
                tls=tls,
                clock=clock,
            )
        if previous is not None:
            # One bulkhead across reloads: requests waiting in line keep their place, the new limits apply.
            self.bulkhead = previous.bulkhead
            self.bulkhead.limits = policy.limits
        else:
            self.bulkhead = Bulkhead(policy.limits, clock, self.stats)
        self.health = (
            previous.health if previous is not None and previous.policy.health == policy.health else HealthStatus()
        )
        # Checks passed in a row since the breaker last opened: ``healthy_threshold`` of them half-open it.
        self.passes_since_open: int = previous.passes_since_open if previous is not None and same_breaker else 0
        self.rng = random.Random()  # backoff jitter (the balancer has its own, for least_request)
        self.enforce = policy.breaker.enforce
        self.answer_cache: dict[tuple[object, ...], bytes] = {}  # fail-fast answers (see forwarder)
        self.rate = self._rate_limit(policy, previous)
        self.fallback = policy.fallback
        self.grpc_rules = policy.grpc.rules()  # protocol: grpc: what a call's end means (proxy.resilience.grpc)
        if policy.protocol == "grpc":
            self._h2_pools(policy, tls, idle_timeout)

    def _h2_pools(self, policy: UpstreamPolicy, tls: ClientContext | None, idle_timeout: float) -> None:
        """A gRPC upstream's targets are reached over multiplexed HTTP/2 connections, kept with the balancer
        across reloads (new connections take a reloaded TLS context)."""
        for state in self.balancer.states:
            context = tls if state.target.is_tls else None
            if state.h2 is None:
                state.h2 = H2Pool(state.target, context, policy.timeouts.connect, idle_timeout)
            elif state.h2.tls is not context:
                state.h2.set_tls(context)

    def close_pools(self) -> None:
        """Drop every upstream connection now (the sidecar stops, or the upstream was removed)."""
        for state in self.balancer.states:
            state.pool.abort_all()
            if state.h2 is not None:
                state.h2.close()

    def _rate_limit(self, policy: UpstreamPolicy, previous: UpstreamRuntime | None) -> UpstreamRateLimit | None:
        """The outbound rate limit; kept across a reload that leaves it (and the routes' weights and limits)
        unchanged, so its windows, line and cool-down carry on. A changed one starts counting afresh."""
        if policy.rate_limit is None or policy.protocol == "tcp":
            return None
        if (
            previous is not None
            and previous.rate is not None
            and previous.policy.rate_limit == policy.rate_limit
            and previous.rate.specs == policy.rate_limit_specs()
        ):
            return previous.rate
        return UpstreamRateLimit(policy, self.clock)

    def route_for(self, path: bytes, method: str) -> Route:
        """The first route matching the request (its path without the query string), else the upstream's own."""
        query = path.find(b"?")
        if query >= 0:
            path = path[:query]
        for route in self.routes:
            if route.matches(path, method):
                return route
        return self.default_route

    def _on_transition(self, transition: Transition) -> None:
        if transition.from_state is transition.to_state:
            return  # a reset of a closed breaker changes nothing worth counting
        if transition.to_state is State.OPEN:
            self.passes_since_open = 0  # only checks after the opening speak for a recovery
        elif transition.reason == HEALTH_PASSED:
            self.stats.health_recoveries += 1
        self.stats.transition(transition.from_state.value, transition.to_state.value)
        self.recent_transitions.append(transition)
        log.warning(
            "breaker %s: %s -> %s (%s)",
            self.name,
            transition.from_state.value,
            transition.to_state.value,
            transition.reason,
            extra={
                "event": "breaker_transition",
                "upstream": self.name,
                "from_state": transition.from_state.value,
                "to_state": transition.to_state.value,
                "reason": transition.reason,
                "wall_time": time.time(),
            },
        )

    def settle(
        self,
        permit: Permit | None,
        target: TargetState | None,
        outcome: Outcome,
        now: float,
        duration: float = 0.0,
        kind: str = "",
        label: str | None = None,
        logger: logging.Logger = log,
    ) -> None:
        """The one place an attempt's outcome is recorded, for HTTP and TCP alike: the breaker (its permit), the
        target's outlier count, the failure counter. ``kind`` is the failure kind (or ``5xx``), ``label`` the
        failures metric's label where it is finer (``tls_error``); ``duration`` is what the breaker's slow-call
        rule sees. Ignored outcomes (stale reuse, a client's fault, a cool-down answer) only free the permit."""
        if outcome is Outcome.FAILURE:
            self.stats.failed(label or kind)
            if permit is not None:
                self.breaker.record_failure(permit, now, duration)
            if target is not None:
                self.report_target(target, ok=False, now=now, kind=kind, logger=logger)
        elif outcome is Outcome.SUCCESS:
            if permit is not None:
                self.breaker.record_success(permit, now, duration)
            if target is not None and self.balancer.detector is not None:  # a success clears the target's count
                self.report_target(target, ok=True, now=now)
        elif permit is not None:
            self.breaker.record_ignored(permit)

    def out_of_resources(self, permit: Permit | None, exc: OutOfResources) -> None:
        """The sidecar could not connect for want of its own resources: an overload, nobody's failure.
        Releases the permit unrecorded, counts the refusal and logs it (at most once a second, with a count)."""
        if permit is not None:
            self.breaker.record_ignored(permit)
        self.stats.reject("overload")
        _exhausted.warning("out_of_resources", "%s: %s", self.name, exc, extra={"upstream": self.name})

    def record_check(self, result: CheckResult) -> None:
        """One active check's result: into the health verdict and the counters; a changed verdict is logged."""
        health = self.policy.health
        assert health is not None
        outcome = "pass" if result.passed else "fail"
        self.stats.checks[outcome] = self.stats.checks.get(outcome, 0) + 1
        if self.health.record(result, health, time.time()):
            health_log.warning(
                "upstream %s is %s",
                self.name,
                "healthy" if self.health.healthy else "unhealthy",
                extra={
                    "event": "health_changed",
                    "upstream": self.name,
                    "healthy": self.health.healthy,
                    "detail": result.detail,
                },
            )
        self._recover_on_health(result.passed, health.healthy_threshold)

    def _recover_on_health(self, passed: bool, threshold: int) -> None:
        """``healthy_threshold`` checks passed in a row since the breaker opened end the open interval early:
        the breaker turns half-open and the next real calls, as probes, close it or re-open it (Envoy's active
        checks bring a host back the same way, but a check is not a call: a shallow /health passes while the
        calls fail). Recovery without waiting out open_duration, for an upstream that was down and came back
        with no traffic to probe it. A failing check never opens a breaker: that stays the verdict of real calls.
        """
        if not passed:
            self.passes_since_open = 0
            return
        now = self.clock.monotonic()
        if self.breaker.snapshot(now).state is not State.OPEN:
            return  # closed: nothing to end; half-open: the probes decide
        self.passes_since_open += 1
        if self.passes_since_open >= threshold:
            self.breaker.half_open_on_health(now)

    def report_target(
        self, state: TargetState, ok: bool, now: float, kind: str = "", logger: logging.Logger = log
    ) -> None:
        """An attempt's outcome on one target, for outlier detection; an ejection it causes is logged here, once
        (on the caller's ``logger``, so the line keeps the name of the data path it happened on)."""
        ejected = self.balancer.report(state, ok=ok, now=now, kind=kind)
        if ejected:
            logger.warning(
                "target %s of %s ejected: %s",
                state.target,
                self.name,
                ejected,
                extra={
                    "event": "target_ejected",
                    "upstream": self.name,
                    "target": str(state.target),
                    "reason": ejected,
                },
            )

    def effective_state(self) -> State:
        return self.breaker.snapshot(self.clock.monotonic()).effective_state

    def view(self) -> UpstreamView:
        def health_up() -> tuple[bool, float] | None:
            if self.policy.health is None or self.health.healthy is None:
                return None
            return self.health.healthy, self.health.latency

        def ejected() -> list[tuple[str, bool]]:
            if len(self.balancer.states) < 2:
                return []
            now = self.clock.monotonic()
            return [(str(s.target), s.ejected(now)) for s in self.balancer.states]

        def budget_remaining() -> float | None:
            if self.budget is None:
                return None
            now = self.clock.monotonic()
            _, retries = self.budget.totals(now)
            return max(0.0, self.budget.allowance(now) - retries)

        def rate_limit() -> RateView | None:
            rate = self.rate
            if rate is None:
                return None
            snap = rate.snapshot()
            return RateView(
                refused=dict(rate.counts.refused),
                cooldowns=rate.counts.cooldowns,
                tokens=[
                    (limit_label(s.spec.requests, s.spec.per, s.spec.fixed, s.spec.scope), s.left) for s in snap.limits
                ],
                waiting=snap.waiting,
                cooldown_left=snap.cooldown_left,
                counted=snap.shared.value,
            )

        return UpstreamView(
            rate_limit=rate_limit,
            name=self.name,
            stats=self.stats,
            breaker_state=lambda: self.effective_state().value,
            connections=self.balancer.connection_counts,
            health_up=health_up,
            ejected_targets=ejected,
            budget_remaining=budget_remaining,
        )
