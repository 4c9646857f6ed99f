"""A tiny run of `dispatcher bench` with every scenario, so it never rots (its targets are
measured, not asserted here)."""

from __future__ import annotations

import os

import orjson

from dispatcher import bench, config


async def test_bench_runs_every_scenario_and_reports_each_number(database: str) -> None:
    plan = bench.Plan(
        scenarios=bench.SCENARIOS,
        deliveries=300,
        concurrency=16,
        steady_seconds=0.5,
        faulty_deliveries=200,
        faulty_endpoints=100,
        retry_deliveries=40,
        memory_pending=300,
        memory_in_flight=20,
        memory_seconds=0.5,
        ordered_deliveries=300,
        ordered_entities=30,
    )
    report = await bench.run(config.Settings(), plan, database_url=database)

    assert report.ceiling is not None
    assert report.ceiling.per_s > 0
    assert report.ceiling.deliveries == 300  # two halves around the burn-down
    assert len(report.ceiling.halves_per_s) == 2
    burn = report.burn
    assert burn is not None
    assert burn.deliveries == 300
    assert burn.per_s > 0
    assert burn.ratio_to_ceiling is not None
    assert abs(burn.ratio_to_ceiling - burn.per_s / report.ceiling.per_s) < 0.01
    assert burn.statements_per_delivery is not None
    assert 0 < burn.statements_per_delivery < 1
    assert burn.wal_bytes_per_delivery > 0
    assert burn.cpu_seconds_per_delivery > 0
    assert report.ceiling.receiver_cpu_us_per_post is not None
    assert report.ceiling.receiver_cpu_us_per_post > 0
    assert burn.receiver_cpu_us_per_delivery is not None
    assert burn.receiver_cpu_us_per_delivery > 0
    if not os.environ.get("DISPATCHER_TEST_DATABASE_URL"):
        # The embedded server runs here: its CPU is read from /proc.
        assert burn.postgres_cpu_us_per_delivery is not None
        assert burn.postgres_cpu_us_per_delivery > 0
    assert burn.mean_in_flight > 0
    assert burn.rss_idle_mb > 0
    assert burn.rss_after_mb > 0
    assert burn.claim_mean_ms is not None
    assert burn.record_mean_ms is not None
    assert burn.lag_p50_ms is not None
    assert burn.lag_p99_ms is not None
    assert 0 <= burn.lag_p50_ms <= burn.lag_p99_ms
    assert burn.tables_after_kb["attempts"] >= burn.tables_before_kb["attempts"]

    steady = report.steady
    assert steady is not None
    assert steady.deliveries > 0
    assert steady.lag_p99_ms is not None

    faulty = report.faulty
    assert faulty is not None
    assert faulty.failing_endpoints == 10
    assert faulty.hanging_endpoints == 1
    assert faulty.healthy_run_per_s > 0
    assert len(faulty.healthy_runs_per_s) == 3
    assert len(faulty.faulty_runs_per_s) == 2
    assert faulty.faulty_run_healthy_per_s > 0
    assert faulty.answered_500 > 0

    retries = report.retries
    assert retries is not None
    assert retries.retried == 40
    assert retries.early == 0
    assert retries.late_p99_ms is not None
    assert retries.late_p99_ms >= 0

    memory = report.memory
    assert memory is not None
    assert memory.rss_peak_mb > 0
    assert memory.max_in_flight_seen > 0
    ordered = report.ordered
    assert ordered is not None
    assert [r.ordered for r in ordered.runs] == [False, True, False]
    assert all(r.per_s > 0 for r in ordered.runs)
    assert ordered.ratio > 0
    assert ordered.runs[1].release_mean_ms is not None  # the ordered run released heads
    assert ordered.runs[0].release_mean_ms is None  # the unordered ones never do

    assert sum(t.met is not None for t in report.targets) == 7  # all but retention
    orjson.loads(orjson.dumps(report))  # --json serializes every field
    names = [name for name, _ in bench._rows(report)]
    assert "burn: ratio to ceiling" in names
    assert "wall time, s" in names
