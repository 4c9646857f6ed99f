"""Upkeep beside the dispatch loop: the safety poll, gauges, error-rate deactivation, and a
dead upkeep stopping the daemon like a dead worker."""

from __future__ import annotations

import asyncio
from uuid import UUID

import asyncpg
import pytest

from dispatcher import app
from dispatcher.metrics import Metrics
from dispatcher.profiles import ErrorRateLimit
from dispatcher.upkeep import Upkeep

from .helpers import publish, settings_for, subscribe


class Dispatch:
    """A stand-in worker that records what upkeep asks of it."""

    def __init__(self, failing: dict[UUID, ErrorRateLimit] | None = None) -> None:
        self.rearmed = 0
        self.notified = 0
        self._failing = failing or {}

    async def rearm(self) -> None:
        self.rearmed += 1

    def notify(self) -> None:
        self.notified += 1

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
