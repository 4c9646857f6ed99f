"""The recorder's writes against a real PostgreSQL: a result the database refuses for good is
set aside alone, a retry after a transient error writes only what is still unwritten, and
a flush writes in bounded batches, each started before the last one's hand-over."""

from __future__ import annotations

from uuid import UUID, uuid4

import asyncpg

from dispatcher.policy import Decision, Outcome, Verdict
from dispatcher.record import Result

from .helpers import Receiver, attempts_of, publish, recorder_for, subscribe

# The second statement that inserts attempts fails with serialization_failure (SQLSTATE
# 40001), an error the recorder retries, raised by the database itself; a sequence counts
# the statements (it is not rolled back with them).
FAIL_SECOND = """
CREATE SEQUENCE attempt_statements;
CREATE FUNCTION fail_second() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('attempt_statements') = 2 THEN
        RAISE EXCEPTION 'injected by the test' USING ERRCODE = '40001';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER fail_second AFTER INSERT ON dispatcher.attempts
    FOR EACH STATEMENT EXECUTE FUNCTION fail_second();
"""


async def test_a_refused_result_is_set_aside_and_a_retry_writes_only_the_rest(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    sid, owner, ids = await leased(db, receiver, 4)
    await db.execute(FAIL_SECOND)

    def delivered(delivery_id: int, excerpt: str = "ok") -> Result:
        return delivered_result(sid, delivery_id, excerpt)

    # The second one's excerpt holds a NUL, which no text column takes: the batch of four is
    # refused, then its first half, whose first result is written alone (the first attempts
    # statement) and the second set aside. The second half meets the transient error (the
    # second attempts statement) and the flush retries: the second half, not the batch.
    pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
    try:
        recorder = recorder_for(pool, owner)
        for delivery_id, excerpt in zip(ids, ["ok", "bad \x00 byte", "ok", "ok"], strict=True):
            recorder.add(delivered(delivery_id, excerpt))
        await recorder.flush()
    finally:
        await pool.close()

    assert await db.fetchval("SELECT last_value FROM attempt_statements") == 3
    rows = await db.fetch(
        "SELECT delivery_id, count(*) AS n FROM dispatcher.attempts GROUP BY 1 ORDER BY 1"
    )
    assert [(r["delivery_id"], r["n"]) for r in rows] == [(ids[0], 1), (ids[2], 1), (ids[3], 1)]
    # The refused one is still queued, leased: sent again when its lease ends.
    left = await db.fetch("SELECT id, lease_owner FROM dispatcher.deliveries")
    assert [(r["id"], r["lease_owner"]) for r in left] == [(ids[1], owner)]


async def leased(
    db: asyncpg.Connection, receiver: Receiver, count: int
) -> tuple[UUID, UUID, list[int]]:
    """`count` deliveries to one subscription, all leased to one owner: the subscription,
    the owner and the delivery ids in order."""
    sid = await subscribe(db, receiver.url())
    for _ in range(count):
        await publish(db)
    owner = uuid4()
    await db.execute("UPDATE dispatcher.deliveries SET lease_owner = $1", owner)
    ids = [r["id"] for r in await db.fetch("SELECT id FROM dispatcher.deliveries ORDER BY id")]
    return sid, owner, ids


def delivered_result(sid: UUID, delivery_id: int, excerpt: str = "ok") -> Result:
    return Result(
        delivery_id,
        sid,
        1,
        Outcome(0.0, 0.0, 0.001, status=200, body_excerpt=excerpt),
        Decision(Verdict.DELIVERED),
        event_name="products.create.v0",
    )


async def test_a_flush_writes_bounded_batches_the_next_before_the_last_hand_over(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    """25 results, batches of at most 10: a flush writes 10, and takes the next 10 before it
    hands the first 10 over (and the last 5 before the second hand-over), so that the next
    write is under way while the requests the last one freed start."""
    sid, owner, ids = await leased(db, receiver, 25)
    handed: list[tuple[list[int], int]] = []
    pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
    try:
        recorder = recorder_for(
            pool,
            owner,
            largest=10,
            on_flushed=lambda batch: handed.append(
                ([r.delivery_id for r in batch], recorder.pending)
            ),
        )
        for delivery_id in ids:
            recorder.add(delivered_result(sid, delivery_id))
        await recorder.flush()
        # Left pending at each hand-over: none but the third batch's 5 at the first one.
        assert handed == [(ids[:10], 5), (ids[10:20], 0), (ids[20:], 0)]
    finally:
        await pool.close()
    assert len(await attempts_of(db)) == 25
    assert await db.fetchval("SELECT count(*) FROM dispatcher.deliveries") == 0
