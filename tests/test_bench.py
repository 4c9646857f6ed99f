"""A tiny run of `dispatcher bench` with every scenario, so it never rots (its targets are
measured, not asserted here)."""

from __future__ import annotations

import asyncio
import os
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest

from dispatcher import bench, config
from dispatcher.bench import kit

from .conftest import PgServer
from .helpers import free_port


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
        large_events=3,
        large_payload_bytes=200_000,
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
    # Split at the publish's commit: the fan-out's rows, then the burn-down's.
    assert burn.wal_publish_bytes_per_delivery is not None
    assert burn.wal_burn_bytes_per_delivery is not None
    assert burn.wal_publish_bytes_per_delivery > 0
    assert burn.wal_burn_bytes_per_delivery > 0
    split = burn.wal_publish_bytes_per_delivery + burn.wal_burn_bytes_per_delivery
    assert abs(split - burn.wal_bytes_per_delivery) < 1
    assert burn.cpu_seconds_per_delivery > 0
    # The receiver costs a few us a request: at these sizes, under one 10 ms clock tick.
    assert report.ceiling.receiver_cpu_us_per_post is not None
    assert report.ceiling.receiver_cpu_us_per_post >= 0
    assert burn.receiver_cpu_us_per_delivery is not None
    assert burn.receiver_cpu_us_per_delivery >= 0
    if not os.environ.get("DISPATCHER_TEST_DATABASE_URL"):
        # The embedded server runs here: its CPU is read from /proc.
        assert burn.postgres_cpu_us_per_delivery is not None
        assert burn.postgres_cpu_us_per_delivery > 0
        assert burn.postgres_publish_cpu_us_per_delivery is not None
        assert burn.postgres_burn_cpu_us_per_delivery is not None
        split = burn.postgres_publish_cpu_us_per_delivery + burn.postgres_burn_cpu_us_per_delivery
        assert abs(split - burn.postgres_cpu_us_per_delivery) < 1
    assert burn.mean_in_flight > 0
    assert burn.rss_idle_mb > 0
    assert burn.rss_after_mb > 0
    assert burn.claim_mean_ms is not None
    assert burn.record_mean_ms is not None
    assert burn.lag_p50_ms is not None
    assert burn.lag_p99_ms is not None
    assert 0 <= burn.lag_p50_ms <= burn.lag_p99_ms
    assert burn.tables_after_kb["attempts"] >= burn.tables_before_kb["attempts"]
    # Timed from the publish's commit by the receiver's own clock.
    assert burn.daemon == "inprocess"
    assert burn.payload_bytes > 800  # ~1 KB events
    assert burn.commit_to_last_s > 0
    assert burn.drain_seconds >= burn.commit_to_last_s - 0.05
    assert burn.first_delivery_ms is not None
    assert 0 <= burn.first_delivery_ms <= burn.commit_to_last_s * 1000
    assert burn.ramp_s is not None
    assert 0 < burn.ramp_s <= burn.commit_to_last_s + 0.2
    assert burn.peak_per_s is not None
    assert burn.peak_per_s > 0
    assert sum(burn.rate_series_per_s) > 0
    assert burn.daemon_cpu_us_per_delivery is not None
    assert burn.daemon_cpu_us_per_delivery > 0
    assert burn.bench_cpu_us_per_delivery is None  # in-process: inside the daemon's
    assert burn.daemon_settings["max_per_endpoint"] == 16
    assert report.ceiling.client_cpu_us_per_post is not None
    assert report.ceiling.client_cpu_us_per_post > 0
    assert report.ceiling.body_bytes > 800
    if not os.environ.get("DISPATCHER_TEST_DATABASE_URL"):
        assert burn.total_cpu_us_per_delivery is not None
        assert burn.total_cpu_us_per_delivery >= burn.daemon_cpu_us_per_delivery
        assert report.ceiling.postgres_cpu_us_per_post is not None
        assert report.ceiling.total_cpu_us_per_post is not None
    assert report.database["scratch"].startswith("database dispatcher_bench_")
    assert report.database["fsync"] in ("on", "off")

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
    assert ordered.runs[1].record_heads_mean_ms is not None  # the ordered run released heads
    assert ordered.runs[0].record_heads_mean_ms is None  # the unordered ones never do

    large = report.large
    assert large is not None
    assert (large.events, large.payload_mb) == (3, 0.2)
    assert large.rss_peak_mb > 0

    assert sum(t.met is not None for t in report.targets) == 11  # all but retention
    orjson.loads(orjson.dumps(report))  # --json serializes every field
    names = [name for name, _ in bench._rows(report)]
    assert "burn: ratio to ceiling" in names
    assert "burn: commit to first delivery, ms" in names
    assert "burn: ramp, commit to within 10% of peak rate, s (peak/s)" in names
    assert "burn: CPU us per delivery, daemon / PostgreSQL / receiver = total" in names
    assert "ceiling: CPU us per POST, client / PostgreSQL / receiver = total" in names
    assert "wall time, s" in names
    assert "large: daemon peak RSS, MB" in names


async def _bench_databases(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE 'dispatcher_bench_%'"
        )
    finally:
        await conn.close()
    return [r["datname"] for r in rows]


async def test_bench_with_a_separate_dispatcher_run_and_a_scratch_database(database: str) -> None:
    before = await _bench_databases(database)
    plan = bench.Plan(scenarios=("burn",), deliveries=200, concurrency=16, daemon="process")
    report = await bench.run(config.Settings(), plan, database_url=database)

    burn = report.burn
    assert burn is not None
    assert burn.daemon == "process"
    # `dispatcher run` with its defaults, not the bench's concurrency.
    assert burn.daemon_settings["max_per_endpoint"] == config.Settings().delivery.max_per_endpoint
    assert burn.per_s > 0
    assert burn.first_delivery_ms is not None
    assert burn.daemon_cpu_us_per_delivery is not None
    assert burn.daemon_cpu_us_per_delivery > 0
    assert burn.bench_cpu_us_per_delivery is not None
    assert burn.claim_mean_ms is not None  # scraped from its /metrics
    assert burn.rss_idle_mb > 0
    # The scratch database is gone, and the given one was never written to.
    assert await _bench_databases(database) == before
    conn = await asyncpg.connect(database)
    try:
        events = await conn.fetchval("SELECT count(*) FROM dispatcher.events")
    finally:
        await conn.close()
    assert events == 0


def test_ramp_is_the_first_smoothed_rate_within_ten_percent_of_the_peak() -> None:
    # 100 ms buckets from t=10.0 s: 2 empty, rising 10, 50, 100, then 100 for a second.
    counts = [0, 0, 10, 50, 100] + [100] * 10 + [30]
    answered = kit.Answered(
        answered=sum(counts),
        first_at=10.2,
        last_at=11.6,
        bucket_seconds=0.1,
        buckets=[(100 + i, n) for i, n in enumerate(counts) if n],
    )
    rose = kit.ramp(answered, since=10.0)
    assert rose.first_delivery_s is not None
    assert abs(rose.first_delivery_s - 0.2) < 1e-9
    assert rose.peak_per_s == 1000.0
    # The 500 ms window first reaches 900/s once it holds no bucket below 50: at 0.8 s.
    assert rose.ramp_s == 0.8
    assert rose.series_per_s[:5] == [0, 0, 100, 500, 1000]


def test_a_backlog_answered_within_the_bucket_after_the_commit_has_a_peak() -> None:
    """All 300 answers in the one bucket after the commit's (a small backlog published late
    in a bucket): that bucket counts, not as a cut-short tail (the peak was 0), smoothed
    with the commit's empty one: 300/s."""
    answered = kit.Answered(
        answered=300,
        first_at=10.45,
        last_at=10.53,
        bucket_seconds=0.5,
        buckets=[(21, 300)],
    )
    rose = kit.ramp(answered, since=10.4)
    assert rose.peak_per_s == 300.0
    assert rose.ramp_s == 1.0
    assert rose.series_per_s == [0, 600]


async def test_a_database_url_that_does_not_connect_is_a_clear_error() -> None:
    port = free_port()
    url = f"postgresql://bench:secret@127.0.0.1:{port}/postgres"
    plan = bench.Plan(scenarios=("burn",), deliveries=10, concurrency=4)
    with pytest.raises(bench.BenchError) as caught:
        await bench.run(config.Settings(), plan, database_url=url)
    message = str(caught.value)
    assert message.startswith(f"--database-url: cannot connect to 127.0.0.1:{port}: ")
    assert "secret" not in message


async def test_a_scratch_database_is_dropped_when_force_may_not_end_a_session(
    pg_server: PgServer,
) -> None:
    # A role that may create databases but not signal another role's backends (as an
    # autovacuum worker's is to it): DROP ... WITH (FORCE) refuses; the bench falls back to
    # a plain DROP, which waits for the other session to leave.
    tag = uuid.uuid4().hex[:10]
    bench_role, other_role, name = f"bench_{tag}", f"other_{tag}", f"dispatcher_bench_{tag}"
    # A password, for a server that asks for one (DISPATCHER_TEST_DATABASE_URL's).
    secret = uuid.uuid4().hex
    admin = await asyncpg.connect(pg_server.admin_dsn)
    try:
        await admin.execute(f"CREATE ROLE \"{bench_role}\" LOGIN CREATEDB PASSWORD '{secret}'")
        await admin.execute(f"CREATE ROLE \"{other_role}\" LOGIN PASSWORD '{secret}'")
        bench_url = _as_role(pg_server.dsn("postgres"), bench_role, secret)
        owner = await asyncpg.connect(bench_url)
        try:
            await owner.execute(f'CREATE DATABASE "{name}"')
        finally:
            await owner.close()
        other = await asyncpg.connect(_as_role(pg_server.dsn(name), other_role, secret))
        may_signal = await admin.fetchval(
            "SELECT pg_has_role($1, $2, 'USAGE')", bench_role, other_role
        )
        assert may_signal is False

        async def leave_soon() -> None:
            await asyncio.sleep(0.5)
            await other.close()

        leaving = asyncio.create_task(leave_soon())
        try:
            await bench._drop_database(bench_url, name)
        finally:
            leaving.cancel()
            if not other.is_closed():
                await other.close()
        left = await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name)
        assert left == 0
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'DROP ROLE IF EXISTS "{bench_role}"')
        await admin.execute(f'DROP ROLE IF EXISTS "{other_role}"')
        await admin.close()


def _as_role(dsn: str, role: str, password: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}:{password}@{host}"))
