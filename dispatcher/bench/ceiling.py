"""The ceiling: the same body posted with a plain aiohttp client and nothing else, what the
daemon's throughput is measured against."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp

from .kit import Context, per


@dataclass(frozen=True, slots=True)
class Ceiling:
    deliveries: int
    per_s: float
    cpu_seconds_per_post: float
    receiver_cpu_us_per_post: float | None
    seconds: float
    # Posted in two halves, right before and right after the burn-down: a machine whose
    # speed drifts during the run (shared cores) moves both sides of the ratio alike.
    halves_per_s: tuple[float, ...] = ()


def both_sides(before: Ceiling, after: Ceiling) -> Ceiling:
    """One ceiling from the halves measured before and after the burn-down."""
    count = before.deliveries + after.deliveries
    seconds = before.seconds + after.seconds
    receiver = (
        None
        if before.receiver_cpu_us_per_post is None or after.receiver_cpu_us_per_post is None
        else round(
            (
                before.receiver_cpu_us_per_post * before.deliveries
                + after.receiver_cpu_us_per_post * after.deliveries
            )
            / count,
            1,
        )
    )
    cpu = (
        before.cpu_seconds_per_post * before.deliveries
        + after.cpu_seconds_per_post * after.deliveries
    ) / count
    return Ceiling(
        count,
        round(count / seconds, 1),
        round(cpu, 6),
        receiver,
        round(seconds, 3),
        (before.per_s, after.per_s),
    )


async def ceiling(ctx: Context, body: bytes, count: int) -> Ceiling:
    """A plain aiohttp client: the same body, receiver and concurrency, no database."""
    url = f"{ctx.base_url}/ok/ceiling"
    remaining = count
    done = 0
    headers = {"Content-Type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal remaining, done
        while remaining > 0:
            remaining -= 1
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
            done += 1

    async def report() -> None:
        while True:
            elapsed = time.perf_counter() - begun
            ctx.progress.show(
                f"[ceiling] {done:,}/{count:,} posted, {done / max(elapsed, 1e-9):,.0f}/s"
            )
            await asyncio.sleep(0.1)

    connector = aiohttp.TCPConnector(limit=ctx.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        begun = time.perf_counter()
        cpu0 = time.process_time()
        receiver0 = ctx.other_cpu()[1]
        shown = asyncio.create_task(report())
        try:
            await asyncio.gather(*(worker(session) for _ in range(ctx.concurrency)))
        finally:
            shown.cancel()
        elapsed = time.perf_counter() - begun
        cpu = time.process_time() - cpu0
        receiver1 = ctx.other_cpu()[1]
    ctx.progress.done()
    receiver = None if receiver0 is None or receiver1 is None else receiver1 - receiver0
    return Ceiling(
        count,
        round(count / elapsed, 1),
        round(cpu / count, 6),
        per(receiver, count),
        round(elapsed, 3),
    )


# Scenarios --------------------------------------------------------------------------------------
