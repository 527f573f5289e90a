"""The gRPC benchmark's own pieces (tests/benchmarks/grpc_bench.py, h2_floor.py): its load generator against a real
grpc.aio echo, its interleaving, its target lines and its profile grouping, so a broken benchmark shows up in CI
rather than in the middle of a measurement."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from tests.benchmarks import grpc_bench, h2_floor
from tests.support.grpc_echo import running_echo

Stubs = tuple[ModuleType, ModuleType]


async def test_the_load_generator_counts_every_call_and_each_error_by_status(stubs: Stubs) -> None:
    directory = Path(stubs[0].__file__ or "").parent
    async with running_echo(*stubs) as echo:
        result = await grpc_bench.load(echo.port, 0.3, 5, directory)
        assert result["calls"] == echo.calls > 0
        assert result["errors"] == {}
        echo.fail_next = 3  # the next three calls fail UNAVAILABLE
        failing = await grpc_bench.load(echo.port, 0.3, 1, directory)
    assert failing["errors"] == {"UNAVAILABLE": 3}
    assert failing["calls"] > 0


def test_rounds_are_interleaved_forwards_then_backwards() -> None:
    order = [key for _, key in grpc_bench.interleaved(["a", "b", "c"], 3)]
    assert order == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]


def test_the_issue_targets_are_checked_against_direct() -> None:
    results = {"direct": {"calls_s": 1000.0}, "sidecar-grpc": {"calls_s": 650.0, "proxy_cpu_us_per_call": 310.0}}
    assert [ok for _, _, ok in grpc_bench.checks(results)] == [True, False]


def test_profile_time_goes_to_the_nearest_known_package(tmp_path: Path) -> None:
    site = "/venv/lib/python3.11/site-packages"
    ours = f"{grpc_bench.REPO}/proxy/h2/engine.py"
    raw = tmp_path / "raw.txt"
    raw.write_text(
        f"Runner.run (/usr/lib/python3.11/asyncio/runners.py:118) 1\n"
        f"flush ({ours}:465) 2\n"
        f"receive ({ours}:1);receive_data ({site}/h2/connection.py:1);debug (/usr/lib/logging/__init__.py:1) 3\n"
        f"encode ({site}/hpack/hpack.py:1) 4\n"
    )
    by = {group: (own, attributed) for group, own, attributed in grpc_bench.time_by_package(raw)}
    assert by["h2"] == (0.0, 30.0)  # logging called by h2 counts as h2's
    assert by["other (stdlib, ...)"] == (30.0, 0.0)
    assert by["hpack"] == (40.0, 40.0)
    assert by["seawall (proxy/)"] == (20.0, 20.0)
    assert by[grpc_bench.EVENT_LOOP] == (10.0, 10.0)


def test_the_h2_floor_relays_calls_in_memory() -> None:
    result = h2_floor.measure(100, 50)
    assert result["calls"] == result["answered"] == 100
    assert result["relay_us_per_call"] > 0
