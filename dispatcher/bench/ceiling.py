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
    # CPU per POST by process, as the burn-down reports it per delivery. PostgreSQL is
    # measured too (~0: the ceiling never touches it) so that the totals compare.
    client_cpu_us_per_post: float | None = None
    postgres_cpu_us_per_post: float | None = None
    total_cpu_us_per_post: float | None = None
    body_bytes: int = 0


def both_sides(before: Ceiling, after: Ceiling) -> Ceiling:
    """One ceiling from the halves measured before and after the burn-down."""
    count = before.deliveries + after.deliveries
    seconds = before.seconds + after.seconds

    def weighted(a: float | None, b: float | None) -> float | None:
        if a is None or b is None:
            return None
        return round((a * before.deliveries + b * after.deliveries) / count, 1)

    cpu = (
        before.cpu_seconds_per_post * before.deliveries
        + after.cpu_seconds_per_post * after.deliveries
    ) / count
    return Ceiling(
        count,
        round(count / seconds, 1),
        round(cpu, 6),
        weighted(before.receiver_cpu_us_per_post, after.receiver_cpu_us_per_post),
        round(seconds, 3),
        (before.per_s, after.per_s),
        client_cpu_us_per_post=round(cpu * 1e6, 1),
        postgres_cpu_us_per_post=weighted(
            before.postgres_cpu_us_per_post, after.postgres_cpu_us_per_post
        ),
        total_cpu_us_per_post=weighted(before.total_cpu_us_per_post, after.total_cpu_us_per_post),
        body_bytes=before.body_bytes,
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
        postgres0, receiver0 = ctx.other_cpu()
        shown = asyncio.create_task(report())
        try:
            await asyncio.gather(*(worker(session) for _ in range(ctx.concurrency)))
        finally:
            shown.cancel()
        elapsed = time.perf_counter() - begun
        cpu = time.process_time() - cpu0
        postgres1, receiver1 = ctx.other_cpu()
    ctx.progress.done()
    receiver = None if receiver0 is None or receiver1 is None else receiver1 - receiver0
    postgres = None if postgres0 is None or postgres1 is None else postgres1 - postgres0
    return Ceiling(
        count,
        round(count / elapsed, 1),
        round(cpu / count, 6),
        per(receiver, count),
        round(elapsed, 3),
        client_cpu_us_per_post=per(cpu, count),
        postgres_cpu_us_per_post=per(postgres, count),
        total_cpu_us_per_post=(
            None if receiver is None or postgres is None else per(cpu + receiver + postgres, count)
        ),
        body_bytes=len(body),
    )
