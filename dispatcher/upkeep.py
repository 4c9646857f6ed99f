"""The slow periodic work beside the dispatch loop: the safety poll, queue gauges, error-rate
deactivation, and hourly partitions and retention. Its own task: a dead one stops the
daemon, as a dead worker does."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Protocol
from uuid import UUID

import asyncpg
import structlog

from . import queries
from .dberrors import DB_ERRORS, Outage
from .egress import describe_client_cert
from .metrics import Metrics
from .operational import MAX_KNOWN, Streaks
from .profiles import ErrorRateLimit
from .schedule import Clock, Wakeup

log = structlog.get_logger(__name__)

MAINTENANCE_INTERVAL = 3600.0  # seconds between partition and retention runs
# A client certificate expiring this soon counts in dispatcher_client_certificates_expiring.
CERTIFICATE_WARNING = timedelta(days=14)
# The queue's statistics are stale when it holds at least STALE_MIN_ROWS and ten times what
# the planner believes: a queue that autovacuum saw empty is planned as empty (reltuples
# 0) until its next ANALYZE, up to autovacuum_naptime (a minute) after a burst begins, and
# every claim meanwhile joined its rows pair by pair and scanned a whole index (120-210 ms
# a claim of 120, against 1-3; the bench on Debian 15 ran at 1.5k deliveries/s for a
# minute, issue 17). A poll analyzes it then, and so does a check soon after new work is
# published (nudge), at most every STATISTICS_CHECK_INTERVAL: a burst is planned as empty
# for that long, not for a poll interval.
STALE_MIN_ROWS = 1000
STALE_FACTOR = 10
STATISTICS_CHECK_INTERVAL = 1.0  # seconds


class Dispatch(Protocol):
    """What upkeep needs of the worker."""

    async def rearm(self) -> None:
        """Arm the timer with the earliest due time in Postgres."""

    def notify(self) -> None:
        """Ask for a claim."""

    def pause(self, sid: UUID, until: float) -> None:
        """Start nothing of this endpoint before `until` (on the clock)."""

    def take_failing(self) -> dict[UUID, ErrorRateLimit]:
        """The subscriptions with an error-rate limit that failed since the last call."""


class Upkeep:
    def __init__(
        self,
        pool: asyncpg.Pool,
        dispatch: Dispatch,
        metrics: Metrics,
        *,
        interval: float,
        retention_days: int,
        outage: Outage | None = None,
        clock: Clock | None = None,
        streaks: Streaks | None = None,
    ) -> None:
        self._pool = pool
        self._streaks = streaks
        self._clock = clock or Clock()
        self._outage = outage or Outage()
        self._dispatch = dispatch
        self._metrics = metrics
        self._interval = interval
        self._retention_days = retention_days
        self._told_stale = False
        self._nudged = Wakeup()

    def nudge(self) -> None:
        """New work was published (a NOTIFY): check the queue's statistics soon."""
        self._nudged.set()

    async def run(self) -> None:
        """Poll every `interval` seconds (the first at once), maintain every hour, check the
        queue's statistics after a nudge (at most every STATISTICS_CHECK_INTERVAL)."""
        loop = asyncio.get_running_loop()
        # Monotonic: the intervals are real seconds, whatever the scheduler's clock does.
        next_maintenance = loop.time()
        while True:
            began = loop.time()
            await self.poll()
            if began >= next_maintenance:
                next_maintenance = began + MAINTENANCE_INTERVAL
                await self.maintain()
            next_poll = began + self._interval
            # A Wakeup, not wait_for: wait_for returns the event's result to a task cancelled
            # as it is set (a NOTIFY as the daemon stops), and the cancellation is lost.
            while (left := next_poll - loop.time()) > 0:
                await self._nudged.wait(left)
                if not self._nudged.is_set():
                    break
                self._nudged.clear()
                await self.check_statistics()
                await asyncio.sleep(min(STATISTICS_CHECK_INTERVAL, max(next_poll - loop.time(), 0)))

    async def poll(self) -> None:
        """The safety net: work other instances scheduled, endpoints paused by a Retry-After
        another instance heard, gauges, the queue's statistics, failure streaks, failing
        subscriptions."""
        await self._dispatch.rearm()
        self._dispatch.notify()
        try:
            for row in await self._pool.fetch(queries.PAUSES, self._clock()):
                self._dispatch.pause(row["subscription_id"], row["until"])
            stats = await self._pool.fetchrow(queries.QUEUE_STATS)
            self._metrics.queue_depth.set(stats["depth"])
            self._metrics.oldest_due_age.set(float(stats["oldest_due_age"]))
            self._metrics.subscriptions.labels("active").set(stats["active_subscriptions"])
            self._metrics.subscriptions.labels("inactive").set(stats["inactive_subscriptions"])
            if stats["depth"] >= STALE_MIN_ROWS:
                await self._check_statistics(stats["depth"])
            if self._streaks is not None:
                # Other instances' streaks too: a success recorded here must end them.
                before = self._streaks.snapshot()
                live = await self._pool.fetch(queries.STREAKS, MAX_KNOWN)
                self._streaks.refresh(before, [r["subscription_id"] for r in live])
        except DB_ERRORS as exc:
            self._metrics.db_errors.labels("poll").inc()
            self._outage.failed("poll", exc)
        else:
            self._outage.succeeded()
        failing = self._dispatch.take_failing()
        if failing:
            await self.deactivate_failing(failing)

    async def check_statistics(self) -> None:
        """After a nudge: the queue's statistics (see _check_statistics), counted only while
        the planner believes it nearly empty."""
        try:
            await self._check_statistics(None)
        except DB_ERRORS as exc:
            self._metrics.db_errors.labels("poll").inc()
            self._outage.failed("poll", exc)

    async def _check_statistics(self, depth: int | None) -> None:
        """Analyze the queue if it holds at least STALE_MIN_ROWS and ten times what the
        planner believes, or say once that this role may not (it does not own the table).
        `depth` is the poll's count; without it the queue is counted only while the planner
        believes fewer than STALE_MIN_ROWS, and no further than the answer needs (at most
        ten times STALE_MIN_ROWS rows): a larger belief is the poll's to check."""
        belief = await self._pool.fetchrow(queries.QUEUE_BELIEF)
        planned = belief["planned_rows"]
        if depth is None:
            if planned >= STALE_MIN_ROWS:
                return
            enough = max(int(planned * STALE_FACTOR) + 1, STALE_MIN_ROWS)
            depth = await self._pool.fetchval(queries.QUEUE_COUNT_UP_TO, enough)
        if depth >= STALE_MIN_ROWS and planned * STALE_FACTOR < depth:
            await self._analyze(depth, planned, belief["may_analyze"])

    async def _analyze(self, depth: int, planned: float, allowed: bool) -> None:
        """Refresh the queue's statistics, or say once that this role may not."""
        if allowed:
            await self._pool.execute(queries.ANALYZE_QUEUE)
            log.info("queue.analyzed", depth=depth, planned_rows=planned)
        elif not self._told_stale:
            self._told_stale = True
            log.warning(
                "queue.statistics_stale",
                depth=depth,
                planned_rows=planned,
                hint="ANALYZE dispatcher.deliveries as its owner, or run the daemon as it",
            )

    async def deactivate_failing(self, limits: dict[UUID, ErrorRateLimit]) -> None:
        """Deactivate subscriptions whose error rate stays above their limit; their queued
        deliveries wait (paused) for a reactivation."""
        try:
            rows = await self._pool.fetch(
                queries.ERROR_RATE_DEACTIVATE,
                list(limits),
                [lim.threshold for lim in limits.values()],
                [lim.min_attempts for lim in limits.values()],
                [lim.window for lim in limits.values()],
            )
        except DB_ERRORS as exc:
            self._metrics.db_errors.labels("error_rate").inc()
            self._outage.failed("error_rate", exc)
            return
        for row in rows:
            self._metrics.deactivations.labels("error_rate").inc()
            log.warning(
                "subscription.deactivated",
                subscription_id=str(row["id"]),
                reason=row["deactivated_reason"],
            )

    async def maintain(self) -> None:
        """Partitions for the next days, retention for the old ones, client certificates
        that expire soon."""
        try:
            soon = datetime.now(UTC) + CERTIFICATE_WARNING
            expiring = 0
            for row in await self._pool.fetch(queries.CLIENT_CERTIFICATES):
                described = describe_client_cert(row["pem"])
                if described is None or described.not_after <= soon:
                    expiring += 1
            self._metrics.client_certificates_expiring.set(expiring)
            await self._pool.execute(queries.PARTITIONS)
            dropped = await self._pool.fetchval(queries.DROP_PARTITIONS, self._retention_days)
            if dropped:
                log.info("retention.dropped", partitions=dropped, keep_days=self._retention_days)
        except DB_ERRORS as exc:
            self._metrics.db_errors.labels("maintenance").inc()
            self._outage.failed("maintenance", exc)
