"""Keep the daemon's clock on the database's: leases and due times from one clock.

Every instance writes leases (`leased_until`: now + lease) and retry times from its own
clock and claims what is due by it. An instance whose host clock runs two minutes ahead
would take rows another instance still holds (sent twice) and fire everyone's retries early.
So each instance measures how far its host clock is from the database server's
(`clock_timestamp()`, the midpoint of the fastest of a few round trips: off by at most half
of one round trip) and reads time as the host's plus that correction (schedule.Clock). It
measures at start, before it claims anything, and again every `interval` seconds, so a
host clock that drifts or is stepped is followed.
"""

from __future__ import annotations

import asyncio

import asyncpg
import structlog

from .dberrors import DB_ERRORS, Backoff, Outage
from .schedule import Clock

log = structlog.get_logger(__name__)

NOW = "SELECT extract(epoch FROM clock_timestamp())::float8"
# A correction that moves by more than this is worth a line in the log.
_NOTEWORTHY = 1.0


async def measure(pool: asyncpg.Pool, clock: Clock, samples: int = 3) -> tuple[float, float]:
    """(database time minus host time, the round trip it was read in), in seconds."""
    best: tuple[float, float] | None = None
    async with pool.acquire() as conn:
        for _ in range(samples):
            before = clock.wall()
            server: float = await conn.fetchval(NOW)
            after = clock.wall()
            trip = after - before
            if best is None or trip < best[1]:
                best = (server - (before + after) / 2, trip)
    assert best is not None
    return best


async def sync(pool: asyncpg.Pool, clock: Clock) -> None:
    """Measure once and correct the clock by it."""
    correction, trip = await measure(pool, clock)
    previous, clock.correction = clock.correction, correction
    if abs(correction - previous) > _NOTEWORTHY:
        log.warning(
            "clock.corrected",
            host_behind_database_seconds=round(correction, 3),
            changed_by=round(correction - previous, 3),
            round_trip_ms=round(trip * 1000, 3),
        )


async def keep(pool: asyncpg.Pool, clock: Clock, outage: Outage, *, interval: float = 10.0) -> None:
    """Re-measure every `interval` seconds until cancelled; a failed measurement keeps the
    last correction and tries again after a backoff."""
    backoff = Backoff()
    while True:
        try:
            await sync(pool, clock)
        except DB_ERRORS as exc:
            outage.failed("clock", exc)
            await asyncio.sleep(backoff.next())
            continue
        outage.succeeded()
        backoff.reset()
        await asyncio.sleep(interval)
