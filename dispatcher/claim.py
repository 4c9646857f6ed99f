"""Claiming due deliveries and handing back the unsent: the claim's round trips, as jobs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from uuid import UUID

import asyncpg
import structlog

from . import attempt, queries
from .attempt import Job
from .dberrors import DB_ERRORS, Outage
from .endpoints import Endpoints
from .flow import Shares
from .metrics import Metrics
from .schedule import Clock

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Batch:
    """What one claim took: jobs with their due times (on the clock), in claim order."""

    jobs: list[tuple[float, Job]]
    # When the claim answered (monotonic), before any endpoint lookup.
    answered: float
    # It read a full batch, or took fewer rows than the shares gave (the byte budget, or
    # rows another instance holds): more is due.
    full: bool
    # An idle endpoint's share held rows back (see queries.CLAIM): claim again at once.
    held_back: bool


class Claims:
    def __init__(
        self,
        pool: asyncpg.Pool,
        owner: UUID,
        endpoints: Endpoints,
        metrics: Metrics,
        clock: Clock,
        *,
        lease_seconds: float,
        outage: Outage,
    ) -> None:
        self._pool = pool
        self._outage = outage
        self._owner = owner
        self._endpoints = endpoints
        self._metrics = metrics
        self._clock = clock
        self._lease = lease_seconds

    async def take(
        self, due_by: float, limit: int, shares: Shares, idle_share: int, budget: int
    ) -> Batch | None:
        """Claim up to `limit` deliveries due by `due_by` (on the clock) within the
        endpoints' shares and `budget` payload bytes (the first one whatever its size);
        None when the database failed (logged and counted)."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            rows = await self._pool.fetch(
                queries.CLAIM,
                due_by,
                limit,
                self._lease,
                shares.full,
                self._owner,
                shares.busy,
                shares.room,
                idle_share,
                budget,
            )
        except DB_ERRORS as exc:
            self._metrics.db_errors.labels("claim").inc()
            self._outage.failed("claim", exc)
            return None
        self._outage.succeeded()
        answered = loop.time()
        self._metrics.observe_db("claim", answered - began, len(rows))
        self._metrics.claims.inc()
        jobs = await self.jobs_of(rows)
        full = bool(rows) and (rows[0]["scanned"] == limit or rows[0]["taken"] < rows[0]["shared"])
        held_back = bool(rows) and rows[0]["shared"] < rows[0]["scanned"]
        return Batch(jobs, answered, full, held_back)

    async def jobs_of(self, rows: list[asyncpg.Record]) -> list[tuple[float, Job]]:
        """The jobs of rows leased to this instance (by a claim, or released into its lease
        behind an ended head: queries.RECORD_ENDING_HEADS), with their due times."""
        self._metrics.claimed.inc(len(rows))
        endpoints = await self._endpoints.of(rows)
        wall = self._clock.wall_ns() / 1e9
        jobs: list[tuple[float, Job]] = []
        for row in rows:
            endpoint = endpoints.get(row["subscription_id"])
            if endpoint is not None:  # else deleted since the claim, with its deliveries
                jobs.append((row["due_at"], attempt.job(row, endpoint, wall)))
        return jobs

    async def release(
        self, deliveries: list[int], why: str, due: list[float] | None = None
    ) -> None:
        """Hand claimed rows back unsent, due now or each at its `due` time."""
        if due is None:
            due = [self._clock()] * len(deliveries)
        try:
            await self._pool.execute(queries.RELEASE, deliveries, self._owner, due)
        except DB_ERRORS as exc:
            self._metrics.db_errors.labels("release").inc()
            # Their leases run out and they come back by themselves.
            self._outage.failed("release", exc)
        else:
            log.debug("worker.released", deliveries=len(deliveries), why=why)
