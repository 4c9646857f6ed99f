"""Leases apart from due times (sql/0013): a claim writes no index entry, a lease in force
keeps its row from other instances until it ends, and the timer still wakes for both."""

from __future__ import annotations

import time
import uuid

import asyncpg

from dispatcher import queries

from .helpers import publish, subscribe


async def claim(db: asyncpg.Connection, now: float, owner: uuid.UUID, limit: int = 500) -> int:
    rows = await db.fetch(queries.CLAIM, now, limit, 60.0, [], owner, [], [], limit, 1 << 25)
    return len(rows)


async def test_a_claim_is_a_heap_only_update(db: asyncpg.Connection) -> None:
    await subscribe(db, "https://example.test/hook")
    await publish(db, count=300)
    async with db.transaction():
        assert await claim(db, time.time(), uuid.uuid4()) == 300
        updated, hot = await db.fetchrow(
            "SELECT pg_stat_get_xact_tuples_updated(r), pg_stat_get_xact_tuples_hot_updated(r) "
            "FROM (SELECT 'dispatcher.deliveries'::regclass AS r) t"
        )
    assert (updated, hot) == (300, 300)


async def test_a_lease_in_force_keeps_its_rows_until_it_ends(db: asyncpg.Connection) -> None:
    await subscribe(db, "https://example.test/hook")
    await publish(db, count=3)
    now = time.time()
    first, other = uuid.uuid4(), uuid.uuid4()
    assert await claim(db, now, first) == 3
    assert await claim(db, now + 59, other) == 0
    # The owner died: its lease ends and the rows are anyone's, their due time unchanged.
    assert await claim(db, now + 61, other) == 3
    owners = await db.fetch(
        "SELECT DISTINCT lease_owner, due_at <= to_timestamp($1) AS due FROM dispatcher.deliveries",
        now,
    )
    assert [(r["lease_owner"], r["due"]) for r in owners] == [(other, True)]


async def test_the_timer_wakes_for_the_earliest_due_time_or_lease_end(
    db: asyncpg.Connection,
) -> None:
    await subscribe(db, "https://example.test/hook")
    await publish(db, count=2)
    now = time.time()
    ids = [r["id"] for r in await db.fetch("SELECT id FROM dispatcher.deliveries ORDER BY id")]
    await db.execute(
        "UPDATE dispatcher.deliveries SET due_at = to_timestamp($2) WHERE id = $1",
        ids[1],
        now + 30,
    )
    assert await claim(db, now, uuid.uuid4(), limit=1) == 1  # the first, leased to now + 60
    due = await db.fetchval(queries.NEXT_DUE)
    assert abs(due.timestamp() - (now + 30)) < 0.01  # the second's due time comes first
    await db.execute(
        "UPDATE dispatcher.deliveries SET due_at = to_timestamp($2) WHERE id = $1",
        ids[1],
        now + 90,
    )
    due = await db.fetchval(queries.NEXT_DUE)
    assert abs(due.timestamp() - (now + 60)) < 0.01  # now the lease's end


async def test_with_more_in_flight_than_the_timer_reads_it_wakes_no_later_than_due(
    db: asyncpg.Connection,
) -> None:
    await subscribe(db, "https://example.test/hook")
    await publish(db, count=1100)
    now = time.time()
    assert await claim(db, now, uuid.uuid4(), limit=1100) == 1100
    last = await db.fetchval(
        "SELECT due_at FROM dispatcher.deliveries ORDER BY due_at OFFSET 1023 LIMIT 1"
    )
    # Past the first 1,024 (all leased) one may be due: the timer fires by the 1,024th's
    # due time, not at the leases' end.
    assert await db.fetchval(queries.NEXT_DUE) == last
