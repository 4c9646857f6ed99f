"""Publishing in SQL fans out to matching active subscriptions, in the publisher's transaction."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from .helpers import publish, subscribe

URL = "https://receiver.example/hook"


async def deliveries_of(db: asyncpg.Connection, sid: object) -> int:
    n: int = await db.fetchval(
        "SELECT count(*) FROM dispatcher.deliveries WHERE subscription_id = $1", sid
    )
    return n


async def test_publish_function_fans_out_to_every_matching_subscription(
    db: asyncpg.Connection,
) -> None:
    exact = await subscribe(db, URL, ["products.create.v0"])
    any_version = await subscribe(db, URL, ["products.create.*"])
    entity = await subscribe(db, URL, ["products.*"])
    everything = await subscribe(db, URL, ["*"])
    other_event = await subscribe(db, URL, ["products.update.v0", "orders.*"])
    other_env = await subscribe(db, URL, ["*"], environment="env-2")
    inactive = await subscribe(db, URL, ["*"], active=False)

    event_id = await db.fetchval(
        "SELECT dispatcher.publish('env-1', 'products.create.v0', '{\"id\": 7}')"
    )

    for sid in (exact, any_version, entity, everything):
        assert await deliveries_of(db, sid) == 1
    for sid in (other_event, other_env, inactive):
        assert await deliveries_of(db, sid) == 0
    row = await db.fetchrow(
        "SELECT event_id, attempts, due_at <= now() AS due, lease_owner "
        "FROM dispatcher.deliveries WHERE subscription_id = $1",
        exact,
    )
    assert row["event_id"] == event_id
    assert row["attempts"] == 0
    assert row["due"]
    assert row["lease_owner"] is None


async def test_plain_insert_fans_out_too(db: asyncpg.Connection) -> None:
    sid = await subscribe(db, URL, ["orders.*"])
    await publish(db, event="orders.paid.v1", count=25)
    assert await deliveries_of(db, sid) == 25


async def test_rolled_back_publish_leaves_no_delivery(db: asyncpg.Connection) -> None:
    sid = await subscribe(db, URL)
    tx = db.transaction()
    await tx.start()
    await publish(db)
    await tx.rollback()
    assert await deliveries_of(db, sid) == 0
    assert await db.fetchval("SELECT count(*) FROM dispatcher.events") == 0


async def test_one_notify_per_publishing_transaction(database: str, db: asyncpg.Connection) -> None:
    await subscribe(db, URL)
    await subscribe(db, URL, ["products.create.v0"])
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(database)
    try:
        await listener.add_listener("dispatcher_work", lambda *args: heard.put_nowait(args[3]))
        async with db.transaction():
            await publish(db, count=50)
            await publish(db, count=50)
        await publish(db, event="nobody.listens.v0")
        await publish(db, event="products.update.v0")
        # A session receives pending notifications before the answer to its next query.
        await listener.fetchval("SELECT 1")
        assert heard.qsize() == 2, "one per matching transaction, none for the unmatched event"
    finally:
        await listener.close()


@pytest.mark.parametrize(
    "name",
    ["products", "products.create", "Products.create.v0", "products.create.0", "a.b.c.v1", ""],
)
async def test_malformed_event_names_are_refused(db: asyncpg.Connection, name: str) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("SELECT dispatcher.publish('env-1', $1, '{}')", name)


async def test_idempotency_key_returns_the_first_event(db: asyncpg.Connection) -> None:
    sid = await subscribe(db, URL)
    first = await db.fetchval(
        "SELECT dispatcher.publish('env-1', 'products.create.v0', '{}', 'p-1', 'key-1')"
    )
    again = await db.fetchval(
        "SELECT dispatcher.publish('env-1', 'products.create.v0', '{}', 'p-1', 'key-1')"
    )
    other_env = await db.fetchval(
        "SELECT dispatcher.publish('env-2', 'products.create.v0', '{}', 'p-1', 'key-1')"
    )
    assert first == again != other_env
    assert await deliveries_of(db, sid) == 1


async def test_deactivation_pauses_queued_deliveries_and_reactivation_resumes(
    db: asyncpg.Connection,
) -> None:
    sid = await subscribe(db, URL)
    await publish(db, count=3)
    await db.execute("UPDATE dispatcher.subscriptions SET active = false WHERE id = $1", sid)
    assert await db.fetchval("SELECT count(*) FROM dispatcher.deliveries WHERE paused") == 3
    await db.execute("UPDATE dispatcher.subscriptions SET active = true WHERE id = $1", sid)
    assert await db.fetchval("SELECT count(*) FROM dispatcher.deliveries WHERE NOT paused") == 3


async def test_events_land_in_daily_partitions(db: asyncpg.Connection) -> None:
    await publish(db)
    partition = await db.fetchval("SELECT tableoid::regclass::text FROM dispatcher.events")
    assert partition.startswith("dispatcher.events_2")
