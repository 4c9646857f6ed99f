"""Ordered delivery (issue 16): "ordering": "entity" sends one entity's deliveries strictly
in publish order, every attempt of one before any attempt of the next, through failures,
retries, kill -9 and several daemons; different entities go out in parallel.
"subscription" sends the whole subscription one at a time. The unordered path is unchanged.

Every order check is made at the receiver: for each key, the events requested (retries and
duplicates after a kill included) never go back to an earlier one once a later one was seen,
no two requests of one key are ever in flight at once, and every event arrives.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import orjson
import pytest
from aiohttp import web

from dispatcher import queries
from dispatcher.api_deliveries import DELIVERIES
from dispatcher.policy import Decision, Outcome, Verdict
from dispatcher.record import Leasing, Result
from dispatcher.schedule import Clock
from dispatcher.status import collect

from .helpers import (
    DaemonProcess,
    Receiver,
    daemon,
    poll_until,
    recorder_for,
    settings_for,
    subscribe,
    wait_on_advisory_lock,
)
from .test_faults import delivered_by, metrics_of

ENTITY = {"ordering": "entity"}
# The clock runs RATE times faster: a 2 s retry delay is 0.1 s of wall time.
RATE = 20.0
RETRY = {"retry": {"delays": [2.0], "max_attempts": 60}}
FAST_LEASE = {
    "DISPATCHER_DELIVERY_TIMEOUT": "0.5",
    "DISPATCHER_DELIVERY_LEASE_SECONDS": "6",
    "DISPATCHER_DELIVERY_POLL_INTERVAL": "0.5",
    "DISPATCHER_DELIVERY_GRACE_PERIOD": "1",
    "DISPATCHER_DELIVERY_MAX_IN_FLIGHT": "32",
}
PROCESS_RETRY = {"retry": {"delays": [0.1], "max_attempts": 60}}


class OrderWitness:
    """A receiver's handler that fails a share of attempts at random, and remembers per key
    what it was asked, how many were in flight at once (per key and overall)."""

    def __init__(self, fail_share: float, hold: float, seed: int = 16) -> None:
        self.fail_share = fail_share
        self.hold = hold
        self.rng = random.Random(seed)
        self.seen: dict[str, list[int]] = defaultdict(list)
        self.delivered: dict[str, set[int]] = defaultdict(set)
        self.in_flight: dict[str, int] = defaultdict(int)
        self.most_per_key = 0
        self.total = 0
        self.most_overall = 0

    async def __call__(self, request: web.Request) -> web.Response:
        data = orjson.loads(await request.read())["data"]
        key, seq = str(data["key"]), int(data["seq"])
        self.seen[key].append(seq)
        self.in_flight[key] += 1
        self.total += 1
        self.most_per_key = max(self.most_per_key, self.in_flight[key])
        self.most_overall = max(self.most_overall, self.total)
        try:
            await asyncio.sleep(self.hold)
            if self.rng.random() < self.fail_share:
                return web.Response(status=500, text="nope")
            self.delivered[key].add(seq)
            return web.Response(status=200, text="ok")
        finally:
            self.in_flight[key] -= 1
            self.total -= 1

    def assert_in_order(self, keys: int, per_key: int) -> None:
        assert len(self.seen) == keys, sorted(self.seen)
        for key, seqs in self.seen.items():
            for a, b in itertools.pairwise(seqs):
                assert b >= a, f"key {key} went back from event {a} to {b}: {seqs}"
            assert self.delivered[key] == set(range(per_key)), (key, seqs)
        assert self.most_per_key == 1, "two requests of one key were in flight at once"


async def publish_keyed(
    db: asyncpg.Connection,
    keys: list[str],
    first: int,
    count: int,
    *,
    environment: str = "env-1",
) -> None:
    """Events `first`..`first + count - 1` of every key, in one statement, in seq order."""
    await db.execute(
        "INSERT INTO dispatcher.events (environment_id, event_name, payload, entity_instance_id) "
        "SELECT $1, 'products.update.v0', jsonb_build_object('key', k, 'seq', s), k "
        "FROM generate_series($3::int, $3::int + $4::int - 1) AS s, unnest($2::text[]) AS k "
        "ORDER BY s, k",
        environment,
        keys,
        first,
        count,
    )


async def done_count(db: asyncpg.Connection) -> int:
    n: int = await db.fetchval("SELECT count(*) FROM dispatcher.deliveries_done")
    return n


async def wait_all_done(db: asyncpg.Connection, total: int, timeout: float) -> None:
    async def finished() -> bool:
        return await done_count(db) >= total

    await poll_until(finished, timeout=timeout)
    assert await db.fetchval("SELECT count(*) FROM dispatcher.deliveries") == 0
    failed = await db.fetchval(
        "SELECT count(*) FROM dispatcher.deliveries_done WHERE status <> 'delivered'"
    )
    assert failed == 0


async def concurrent_publishers(
    database: str, keys: list[str], first: int, per_key: int, batches: int
) -> None:
    """Two connections publish events `first`.. of every key in batches, alternately, each
    batch after the one before it committed (publish order is commit order)."""
    conns = [await asyncpg.connect(database) for _ in range(2)]
    try:
        step = per_key // batches
        for i in range(batches):
            await publish_keyed(conns[i % 2], keys, first + i * step, step)
            await asyncio.sleep(0.05)
    finally:
        for conn in conns:
            await conn.close()


@pytest.mark.timeout(120)
async def test_entity_order_holds_through_random_failures_and_retries(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    keys = [f"p-{i}" for i in range(12)]
    per_key = 12
    witness = OrderWitness(fail_share=0.3, hold=0.01)
    receiver.plan("/hook", then=witness)
    await subscribe(db, receiver.url(), settings={**ENTITY, **RETRY})
    async with daemon(settings_for(database), clock=Clock(rate=RATE)):
        # Half before the daemon claims anything, half while it works and fails.
        await publish_keyed(db, keys, 0, 4)
        await concurrent_publishers(database, keys, 4, 4, 2)
        await publish_keyed(db, keys, 8, per_key - 8)
        await wait_all_done(db, len(keys) * per_key, timeout=90)
    witness.assert_in_order(len(keys), per_key)
    retried = await db.fetchval("SELECT count(*) FROM dispatcher.attempts WHERE outcome = 'retry'")
    assert retried > len(keys), "the receiver's failures should have caused retries"
    # Entities go out in parallel: the subscription's concurrency applies across keys.
    assert witness.most_overall >= 4, witness.most_overall


@pytest.mark.timeout(120)
async def test_subscription_order_sends_one_at_a_time_in_publish_order(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    witness = OrderWitness(fail_share=0.3, hold=0.005)
    receiver.plan("/hook", then=witness)
    await subscribe(db, receiver.url(), settings={"ordering": "subscription", **RETRY})
    async with daemon(settings_for(database), clock=Clock(rate=RATE)):
        # One key for the whole subscription: whatever the entity ids say.
        await db.execute(
            "INSERT INTO dispatcher.events (environment_id, event_name, payload, "
            "entity_instance_id) SELECT 'env-1', 'products.update.v0', "
            "jsonb_build_object('key', 'all', 'seq', s), 'p-' || (s % 7) "
            "FROM generate_series(0, 59) AS s ORDER BY s"
        )
        await wait_all_done(db, 60, timeout=60)
    witness.assert_in_order(1, 60)
    assert witness.most_overall == 1, "two requests of the subscription in flight at once"


@pytest.mark.timeout(150)
async def test_entity_order_survives_kill_9_mid_stream(
    database: str, db: asyncpg.Connection, receiver: Receiver, tmp_path: Path
) -> None:
    keys = [f"k-{i}" for i in range(10)]
    per_key = 20
    witness = OrderWitness(fail_share=0.3, hold=0.05)
    receiver.plan("/hook", then=witness)
    await subscribe(db, receiver.url(), settings={**ENTITY, **PROCESS_RETRY})
    await publish_keyed(db, keys, 0, per_key // 2)
    with DaemonProcess(database, FAST_LEASE) as proc:
        proc.start(tmp_path)
        await proc.wait_ready()

        async def some_sent() -> bool:
            return sum(len(s) for s in witness.seen.values()) >= 40

        await poll_until(some_sent, timeout=30)
        proc.kill()
    leased = await db.fetchval(
        "SELECT count(*) FROM dispatcher.deliveries WHERE lease_owner IS NOT NULL"
    )
    assert leased > 0, "the kill should leave heads leased"
    # Published while no daemon runs: they wait behind the heads the dead one held.
    await publish_keyed(db, keys, per_key // 2, per_key - per_key // 2)
    with DaemonProcess(database, FAST_LEASE) as proc:
        proc.start(tmp_path)
        await proc.wait_ready()
        await wait_all_done(db, len(keys) * per_key, timeout=90)
    witness.assert_in_order(len(keys), per_key)


@pytest.mark.timeout(150)
async def test_entity_order_holds_with_two_daemons_on_one_database(
    database: str, db: asyncpg.Connection, receiver: Receiver, tmp_path: Path
) -> None:
    keys = [f"k-{i}" for i in range(16)]
    per_key = 12
    witness = OrderWitness(fail_share=0.3, hold=0.01)
    receiver.plan("/hook", then=witness)
    await subscribe(db, receiver.url(), settings={**ENTITY, **PROCESS_RETRY})
    # Few slots each: neither daemon can take every key (a daemon keeps the keys it sends
    # to while it has room: the next of a key is released into its lease).
    procs = [
        DaemonProcess(database, {**FAST_LEASE, "DISPATCHER_DELIVERY_MAX_IN_FLIGHT": "4"})
        for _ in range(2)
    ]
    try:
        for proc in procs:
            proc.start(tmp_path)
        await asyncio.gather(*(p.wait_ready() for p in procs))
        await concurrent_publishers(database, keys, 0, per_key, 4)
        await wait_all_done(db, len(keys) * per_key, timeout=90)
        shares = [delivered_by(await metrics_of(p)) for p in procs]
    finally:
        for proc in procs:
            proc.kill()
    witness.assert_in_order(len(keys), per_key)
    assert sum(shares) == len(keys) * per_key, shares
    assert all(shares), f"one daemon did all the work: {shares}"


# -- the queue's bookkeeping, statement by statement -------------------------------------


async def live(db: asyncpg.Connection) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        "SELECT d.id, e.entity_instance_id AS entity, d.order_key, d.order_seq, d.waiting "
        "FROM dispatcher.deliveries d JOIN dispatcher.events e ON e.id = d.event_id "
        "ORDER BY d.order_seq NULLS FIRST, d.id"
    )
    return rows


async def end_head(
    conn: asyncpg.Connection, sid: UUID, key: str, delivery_id: int
) -> Callable[[], Awaitable[None]]:
    """What the recorder does when a head ends (its statements), up to (not including) its
    commit: the head is leased to it, delivered."""
    owner = uuid4()
    await conn.execute(
        "UPDATE dispatcher.deliveries SET lease_owner = $2 WHERE id = $1", delivery_id, owner
    )
    tx = conn.transaction()
    await tx.start()
    await record_head(conn, sid, key, delivery_id, owner)
    commit: Callable[[], Awaitable[None]] = tx.commit
    return commit


async def record_head(
    conn: asyncpg.Connection, sid: UUID, key: str, delivery_id: int, owner: UUID
) -> list[asyncpg.Record]:
    """queries.RECORD_ENDING_HEADS for one delivered head leased to `owner`, releasing
    the next of its key into `owner`'s lease."""
    outcome = ([delivery_id], [sid], [1], [0.0], [1.0], [200], [None], [None], ["delivered"])
    rows: list[asyncpg.Record] = await conn.fetch(
        queries.RECORD_ENDING_HEADS, *outcome, [None], owner, 0.0, 30.0, owner, [sid], [key]
    )
    return rows


async def test_fan_out_makes_all_but_each_keys_first_wait(
    db: asyncpg.Connection, receiver: Receiver
) -> None:
    await subscribe(db, receiver.url(), settings=ENTITY)
    await publish_keyed(db, ["a", "b"], 0, 3)
    # An event without an entity id is unordered.
    await db.execute(
        "INSERT INTO dispatcher.events (environment_id, event_name, payload) "
        "VALUES ('env-1', 'products.update.v0', '{}')"
    )
    rows = await live(db)
    assert [(r["order_key"], r["waiting"]) for r in rows] == [
        (None, False),
        ("a", False),
        ("b", False),
        ("a", True),
        ("b", True),
        ("a", True),
        ("b", True),
    ]
    # A later publish waits behind the live head too.
    await publish_keyed(db, ["a"], 3, 1)
    assert (await live(db))[-1]["waiting"] is True


async def test_unordered_subscription_rows_never_touch_the_ordering_columns(
    db: asyncpg.Connection, receiver: Receiver
) -> None:
    await subscribe(db, receiver.url(), settings={"ordering": "none"})
    await publish_keyed(db, ["a"], 0, 3)
    assert [(r["order_key"], r["order_seq"], r["waiting"]) for r in await live(db)] == [
        (None, None, False)
    ] * 3


async def test_a_head_ending_while_a_publisher_is_open_releases_the_publishers_row(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    """The race the commit-time check closes: the recorder's release cannot see an open
    publisher's row, so the publisher's commit releases it."""
    sid = await subscribe(db, receiver.url(), settings=ENTITY)
    await publish_keyed(db, ["a"], 0, 1)
    head = (await live(db))[0]["id"]
    publisher = await asyncpg.connect(database)
    recorder = await asyncpg.connect(database)
    try:
        tx = publisher.transaction()
        await tx.start()
        await publish_keyed(publisher, ["a"], 1, 1)  # waits behind the head it sees
        commit = await end_head(recorder, sid, "a", head)
        await commit()
        # The recorder released nothing (it could not see the row); the row still waits.
        assert await publisher.fetchval("SELECT bool_and(waiting) FROM dispatcher.deliveries")
        await tx.commit()
        rows = await live(db)
        assert [(r["order_key"], r["waiting"]) for r in rows] == [("a", False)]

        # The other way round: the head ends in an open recorder transaction, and the
        # publisher commits first; its commit waits for the recorder's, then releases.
        await publish_keyed(db, ["a"], 2, 1)
        head = (await live(db))[0]["id"]
        tx = publisher.transaction()
        await tx.start()
        await publish_keyed(publisher, ["a"], 3, 1)
        commit = await end_head(recorder, sid, "a", head)
        committing = asyncio.create_task(tx.commit())
        await wait_on_advisory_lock(db, publisher.get_server_pid())
        assert not committing.done(), "the publisher's check waits for the recorder"
        await commit()
        await committing
        rows = await live(db)
        assert [(r["order_key"], r["waiting"]) for r in rows] == [("a", False), ("a", True)]
    finally:
        await publisher.close()
        await recorder.close()


async def test_a_head_ending_while_a_publisher_checks_waits_and_releases_its_row(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    """A publisher's commit-time check holds its key's lock when the recorder's call
    starts: the call waits for the publisher's commit, and its statement, whose snapshot is
    taken once the lock is held, sees the publisher's row and releases it into the lease.
    (A snapshot taken before the wait would miss the row, and the check saw the head live:
    the row would wait for ever.)"""
    sid = await subscribe(db, receiver.url(), settings=ENTITY)
    await publish_keyed(db, ["a"], 0, 1)
    head = (await live(db))[0]["id"]
    owner = uuid4()
    await db.execute("UPDATE dispatcher.deliveries SET lease_owner = $2 WHERE id = $1", head, owner)
    publisher = await asyncpg.connect(database)
    recorder = await asyncpg.connect(database)
    try:
        tx = publisher.transaction()
        await tx.start()
        await publish_keyed(publisher, ["a"], 1, 1)
        # Where the check stands at commit: its key's lock taken, the head still live.
        await publisher.execute(
            "SELECT pg_advisory_xact_lock(dispatcher.order_lock($1, 'a', 1))", sid
        )
        recording = asyncio.create_task(record_head(recorder, sid, "a", head, owner))
        await wait_on_advisory_lock(db, recorder.get_server_pid())
        await tx.commit()
        released = await recording
        rows = await live(db)
        assert [(r["order_key"], r["waiting"]) for r in rows] == [("a", False)]
        assert [r["id"] for r in released] == [rows[0]["id"]]
        assert released[0]["leased"]
        assert (
            await db.fetchval(
                "SELECT lease_owner FROM dispatcher.deliveries WHERE id = $1", rows[0]["id"]
            )
            == owner
        )
    finally:
        await publisher.close()
        await recorder.close()


async def test_resend_goes_to_the_back_of_its_key(
    db: asyncpg.Connection, receiver: Receiver
) -> None:
    sid = await subscribe(db, receiver.url(), settings=ENTITY)
    await publish_keyed(db, ["a"], 0, 2)
    first, second = (r["id"] for r in await live(db))
    # The head is delivered: moved to deliveries_done, the next released.
    await db.execute(
        "WITH gone AS (DELETE FROM dispatcher.deliveries WHERE id = $1 RETURNING *) "
        "INSERT INTO dispatcher.deliveries_done (id, subscription_id, event_id, "
        "event_created_at, environment_id, attempts, status, created_at, finished_at) "
        "SELECT id, subscription_id, event_id, event_created_at, environment_id, 1, "
        "'delivered', created_at, now() FROM gone",
        first,
    )
    assert (
        await db.fetchval("SELECT dispatcher.release_next($1::uuid[], $2::text[])", [sid], ["a"])
        == 1
    )
    assert await db.fetchval("SELECT dispatcher.resend($1::bigint[])", [first]) == 1
    rows = await live(db)
    assert [(r["id"], r["waiting"]) for r in rows] == [(second, False), (first, True)]

    # The history shows it waiting behind the head; `dispatcher status` counts it.
    found = await db.fetch(DELIVERIES, None, sid, "waiting", *[None] * 6, 10, None, None)
    assert [(r["id"], r["waiting_behind"]) for r in found] == [(first, second)]
    assert (await collect(db)).waiting == 1

    # A deactivated subscription's rows are paused, keeping their place in line.
    await db.execute("UPDATE dispatcher.subscriptions SET active = false WHERE id = $1", sid)
    rows = await db.fetch("SELECT id, waiting, paused FROM dispatcher.deliveries ORDER BY id")
    assert [(r["id"], r["waiting"], r["paused"]) for r in rows] == [
        (first, True, True),
        (second, False, True),
    ]
    # Deleting the subscription takes its line with it.
    await db.execute("DELETE FROM dispatcher.subscriptions WHERE id = $1", sid)
    assert await live(db) == []


# -- the unordered path pays nothing -----------------------------------------------------

# queries.RECORD as ordered delivery left it (its text then, with sql/0013's lease column
# cleared on a retry since): ordering changed nothing of the unordered statement.
RECORD_BEFORE_ORDERING = "0119f5e222e27c93a038321a2e3babfe13a30f13e6babf5b4fcde95e5d3d1518"


def test_the_record_statement_is_unchanged() -> None:
    assert hashlib.sha256(queries.RECORD.encode()).hexdigest() == RECORD_BEFORE_ORDERING


class OneStatementPool:
    """A pool that allows only the recorder's one-statement path."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def fetchrow(self, sql: str, *args: Any) -> None:
        self.calls.append(sql)

    def acquire(self) -> Any:
        raise AssertionError("an unordered batch must not open a transaction")


def result(order_key: str | None, verdict: Verdict) -> Result:
    return Result(
        1,
        uuid4(),
        1,
        Outcome(0.0, 0.0, 0.0, status=200),
        Decision(verdict, next_at=1.0 if verdict is Verdict.RETRY else None),
        order_key=order_key,
    )


async def test_unordered_and_retried_ordered_outcomes_take_the_one_statement_path() -> None:
    pool = OneStatementPool()
    recorder = recorder_for(pool, uuid4())
    # A retried head stays the head: nothing to release, so no transaction either.
    await recorder._write([result(None, Verdict.DELIVERED), result("a", Verdict.RETRY)])
    assert pool.calls == [queries.RECORD]


async def test_the_claim_reads_only_its_index_with_long_lines_waiting(
    db: asyncpg.Connection, receiver: Receiver
) -> None:
    """Waiting rows are outside the claim's partial index: a claim over 20,000 waiting
    deliveries and 2 heads reads the 2, not the line."""
    await subscribe(db, receiver.url(), settings=ENTITY)
    await publish_keyed(db, ["a", "b"], 0, 10_000)
    await db.execute("ANALYZE dispatcher.deliveries")
    owner = uuid4()
    plan = await db.fetchval(
        "EXPLAIN (ANALYZE, FORMAT JSON) " + queries.CLAIM,
        1e10,
        500,
        90.0,
        [],
        owner,
        [],
        [],
        64,
        1 << 25,
    )
    text = orjson.dumps(orjson.loads(plan)).decode()
    assert "deliveries_due_idx" in text
    claimed = await db.fetchval(
        "SELECT count(*) FROM dispatcher.deliveries WHERE lease_owner = $1", owner
    )
    assert claimed == 2


async def first_of(db: asyncpg.Connection, key: str) -> tuple[bool, UUID | None]:
    """(waiting, lease_owner) of the first live delivery of an ordering key."""
    row = await db.fetchrow(
        "SELECT waiting, lease_owner FROM dispatcher.deliveries "
        "WHERE order_key = $1 ORDER BY order_seq LIMIT 1",
        key,
    )
    return row["waiting"], row["lease_owner"]


async def test_an_ended_heads_next_one_is_released_into_the_recorders_lease(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    """The recorder releases the next of each ended key straight into its own lease (one
    update instead of a release and a later claim) and hands the rows to its worker; a
    stopping recorder leaves them for any instance."""
    sid = await subscribe(db, receiver.url(), settings=ENTITY)
    await publish_keyed(db, ["a", "b", "c"], 0, 3)
    owner = uuid4()
    heads = await db.fetch(queries.CLAIM, 1e10, 10, 60.0, [], owner, [], [], 64, 1 << 25)
    assert sorted(r["entity_instance_id"] for r in heads) == ["a", "b", "c"]
    taken: list[asyncpg.Record] = []
    freed: list[int] = []

    async def take(rows: list[asyncpg.Record], freeing: int) -> None:
        assert not freed, "handed over before the flushed results free their slots"
        taken.extend(rows)
        assert freeing == 1

    pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
    try:
        recorder = recorder_for(
            pool,
            owner,
            on_flushed=lambda batch: freed.append(len(batch)),
            leasing=Leasing(lambda: 1000.0, 60.0, take),
        )

        def ended(row: asyncpg.Record) -> Result:
            return Result(
                row["id"],
                sid,
                1,
                Outcome(0.0, 0.0, 0.0, status=200),
                Decision(Verdict.DELIVERED),
                order_key=row["order_key"],
            )

        a, b, c = sorted(heads, key=lambda r: r["entity_instance_id"])
        # A head whose lease another instance took is still live there: nothing released.
        await db.execute(
            "UPDATE dispatcher.deliveries SET lease_owner = $2 WHERE id = $1", a["id"], uuid4()
        )
        recorder.add(ended(a))
        await recorder.flush()
        assert taken == []
        assert freed == [1]
        key_a = [r["waiting"] for r in await live(db) if r["order_key"] == "a"]
        assert key_a == [False, True, True]
        await db.execute(
            "UPDATE dispatcher.deliveries SET lease_owner = $2 WHERE id = $1", a["id"], owner
        )
        freed.clear()
        recorder.add(ended(a))
        await recorder.flush()
        assert [(r["entity_instance_id"], r["leased"]) for r in taken] == [("a", True)]
        row = await db.fetchrow(
            "SELECT waiting, lease_owner, extract(epoch FROM leased_until) AS due "
            "FROM dispatcher.deliveries WHERE id = $1",
            taken[0]["id"],
        )
        assert (row["waiting"], row["lease_owner"], float(row["due"])) == (False, owner, 1060.0)
        # Not claimable by anyone else while the lease runs.
        assert (
            await db.fetch(queries.CLAIM, 1000.0, 10, 60.0, [], uuid4(), [], [], 64, 1 << 25) == []
        )

        # Stopping: released for others, due as it was.
        freed.clear()
        recorder.lease_released = False
        recorder.add(ended(b))
        await recorder.flush()
        assert len(taken) == 1
        assert await first_of(db, "b") == (False, None)

        # A paused subscription's next one is released, never leased.
        freed.clear()
        recorder.lease_released = True
        await db.execute("UPDATE dispatcher.deliveries SET paused = true WHERE order_key = 'c'")
        recorder.add(ended(c))
        await recorder.flush()
        assert len(taken) == 1
        assert await first_of(db, "c") == (False, None)
    finally:
        await pool.close()
