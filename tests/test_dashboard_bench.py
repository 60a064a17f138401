"""The dashboard benchmark's figures: what the report judges must be what it says it is."""

from __future__ import annotations

from pipeline.dashboard_bench import TARGET_MS, Stats, Timing


def test_stats_median_p95_and_best():
    times = [float(x) for x in range(20, 0, -1)]  # 1..20 ms, unordered
    s = Stats.of(times)
    assert (s.median, s.p95, s.best) == (10.5, 19.0, 1.0)
    assert Stats.of([7.0]) == Stats(7.0, 7.0, 7.0)


def test_a_page_passes_on_its_median_not_its_best_run():
    slow = Timing("page", "web", Stats(TARGET_MS + 1, TARGET_MS + 5, 3.0), None, 1)
    fast = Timing("page", "web", Stats(TARGET_MS - 1, TARGET_MS + 30, 3.0), None, 1)
    assert not slow.ok and fast.ok
