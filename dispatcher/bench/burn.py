"""Burn-down: a backlog published at once, drained by the daemon."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..app import started
from .kit import (
    Context,
    Meter,
    daemon_settings,
    drain,
    first_attempt_lags,
    forget,
    ms,
    per,
    percentiles,
    publish,
    rss_mb,
    subscribe,
)


@dataclass(frozen=True, slots=True)
class Burn:
    """A backlog published in one transaction, burnt down by the daemon."""

    deliveries: int
    publish_seconds: float
    per_s: float
    ratio_to_ceiling: float | None
    lag_p50_ms: float | None
    lag_p99_ms: float | None
    statements_per_delivery: float | None
    wal_bytes_per_delivery: float
    cpu_seconds_per_delivery: float
    postgres_cpu_us_per_delivery: float | None
    receiver_cpu_us_per_delivery: float | None
    peak_rss_mb: float
    rss_idle_mb: float  # the daemon started, before the backlog
    rss_after_mb: float  # the backlog burnt down, the daemon still running
    tables_before_kb: dict[str, int]
    tables_after_kb: dict[str, int]
    claim_mean_ms: float | None
    record_mean_ms: float | None
    mean_in_flight: float


async def burn(ctx: Context, count: int) -> Burn:
    env = ["bench-burn"]
    settings = daemon_settings(ctx, in_flight=ctx.concurrency, per_endpoint=ctx.concurrency)
    async with started(settings) as daemon:
        await subscribe(ctx, env[0], "/ok/burn")
        meter = Meter(ctx)
        await meter.start()
        rss_idle = rss_mb()
        t0 = time.perf_counter()
        await publish(ctx, env, count)
        publish_s = time.perf_counter() - t0
        busy = daemon.metrics.attempt_seconds_total()
        elapsed = await drain(ctx, "burn", env, count, timeout=max(60.0, count / 200))
        busy = daemon.metrics.attempt_seconds_total() - busy
        rss_after = rss_mb()
        costs = await meter.stop()
        claim_s = daemon.metrics.mean_db_seconds("claim")
        record_s = daemon.metrics.mean_db_seconds("record")
    ctx.progress.done()
    rate = count / elapsed
    p50, p99 = percentiles(await first_attempt_lags(ctx, env), 0.5, 0.99)
    await forget(ctx, env)
    return Burn(
        deliveries=count,
        publish_seconds=round(publish_s, 3),
        per_s=round(rate, 1),
        ratio_to_ceiling=None,  # set against the ceiling measured around it
        lag_p50_ms=ms(p50),
        lag_p99_ms=ms(p99),
        statements_per_delivery=(
            None if costs.statements is None else round(costs.statements / count, 4)
        ),
        wal_bytes_per_delivery=round(costs.wal_bytes / count, 1),
        cpu_seconds_per_delivery=round(costs.cpu_seconds / count, 6),
        postgres_cpu_us_per_delivery=per(costs.postgres_cpu_seconds, count),
        receiver_cpu_us_per_delivery=per(costs.receiver_cpu_seconds, count),
        peak_rss_mb=round(costs.peak_rss_mb, 1),
        rss_idle_mb=round(rss_idle, 1),
        rss_after_mb=round(rss_after, 1),
        tables_before_kb=costs.tables_before_kb,
        tables_after_kb=costs.tables_after_kb,
        claim_mean_ms=ms(claim_s),
        record_mean_ms=ms(record_s),
        mean_in_flight=round(busy / elapsed, 2),
    )
