"""A tiny run of `dispatcher bench`, so it never rots (its targets are not asserted here)."""

from __future__ import annotations

from dispatcher import bench, config


async def test_bench_measures_both_phases(database: str) -> None:
    report = await bench.run(
        config.Settings(), deliveries=200, concurrency=16, database_url=database
    )
    assert report.deliveries == 200
    assert report.ceiling_per_s > 0
    assert report.dispatcher_per_s > 0
    assert abs(report.ratio - report.dispatcher_per_s / report.ceiling_per_s) < 0.01
    assert report.statements_per_delivery is not None
    assert 0 < report.statements_per_delivery < 1
