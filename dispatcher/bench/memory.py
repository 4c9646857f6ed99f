"""Memory: the daemon's RSS with a large backlog pending and many requests in flight."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from ..app import started
from .kit import Context, daemon_settings, forget, publish, rss_mb, subscribe


@dataclass(frozen=True, slots=True)
class Memory:
    """A large backlog with many requests in flight: the daemon's resident memory."""

    pending: int
    in_flight: int
    publish_seconds: float
    rss_before_mb: float
    rss_peak_mb: float
    max_in_flight_seen: int


async def memory(ctx: Context, count: int, in_flight: int, seconds: float = 10.0) -> Memory:
    env = ["bench-memory"]
    settings = daemon_settings(ctx, in_flight=in_flight, per_endpoint=in_flight)
    await subscribe(ctx, env[0], "/slow/memory")
    before = rss_mb()
    ctx.progress.show(f"[memory] publishing {count:,} deliveries")
    t0 = time.perf_counter()
    step = 100_000
    for done in range(0, count, step):
        await publish(ctx, env, min(step, count - done))
        ctx.progress.show(f"[memory] published {min(done + step, count):,}/{count:,}")
    publish_s = time.perf_counter() - t0
    peak = before
    seen = 0
    async with started(settings) as running:
        begun = time.perf_counter()
        # Claims fill the slots a batch at a time: run until all `in_flight` were seen (a slow
        # machine takes longer than `seconds` for 1M pending), at most 30 s more.
        while (elapsed := time.perf_counter() - begun) < seconds or (
            seen < in_flight and elapsed < seconds + 30
        ):
            peak = max(peak, rss_mb())
            seen = max(seen, running.worker.in_flight)
            ctx.progress.show(
                f"[memory] {elapsed:4.1f}/{seconds:.0f} s, {running.worker.in_flight} in flight, "
                f"RSS {peak:.0f} MB"
            )
            await asyncio.sleep(0.2)
    ctx.progress.done()
    await forget(ctx, env)
    return Memory(
        pending=count,
        in_flight=in_flight,
        publish_seconds=round(publish_s, 2),
        rss_before_mb=round(before, 1),
        rss_peak_mb=round(peak, 1),
        max_in_flight_seen=seen,
    )
