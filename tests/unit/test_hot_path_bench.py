"""The socket-free benchmark (tests/benchmarks/hot_path.py) still drives the real protocol objects end to end, for
both of its variants, so a change to the data plane that breaks it shows up in CI rather than mid-measurement."""

from __future__ import annotations

from tests.benchmarks import hot_path


async def test_each_variant_serves_its_requests_through_the_real_listener_and_upstream_connection() -> None:
    for extra in hot_path.VARIANTS.values():
        pair = hot_path.Pair(extra)
        spent = await pair.serve(50)
        assert spent >= 0.0
        assert pair.client_side.writes == 50 and pair.upstream_side.writes == 50  # one write each way per request
        assert pair.rt.stats.requests == {200: 50}
        assert pair.client_side.last.endswith(hot_path.ANSWER[-12:])


def test_the_report_gives_each_variant_its_ratio_to_the_first_within_each_round() -> None:
    table = hot_path.report(["a", "b"], {"a": [10.0, 20.0], "b": [11.0, 20.0]})
    assert "| a | 15.00 | 10.00 – 20.00 | 1.000 (1.000 – 1.000) |" in table
    assert "| b | 15.50 | 11.00 – 20.00 | 1.050 (1.000 – 1.100) |" in table
