"""Upkeep beside the dispatch loop: the safety poll, gauges, error-rate deactivation, and a
dead upkeep stopping the daemon like a dead worker."""

from __future__ import annotations

import asyncio
import contextlib
from uuid import UUID

import asyncpg
import pytest

from dispatcher import app
from dispatcher.metrics import Metrics
from dispatcher.profiles import ErrorRateLimit
from dispatcher.upkeep import STALE_MIN_ROWS, Upkeep

from .helpers import poll_until, publish, settings_for, subscribe


class Dispatch:
    """A stand-in worker that records what upkeep asks of it."""

    def __init__(self, failing: dict[UUID, ErrorRateLimit] | None = None) -> None:
        self.rearmed = 0
        self.notified = 0
        self.paused: dict[UUID, float] = {}
        self._failing = failing or {}

    async def rearm(self) -> None:
        self.rearmed += 1

    def notify(self) -> None:
        self.notified += 1

    def pause(self, sid: UUID, until: float) -> None:
        self.paused[sid] = until

    def take_failing(self) -> dict[UUID, ErrorRateLimit]:
        failing, self._failing = self._failing, {}
        return failing


async def test_a_poll_rearms_asks_for_a_claim_and_sets_the_queue_gauges(
    database: str, db: asyncpg.Connection
) -> None:
    await subscribe(db, "http://127.0.0.1:9/hook")
    await publish(db, count=3)
    metrics = Metrics()
    dispatch = Dispatch()
    async with asyncpg.create_pool(database, min_size=1, max_size=1) as pool:
        await Upkeep(pool, dispatch, metrics, interval=60.0, retention_days=14).poll()
    assert (dispatch.rearmed, dispatch.notified) == (1, 1)
    sample = metrics.registry.get_sample_value
    assert sample("dispatcher_queue_depth") == 3
    assert sample("dispatcher_subscriptions", {"state": "active"}) == 1


async def test_a_subscription_failing_above_its_error_rate_is_deactivated(
    database: str, db: asyncpg.Connection
) -> None:
    sid = await subscribe(db, "http://127.0.0.1:9/hook")
    await publish(db)
    delivery = await db.fetchval("SELECT id FROM dispatcher.deliveries")
    await db.execute(
        "INSERT INTO dispatcher.attempts (delivery_id, subscription_id, attempt, started_at,"
        " duration_ms, status_code, outcome) VALUES ($1, $2, 1, now(), 1, 500, 'retry')",
        delivery,
        sid,
    )
    limit = ErrorRateLimit(threshold=0.5, min_attempts=1, window=3600.0)
    dispatch = Dispatch({sid: limit})
    async with asyncpg.create_pool(database, min_size=1, max_size=1) as pool:
        await Upkeep(pool, dispatch, Metrics(), interval=60.0, retention_days=14).poll()
    assert await db.fetchval("SELECT active FROM dispatcher.subscriptions") is False
    assert dispatch.take_failing() == {}


async def test_the_daemon_stops_when_upkeep_dies(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Upkeep) -> None:
        raise RuntimeError("upkeep bug")

    monkeypatch.setattr(Upkeep, "poll", broken)
    with pytest.raises(app.StartupError, match="upkeep"):
        await asyncio.wait_for(app.serve(settings_for(database), asyncio.Event()), 30)


async def test_a_queue_planned_as_empty_is_analyzed_once_it_fills(
    database: str, db: asyncpg.Connection
) -> None:
    """Vacuumed while empty, the queue is planned as empty (reltuples 0) until its next
    ANALYZE, and claims over a burst took 120-210 ms each meanwhile: a poll that counts ten
    times what the planner believes (and at least STALE_MIN_ROWS) analyzes it."""
    await subscribe(db, "http://127.0.0.1:9/hook")
    await db.execute("VACUUM ANALYZE dispatcher.deliveries")
    await publish(db, count=2 * STALE_MIN_ROWS)
    planned = "SELECT reltuples FROM pg_class WHERE oid = 'dispatcher.deliveries'::regclass"
    assert await db.fetchval(planned) == 0
    async with asyncpg.create_pool(database, min_size=1, max_size=1) as pool:
        upkeep = Upkeep(pool, Dispatch(), Metrics(), interval=60.0, retention_days=14)
        await upkeep.poll()
        assert await db.fetchval(planned) == 2 * STALE_MIN_ROWS
        # Believed now: the next poll leaves it alone.
        await db.execute("DELETE FROM dispatcher.deliveries WHERE id % 2 = 0")
        await upkeep.poll()
        assert await db.fetchval(planned) == 2 * STALE_MIN_ROWS


async def test_a_nudge_after_new_work_analyzes_a_queue_planned_as_empty_before_the_next_poll(
    database: str, db: asyncpg.Connection
) -> None:
    """A burst into a queue planned as empty: the NOTIFY of new work nudges upkeep, which
    checks the statistics within a second, not at its next poll (a minute away here)."""
    await subscribe(db, "http://127.0.0.1:9/hook")
    planned = "SELECT reltuples FROM pg_class WHERE oid = 'dispatcher.deliveries'::regclass"
    async with asyncpg.create_pool(database, min_size=1, max_size=2) as pool:
        upkeep = Upkeep(pool, Dispatch(), Metrics(), interval=60.0, retention_days=14)
        running = asyncio.create_task(upkeep.run())
        try:
            await asyncio.sleep(0.2)  # its first poll, on an empty queue
            await db.execute("VACUUM ANALYZE dispatcher.deliveries")
            await publish(db, count=2 * STALE_MIN_ROWS)
            assert await db.fetchval(planned) == 0
            upkeep.nudge()

            async def analyzed() -> bool:
                return bool(await db.fetchval(planned) == 2 * STALE_MIN_ROWS)

            await poll_until(analyzed, 5.0)
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running


async def test_upkeep_stops_when_cancelled_as_it_is_nudged(
    database: str, db: asyncpg.Connection
) -> None:
    """A NOTIFY as the daemon stops: the nudge and the cancellation in one turn of the loop.
    (Waiting with wait_for, the nudge's result was returned and the cancellation lost: the
    task ran on and the daemon's stop waited for it for ever.)"""
    async with asyncpg.create_pool(database, min_size=1, max_size=2) as pool:
        upkeep = Upkeep(pool, Dispatch(), Metrics(), interval=60.0, retention_days=14)
        running = asyncio.create_task(upkeep.run())
        await asyncio.sleep(0.2)  # its first poll done, waiting for the next or a nudge
        upkeep.nudge()
        running.cancel()
        await asyncio.wait([running], timeout=5.0)
        assert running.cancelled()
