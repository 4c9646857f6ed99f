"""Steady: a constant publish rate at half the ceiling, and the lag from due to sent."""

from __future__ import annotations

import asyncio
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
    percentiles,
    publish,
    subscribe,
)


@dataclass(frozen=True, slots=True)
class Steady:
    """Events published at a steady rate (half the ceiling): how late each is sent."""

    target_per_s: float
    achieved_per_s: float
    seconds: float
    deliveries: int
    lag_p50_ms: float | None
    lag_p99_ms: float | None
    lag_max_ms: float | None
    statements_per_delivery: float | None
    cpu_seconds_per_delivery: float


async def steady(ctx: Context, rate: float, seconds: float) -> Steady:
    env = ["bench-steady"]
    settings = daemon_settings(ctx, in_flight=ctx.concurrency, per_endpoint=ctx.concurrency)
    async with started(settings):
        await subscribe(ctx, env[0], "/ok/steady")
        meter = Meter(ctx)
        await meter.start()
        begun = time.perf_counter()
        published = 0
        while (elapsed := time.perf_counter() - begun) < seconds:
            due = int(rate * elapsed) - published
            if due > 0:
                await publish(ctx, env, due)
                published += due
            ctx.progress.show(f"[steady] {elapsed:4.1f}/{seconds:.0f} s, {published:,} published")
            await asyncio.sleep(0.01)
        await drain(ctx, "steady", env, published, timeout=60.0)
        took = time.perf_counter() - begun
        costs = await meter.stop()
    ctx.progress.done()
    lags = await first_attempt_lags(ctx, env)
    p50, p99, top = percentiles(lags, 0.5, 0.99, 1.0)
    await forget(ctx, env)
    n = max(published, 1)
    return Steady(
        target_per_s=round(rate, 1),
        achieved_per_s=round(published / took, 1),
        seconds=round(took, 2),
        deliveries=published,
        lag_p50_ms=ms(p50),
        lag_p99_ms=ms(p99),
        lag_max_ms=ms(top),
        statements_per_delivery=(
            None if costs.statements is None else round(costs.statements / n, 4)
        ),
        cpu_seconds_per_delivery=round(costs.cpu_seconds / n, 6),
    )
