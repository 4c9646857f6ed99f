"""Retries in bulk: how late retries fire after they fall due."""

from __future__ import annotations

from dataclasses import dataclass

from ..app import started
from .kit import TAG, Context, daemon_settings, drain, forget, ms, percentiles, publish, subscribe


@dataclass(frozen=True, slots=True)
class Retries:
    """First attempts fail together; how late after its due time each retry starts."""

    deliveries: int
    delay_s: float
    retried: int
    late_p50_ms: float | None
    late_p99_ms: float | None
    late_max_ms: float | None
    early: int  # retries started before they were due (should be 0)


async def retries(ctx: Context, count: int, delay: float = 2.0) -> Retries:
    """`count` first attempts fail at once and are retried `delay` later. The delay is longer
    than the burst of first attempts takes (0.3-1.3 s here), so what is measured is when the
    timer fires, not slots still busy with first attempts."""
    env = ["bench-retries"]
    settings = daemon_settings(ctx, in_flight=ctx.concurrency, per_endpoint=ctx.concurrency)
    async with started(settings):
        await subscribe(
            ctx, env[0], "/flaky/retries", {"retry": {"delays": [delay], "max_attempts": 2}}
        )
        await publish(ctx, env, count)
        await drain(ctx, "retries", env, count, timeout=max(60.0, count / 100))
    ctx.progress.done()
    # A retry is due `delay` after the first attempt ended (policy.decide).
    rows = await ctx.conn.fetch(
        TAG + "SELECT extract(epoch FROM b.started_at - a.started_at)::float8 "
        "- a.duration_ms / 1000 - $2::float8 AS late "
        "FROM dispatcher.attempts a JOIN dispatcher.attempts b "
        "ON b.delivery_id = a.delivery_id AND b.attempt = 2 "
        "JOIN dispatcher.deliveries_done d ON d.id = a.delivery_id "
        "WHERE a.attempt = 1 AND d.environment_id = $1",
        env[0],
        delay,
    )
    late = [r["late"] for r in rows]
    await forget(ctx, env)
    p50, p99, top = percentiles(late, 0.5, 0.99, 1.0)
    return Retries(
        deliveries=count,
        delay_s=delay,
        retried=len(late),
        late_p50_ms=ms(p50),
        late_p99_ms=ms(p99),
        late_max_ms=ms(top),
        # Timestamps are rounded to microseconds on the way to Postgres.
        early=sum(1 for x in late if x < -1e-5),
    )
