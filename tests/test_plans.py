"""The worker's statements keep index plans when the queue grows from empty in one burst.

Postgres switches a prepared statement to a generic plan after five calls; made while the
queue was empty, that plan scans and sorts the whole table on every call until autovacuum
analyzes it (a claim took 32 s with 100k rows queued). The worker's connections plan each
call for the table as it is now.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import asyncpg
import orjson

from dispatcher import queries
from dispatcher.app import WORKER_SERVER_SETTINGS

CLAIM_TYPES = "float8, int, float8, uuid[], uuid, uuid[], int[], int, bigint"
RECORD_TYPES = (
    "bigint[], uuid[], int[], float8[], float8[], int[], text[], text[], text[], float8[], uuid"
)


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


async def test_claim_and_record_scan_no_queue_table_after_a_burst(database: str) -> None:
    conn = await asyncpg.connect(database, server_settings=WORKER_SERVER_SETTINGS)
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
    database: str,
) -> None:
    """Statistics taken while most rows were leased (sql/0013) must not turn the claim's
    ordered read of the due index into a read and sort of every due row."""
    conn = await asyncpg.connect(database, server_settings=WORKER_SERVER_SETTINGS)
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
