"""The worker's statements keep index plans when the queue grows from empty in one burst,
on the suite's server and on Debian's stock PostgreSQL (tests/pgcluster.single; without the
`postgresql` package these skip, and fail in CI, which installs it).

Postgres switches a prepared statement to a generic plan after five calls; made while the
queue was empty, that plan scans and sorts the whole table on every call until autovacuum
analyzes it (a claim took 32 s with 100k rows queued). The worker's connections plan each
call for the table as it is now.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import orjson
import pytest

from dispatcher import queries
from dispatcher.app import WORKER_SERVER_SETTINGS

from .conftest import PgServer, fresh_database, templated
from .helpers import missing_system_package
from .pgcluster import debian_binaries, single

CLAIM_TYPES = "float8, int, float8, uuid[], uuid, uuid[], int[], int, bigint"
RECORD_TYPES = (
    "bigint[], uuid[], int[], float8[], float8[], int[], text[], text[], text[], float8[], uuid"
)


@pytest.fixture(scope="module")
def stock() -> Iterator[PgServer]:
    """Debian's PostgreSQL, as users run it, with a migrated template, for this module."""
    bin_path = debian_binaries()
    if bin_path is None:
        missing_system_package("Debian's PostgreSQL: apt-get install -y postgresql")
    with single(bin_path) as node, templated(node.dsn()) as server:
        yield server


@pytest.fixture(params=["suite", "stock"])
def plans_server(request: pytest.FixtureRequest, pg_server: PgServer) -> PgServer:
    """The suite's server, then the stock one (set up only when a test asks for it)."""
    server: PgServer = pg_server if request.param == "suite" else request.getfixturevalue("stock")
    return server


@pytest.fixture
async def plans_db(plans_server: PgServer) -> AsyncIterator[str]:
    """A fresh, migrated database on the server of this parametrization."""
    async with fresh_database(plans_server) as dsn:
        yield dsn


def scans(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """(node type, relation) of every scan in an EXPLAIN (FORMAT JSON) plan tree."""
    found = []
    if "Relation Name" in plan:
        found.append((plan["Node Type"], plan["Relation Name"]))
    for child in plan.get("Plans", []):
        found += scans(child)
    return found


async def explain(conn: asyncpg.Connection, call: str) -> list[tuple[str, str]]:
    raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE {call}")
    return scans(orjson.loads(raw)[0]["Plan"])


async def test_claim_and_record_scan_no_queue_table_after_a_burst(plans_db: str) -> None:
    conn = await asyncpg.connect(plans_db, server_settings=WORKER_SERVER_SETTINGS)
    try:
        await conn.execute(f"PREPARE claim({CLAIM_TYPES}) AS {queries.CLAIM}")
        await conn.execute(f"PREPARE record({RECORD_TYPES}) AS {queries.RECORD}")
        owner = uuid.uuid4()
        claim = (
            f"claim({time.time() + 60}, 64, 90, '{{}}', '{owner}', '{{}}', '{{}}', 64, {1 << 25})"
        )
        empty = "'{}', " * 10
        # Explained, never run: the plan for a batch of 64 outcomes.
        ids = ",".join(str(i) for i in range(1, 65))
        record = f"record('{{{ids}}}', {empty[6:]}'{owner}')"
        await conn.execute("ANALYZE dispatcher.deliveries")
        for _ in range(8):  # an idle daemon polls an empty queue
            await conn.execute(f"EXECUTE {claim}")
            await conn.execute(f"EXECUTE record({empty}'{owner}')")
        await conn.execute(
            "INSERT INTO dispatcher.subscriptions (environment_id, url, events, secret) "
            "VALUES ('burst', 'https://example.test/hook', '{products.*}', "
            "'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')"
        )
        await conn.execute(
            "INSERT INTO dispatcher.events (environment_id, event_name, payload) "
            "SELECT 'burst', 'products.update.v0', '{}'::jsonb FROM generate_series(1, 20000)"
        )
        for call in (claim, record):
            found = await explain(conn, call)
            assert ("Seq Scan", "deliveries") not in found, (call, found)
        assert ("Index Scan", "deliveries") in await explain(conn, claim)
    finally:
        await conn.close()


async def test_the_claim_reads_the_due_index_when_analyzed_while_rows_were_leased(
    plans_db: str,
) -> None:
    """Statistics taken while most rows were leased (sql/0013) must not turn the claim's
    ordered read of the due index into a read and sort of every due row."""
    conn = await asyncpg.connect(plans_db, server_settings=WORKER_SERVER_SETTINGS)
    try:
        await conn.execute(
            "INSERT INTO dispatcher.subscriptions (environment_id, url, events, secret) "
            "VALUES ('burst', 'https://example.test/hook', '{products.*}', "
            "'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')"
        )
        publish = (
            "INSERT INTO dispatcher.events (environment_id, event_name, payload) "
            "SELECT 'burst', 'products.update.v0', '{}'::jsonb FROM generate_series(1, $1)"
        )
        owner = uuid.uuid4()
        await conn.execute(publish, 2000)
        args: tuple[object, ...] = (time.time(), 2000, 90.0, [], owner, [], [], 2000, 1 << 25)
        assert len(await conn.fetch(queries.CLAIM, *args)) == 2000
        await conn.execute("ANALYZE dispatcher.deliveries")
        await conn.execute(publish, 20000)
        await conn.execute(f"PREPARE claim({CLAIM_TYPES}) AS {queries.CLAIM}")
        found = await explain(
            conn, f"claim({time.time()}, 500, 90, '{{}}', '{owner}', '{{}}', '{{}}', 64, 1)"
        )
        assert ("Seq Scan", "deliveries") not in found, found
        assert ("Bitmap Heap Scan", "deliveries") not in found, found
        assert ("Index Scan", "deliveries") in found, found
    finally:
        await conn.close()


def buffers(plan: dict[str, Any]) -> int:
    return int(plan.get("Shared Hit Blocks", 0)) + int(plan.get("Shared Read Blocks", 0))


def subplan(plan: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The node of an EXPLAIN (FORMAT JSON) plan tree named `name` (a CTE's: "CTE due")."""
    if plan.get("Subplan Name") == name:
        return plan
    for child in plan.get("Plans", []):
        if (found := subplan(child, name)) is not None:
            return found
    return None


async def test_the_claim_reads_the_due_index_in_order_after_the_queue_was_vacuumed_empty(
    plans_db: str,
) -> None:
    """Vacuumed empty, the queue's statistics say it holds nothing; planned from them,
    PostgreSQL 18 read every due row of the next burst (the bench's faulty scenario: 12,000
    over 100 endpoints) through a bitmap and sorted them all for the earliest 128: 511
    buffers, against 13 read in order from the due index (PostgreSQL 15 kept the index
    here). dispatcher.due_deliveries (sql/0017) reads the index in order whatever they
    say."""
    conn = await asyncpg.connect(plans_db, server_settings=WORKER_SERVER_SETTINGS)
    try:
        await conn.execute(
            "INSERT INTO dispatcher.subscriptions (environment_id, url, events, secret) "
            "SELECT 'burst-' || i, 'https://example.test/hook', '{products.*}', "
            "'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw' FROM generate_series(0, 99) i"
        )
        await conn.execute("VACUUM ANALYZE dispatcher.deliveries")
        await conn.execute(
            "INSERT INTO dispatcher.events (environment_id, event_name, payload) "
            "SELECT 'burst-' || (g % 100), 'products.update.v0', "
            "'{\"n\": 1}'::jsonb "
            "FROM generate_series(1, 12000) g"
        )
        args: tuple[object, ...] = (time.time(), 128, 90.0, [], uuid.uuid4(), [], [], 4, 1 << 25)
        # The session's first call plans the function's query (catalog reads): not counted.
        assert len(await conn.fetch(queries.CLAIM, *args)) == 128
        raw = await conn.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + queries.CLAIM, *args)
        due = subplan(orjson.loads(raw)[0]["Plan"], "CTE due")
        assert due is not None
        assert due["Actual Rows"] == 128, due
        # The 128 earliest and the 128 leased before them: a few pages of the heap.
        assert buffers(due) < 100, buffers(due)
    finally:
        await conn.close()


async def test_the_claim_updates_what_it_took_in_one_index_pass(plans_db: str) -> None:
    """With fresh statistics of a backlog the update of the rows taken was planned as a
    nested loop that probed the primary key for every taken id once per taken row (128
    rows: 16,384 probes, 18k buffers, 4 of the claim's 6.5 ms on PostgreSQL 15): the update
    reads the ids once, and the answer joins what the update returns."""
    conn = await asyncpg.connect(plans_db, server_settings=WORKER_SERVER_SETTINGS)
    try:
        sid = await conn.fetchval(
            "INSERT INTO dispatcher.subscriptions (environment_id, url, events, secret) "
            "VALUES ('fresh', 'https://example.test/hook', '{products.*}', "
            "'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw') RETURNING id"
        )
        await conn.execute(
            "INSERT INTO dispatcher.events (environment_id, event_name, payload) "
            "SELECT 'fresh', 'products.update.v0', '{\"n\": 1}'::jsonb "
            "FROM generate_series(1, 20000)"
        )
        await conn.execute("ANALYZE dispatcher.deliveries")
        await conn.execute("ANALYZE dispatcher.events")
        args: tuple[object, ...] = (
            time.time() + 5,
            500,
            30.0,
            [],
            uuid.uuid4(),
            [sid],
            [128],
            16,
            1 << 25,
        )
        raw = await conn.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + queries.CLAIM, *args)
        plan = orjson.loads(raw)[0]["Plan"]
        assert plan["Actual Rows"] == 128
        # PostgreSQL 15, these 20k rows queued: 18,227 buffers before.
        assert buffers(plan) < 30 * 128, buffers(plan)
    finally:
        await conn.close()


SUBSCRIBE = (
    "INSERT INTO dispatcher.subscriptions (environment_id, url, events, secret, settings) "
    "VALUES ($1, 'https://example.test/hook', '{products.*}', "
    "'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', $2::text::jsonb) RETURNING id"
)
PUBLISH = (
    "INSERT INTO dispatcher.events (environment_id, event_name, payload, entity_instance_id) "
    "SELECT $1, 'products.update.v0', '{\"n\": 1}'::jsonb, 'entity-' || (g % 1000) "
    "FROM generate_series(1, 20000) g"
)


async def _statistics(conn: asyncpg.Connection, state: str) -> None:
    """Queue statistics as a burst can find them, then the burst: 20,000 unordered and
    20,000 ordered (1,000 keys) deliveries."""
    if state == "vacuumed empty":
        await conn.execute("VACUUM ANALYZE dispatcher.deliveries")
    elif state != "never analyzed":
        env = {"analyzed unordered": "plain", "analyzed ordered": "ordered"}.get(state, "plain")
        await conn.execute(PUBLISH, env)
        if state == "analyzed leased":
            await conn.execute(
                "UPDATE dispatcher.deliveries SET lease_owner = gen_random_uuid(), "
                "leased_until = now() + interval '1 minute'"
            )
        await conn.execute("ANALYZE dispatcher.deliveries")
        await conn.execute("DELETE FROM dispatcher.deliveries")
    await conn.execute(PUBLISH, "plain")
    await conn.execute(PUBLISH, "ordered")


async def _buffers(conn: asyncpg.Connection, query: str, *args: object) -> tuple[int, int]:
    raw = await conn.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + query, *args)
    plan = orjson.loads(raw)[0]["Plan"]
    return buffers(plan), int(plan["Actual Rows"])


@pytest.mark.parametrize(
    "state",
    [
        "never analyzed",
        "vacuumed empty",
        "analyzed unordered",
        "analyzed ordered",
        "analyzed leased",
    ],
)
async def test_the_worker_statements_read_a_few_buffers_a_row_whatever_the_statistics(
    plans_db: str, state: str
) -> None:
    """Claims and records of unordered and ordered deliveries over a burst, with the queue's
    statistics as the burst can find them. Upkeep analyzes a queue that fills (upkeep.py),
    so they are whatever it held then: analyzed full of unordered rows, the ordered record
    (sql/0014) read the whole ordering index for each head it ended, 998,007 buffers for
    128 on PostgreSQL 18 (sql/0016: 5,047), and the ordered scenario fell to 0.07 of
    unordered."""
    conn = await asyncpg.connect(plans_db, server_settings=WORKER_SERVER_SETTINGS)
    try:
        plain = await conn.fetchval(SUBSCRIBE, "plain", "{}")
        ordered = await conn.fetchval(SUBSCRIBE, "ordered", '{"ordering": "entity"}')
        await _statistics(conn, state)
        found: dict[str, tuple[int, int]] = {}
        now = time.time()
        for sid, other, name in ((plain, ordered, "unordered"), (ordered, plain, "ordered")):
            owner = uuid.uuid4()
            claim = (now, 128, 90.0, [other], owner, [sid], [128], 64, 1 << 25)
            tx = conn.transaction()
            await tx.start()
            found[f"claim {name}"] = await _buffers(conn, queries.CLAIM, *claim)
            await tx.rollback()
            for outcome in ("delivered", "retry"):
                tx = conn.transaction()
                await tx.start()
                rows = [
                    r
                    for r in await conn.fetch(queries.CLAIM, *claim)
                    if r["subscription_id"] == sid
                ]
                n = len(rows)
                args = (
                    [r["id"] for r in rows],
                    [sid] * n,
                    [1] * n,
                    [now] * n,
                    [1.0] * n,
                    [200 if outcome == "delivered" else 500] * n,
                    [None] * n,
                    [None] * n,
                    [outcome] * n,
                    [now + 60 if outcome == "retry" else None] * n,
                    owner,
                )
                if name == "ordered" and outcome == "delivered":
                    b, _ = await _buffers(
                        conn,
                        queries.RECORD_ENDING_HEADS,
                        *args,
                        now,
                        90.0,
                        owner,
                        [sid] * n,
                        [r["order_key"] for r in rows],
                    )
                    found["record ending heads"] = (b, n)
                else:
                    b, _ = await _buffers(conn, queries.RECORD, *args)
                    found[f"record {name} {outcome}"] = (b, n)
                await tx.rollback()
        # 5-40 buffers a row in each of these states, on both servers; a plan that reads an
        # index or the table whole for each row is in the hundreds to thousands.
        heavy = {k: (b, n) for k, (b, n) in found.items() if b > 60 * n + 500}
        assert not heavy, (state, heavy)
        assert all(n > 0 for _, n in found.values()), found
    finally:
        await conn.close()
