"""Retention drops whole daily partitions past keep_days, never events a live delivery needs."""

from __future__ import annotations

import asyncio
from datetime import date, timedelta

import asyncpg
import pytest

from .helpers import publish, subscribe

TABLES = ("events", "deliveries_done", "attempts")
URL = "https://receiver.example/hook"


def partition(table: str, day: date) -> str:
    return f"{table}_{day:%Y%m%d}"


async def today(db: asyncpg.Connection) -> date:
    d: date = await db.fetchval("SELECT current_date")
    return d


async def exists(db: asyncpg.Connection, name: str) -> bool:
    found = await db.fetchval("SELECT to_regclass($1)", f"dispatcher.{name}")
    return found is not None


async def history_at(db: asyncpg.Connection, day: date, *, environment: str = "env-1") -> None:
    """One event, one finished delivery and one attempt at noon of `day`."""
    await db.execute(
        """
        WITH e AS (
            INSERT INTO dispatcher.events (environment_id, event_name, payload, created_at)
            VALUES ($2, 'products.create.v0', '{}', $1::date + time '12:00')
            RETURNING id, created_at
        ), d AS (
            INSERT INTO dispatcher.deliveries_done
                (id, subscription_id, event_id, event_created_at, environment_id, attempts,
                 status, created_at, finished_at)
            SELECT nextval(pg_get_serial_sequence('dispatcher.deliveries', 'id')),
                   gen_random_uuid(), e.id, e.created_at, $2, 1, 'delivered', e.created_at,
                   e.created_at + interval '1 second'
            FROM e
            RETURNING id, subscription_id, created_at
        )
        INSERT INTO dispatcher.attempts
            (delivery_id, subscription_id, attempt, started_at, duration_ms, status_code, outcome)
        SELECT id, subscription_id, 1, created_at, 10, 200, 'delivered' FROM d
        """,
        day,
        environment,
    )


async def rows_at(db: asyncpg.Connection, table: str, day: date) -> int:
    column = "started_at" if table == "attempts" else "created_at"
    n: int = await db.fetchval(
        f"SELECT count(*) FROM dispatcher.{table} WHERE {column}::date = $1", day
    )
    return n


async def test_drops_daily_partitions_older_than_keep_days(db: asyncpg.Connection) -> None:
    now = await today(db)
    old = [now - timedelta(days=n) for n in range(40, 35, -1)]
    assert await db.fetchval("SELECT dispatcher.ensure_partitions(current_date - 40, 5)") == 15
    # The day whose partition ends exactly at the cutoff's midnight goes; the next one stays.
    await db.execute("SELECT dispatcher.ensure_partitions(current_date - 31, 2)")
    for day in [*old, now - timedelta(days=31), now - timedelta(days=30), now]:
        await history_at(db, day)
    # Days without a partition land in the defaults; retention deletes those rows instead.
    long_ago, recent_default = now - timedelta(days=50), now - timedelta(days=20)
    await history_at(db, long_ago)
    await history_at(db, recent_default)

    dropped = await db.fetchval("SELECT dispatcher.drop_partitions(30)")

    assert dropped == 3 * 6
    for table in TABLES:
        for day in [*old, now - timedelta(days=31)]:
            assert not await exists(db, partition(table, day)), partition(table, day)
            assert await rows_at(db, table, day) == 0
        for day in (now - timedelta(days=30), now):
            assert await exists(db, partition(table, day))
            assert await rows_at(db, table, day) == 1
        assert await rows_at(db, table, long_ago) == 0
        assert await rows_at(db, table, recent_default) == 1
        assert await exists(db, f"{table}_default")
    assert await db.fetchval("SELECT dispatcher.drop_partitions(30)") == 0


async def test_tables_keep_working_after_a_drop(db: asyncpg.Connection) -> None:
    await db.execute("SELECT dispatcher.ensure_partitions(current_date - 40, 5)")
    await db.fetchval("SELECT dispatcher.drop_partitions(30)")
    sid = await subscribe(db, URL)
    await publish(db, count=3)
    assert await db.fetchval("SELECT count(*) FROM dispatcher.deliveries") == 3
    # A late row for a dropped day goes to the default partition instead of failing.
    await history_at(db, await today(db) - timedelta(days=38))
    assert await db.fetchval("SELECT count(*) FROM dispatcher.events_default") == 1
    assert (
        await db.fetchval("SELECT count(*) FROM dispatcher.subscriptions WHERE id = $1", sid) == 1
    )


async def test_keeps_event_partitions_that_live_deliveries_reference(
    db: asyncpg.Connection,
) -> None:
    now = await today(db)
    old = [now - timedelta(days=n) for n in range(40, 35, -1)]
    await db.execute("SELECT dispatcher.ensure_partitions(current_date - 40, 5)")
    await subscribe(db, URL)
    # An event from 38 days ago that still has a live (say, paused) delivery.
    await history_at(db, old[2])
    assert await db.fetchval("SELECT count(*) FROM dispatcher.deliveries") == 1

    dropped = await db.fetchval("SELECT dispatcher.drop_partitions(30)")

    # events: the two days wholly before the live event go; its day and later stay.
    assert [await exists(db, partition("events", d)) for d in old] == [
        False,
        False,
        True,
        True,
        True,
    ]
    assert await rows_at(db, "events", old[2]) == 1
    for table in ("deliveries_done", "attempts"):
        assert not any([await exists(db, partition(table, d)) for d in old])
    assert dropped == 2 + 5 + 5

    await db.execute("DELETE FROM dispatcher.deliveries")  # the delivery finished
    assert await db.fetchval("SELECT dispatcher.drop_partitions(30)") == 3
    assert not any([await exists(db, partition("events", d)) for d in old])


async def test_live_deliveries_keep_their_events_in_the_default_partition(
    db: asyncpg.Connection,
) -> None:
    await subscribe(db, URL)
    day = await today(db) - timedelta(days=50)  # no partition: the default holds it
    await history_at(db, day)
    await db.fetchval("SELECT dispatcher.drop_partitions(30)")
    assert await rows_at(db, "events", day) == 1
    await db.execute("DELETE FROM dispatcher.deliveries")
    await db.fetchval("SELECT dispatcher.drop_partitions(30)")
    assert await rows_at(db, "events", day) == 0


async def test_old_idempotency_keys_expire_with_their_events(db: asyncpg.Connection) -> None:
    await db.execute("SELECT dispatcher.publish('env-1', 'products.create.v0', '{}', NULL, 'k1')")
    await db.execute("SELECT dispatcher.publish('env-1', 'products.create.v0', '{}', NULL, 'k2')")
    await db.execute(
        "UPDATE dispatcher.idempotency_keys SET created_at = now() - interval '31 days' "
        "WHERE idempotency_key = 'k1'"
    )
    await db.fetchval("SELECT dispatcher.drop_partitions(30)")
    keys = await db.fetch("SELECT idempotency_key FROM dispatcher.idempotency_keys")
    assert [r["idempotency_key"] for r in keys] == ["k2"]


async def test_a_table_it_cannot_lock_keeps_its_partitions_for_the_next_run(
    database: str, db: asyncpg.Connection
) -> None:
    await db.execute("SELECT dispatcher.ensure_partitions(current_date - 40, 5)")
    reader = await asyncpg.connect(database)
    try:
        async with reader.transaction():
            await reader.fetchval("SELECT count(*) FROM dispatcher.attempts")  # holds a lock
            started = asyncio.get_running_loop().time()
            dropped = await db.fetchval("SELECT dispatcher.drop_partitions(30)")
            # It never waits for the lock (a wait could deadlock with a publisher).
            assert asyncio.get_running_loop().time() - started < 1
        assert dropped == 0
        for table in ("events", "deliveries_done", "attempts"):
            assert await exists(db, partition(table, await today(db) - timedelta(days=40)))
    finally:
        await reader.close()
    assert await db.fetchval("SELECT dispatcher.drop_partitions(30)") == 15


@pytest.mark.parametrize("keep_days", [0, -1])
async def test_keep_days_must_be_positive(db: asyncpg.Connection, keep_days: int) -> None:
    with pytest.raises(asyncpg.RaiseError, match="keep_days must be at least 1"):
        await db.fetchval("SELECT dispatcher.drop_partitions($1)", keep_days)


async def test_a_resend_in_progress_keeps_its_event(database: str, db: asyncpg.Connection) -> None:
    """A finished delivery moved back into the queue while retention runs keeps its event."""
    old = await today(db) - timedelta(days=38)
    await db.execute("SELECT dispatcher.ensure_partitions(current_date - 40, 5)")
    sid = await subscribe(db, URL, ["nothing.matches.v0"])
    await history_at(db, old)
    await db.execute("UPDATE dispatcher.deliveries_done SET subscription_id = $1", sid)
    resender = await asyncpg.connect(database)
    try:
        tx = resender.transaction()
        await tx.start()
        # What dispatcher.resend does: the finished row goes back into the queue.
        await resender.execute(
            """
            WITH back AS (DELETE FROM dispatcher.deliveries_done RETURNING *)
            INSERT INTO dispatcher.deliveries
                (id, subscription_id, event_id, event_created_at, environment_id, attempts,
                 created_at)
            OVERRIDING SYSTEM VALUE
            SELECT id, subscription_id, event_id, event_created_at, environment_id, attempts,
                   created_at
            FROM back
            """
        )
        # The resend holds deliveries_done: retention leaves everything for its next run.
        assert await db.fetchval("SELECT dispatcher.drop_partitions(30)") == 0
        await tx.commit()
        assert await db.fetchval("SELECT dispatcher.drop_partitions(30)") > 0
    finally:
        await resender.close()
    assert await rows_at(db, "events", old) == 1
    assert await db.fetchval("SELECT count(*) FROM dispatcher.deliveries") == 1
