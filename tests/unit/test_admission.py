"""The admission pipeline with recording stages: one order, a refusal stops it, only the stages passed are
released, a waiting stage is awaited and the rest go on from it, a cancelled wait releases what was held."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxy.http.admission import PIPELINE, WAIT, BreakerStage, BulkheadStage, Pipeline, RateLimitStage, Refusal

NO = Refusal(503, "no", "refused", "no")


@dataclass
class Ticket:
    rt: Any = None
    route: Any = None
    passed: int = 0
    log: list[str] = field(default_factory=list)


class Stage:
    def __init__(self, name: str, now: Any = None, later: Any = None, gate: asyncio.Event | None = None) -> None:
        self.name, self.now, self.later, self.gate = name, now, later, gate

    def try_admit(self, ticket: Ticket) -> Any:
        ticket.log.append(f"try {self.name}")
        return self.now

    async def admit(self, ticket: Ticket) -> Refusal | None:
        ticket.log.append(f"wait {self.name}")
        if self.gate is not None:
            await self.gate.wait()
        return self.later

    def release(self, ticket: Ticket) -> None:
        ticket.log.append(f"release {self.name}")


def test_the_shipped_order_is_bulkhead_breaker_rate_limit() -> None:
    assert [type(s) for s in PIPELINE.stages] == [BulkheadStage, BreakerStage, RateLimitStage]


def test_every_stage_answering_at_once_admits_without_a_coroutine() -> None:
    pipeline, ticket = Pipeline(Stage("a"), Stage("b"), Stage("c")), Ticket()
    assert pipeline.try_admit(ticket) is None
    assert ticket.passed == 3
    pipeline.release(ticket)
    assert ticket.log == ["try a", "try b", "try c", "release c", "release b", "release a"]
    assert ticket.passed == 0


def test_a_refusal_stops_the_pipeline_and_only_the_stages_passed_are_released() -> None:
    pipeline, ticket = Pipeline(Stage("a"), Stage("b", now=NO), Stage("c")), Ticket()
    assert pipeline.try_admit(ticket) is NO
    pipeline.release(ticket)
    assert ticket.log == ["try a", "try b", "release a"]


async def test_a_waiting_stage_is_awaited_and_the_rest_go_on_from_it() -> None:
    """``admit`` goes on from the stage that said WAIT: it is not asked again (asking twice could spend twice)."""
    pipeline, ticket = Pipeline(Stage("a"), Stage("b", now=WAIT), Stage("c")), Ticket()
    assert pipeline.try_admit(ticket) is WAIT
    assert await pipeline.admit(ticket) is None
    assert ticket.log == ["try a", "try b", "wait b", "try c"]
    assert ticket.passed == 3


async def test_a_stage_that_refuses_after_waiting_releases_the_ones_before() -> None:
    pipeline, ticket = Pipeline(Stage("a"), Stage("b", now=WAIT, later=NO), Stage("c")), Ticket()
    assert pipeline.try_admit(ticket) is WAIT
    assert await pipeline.admit(ticket) is NO
    pipeline.release(ticket)
    assert ticket.log[-1] == "release a" and "release b" not in ticket.log and "try c" not in ticket.log


async def test_a_caller_cancelled_while_waiting_releases_exactly_what_it_holds() -> None:
    gate = asyncio.Event()
    pipeline, ticket = Pipeline(Stage("a"), Stage("b", now=WAIT, gate=gate), Stage("c")), Ticket()
    assert pipeline.try_admit(ticket) is WAIT
    task = asyncio.ensure_future(pipeline.admit(ticket))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pipeline.release(ticket)
    assert [line for line in ticket.log if line.startswith("release")] == ["release a"]
