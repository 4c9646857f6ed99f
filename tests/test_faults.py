"""Infrastructure faults: Postgres goes away and comes back, daemons die with kill -9.

Every test ends with every published event delivered and nothing left in the queue.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from dispatcher.embedded import EmbeddedPostgres

from .helpers import (
    DaemonProcess,
    Receiver,
    http_status,
    owner_of,
    poll_until,
    publish,
    subscribe,
)

MAX_IN_FLIGHT = 16
FAST_LEASE = {
    "DISPATCHER_DELIVERY_TIMEOUT": "0.5",
    "DISPATCHER_DELIVERY_LEASE_SECONDS": "6",
    "DISPATCHER_DELIVERY_POLL_INTERVAL": "0.5",
    "DISPATCHER_DELIVERY_GRACE_PERIOD": "1",
    "DISPATCHER_DELIVERY_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
}
RETRY_FAST = {"retry": {"delays": [0.2]}}


def slow_ok(seconds: float) -> Any:
    async def reply(request: web.Request) -> web.Response:
        await asyncio.sleep(seconds)
        return web.Response(text="ok")

    return reply


async def count(db: asyncpg.Connection, sql: str, *args: object) -> int:
    n: int = await db.fetchval(sql, *args)
    return n


async def wait_done(db: asyncpg.Connection, total: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    sql = "SELECT count(*) FROM dispatcher.deliveries_done"
    while (done := await count(db, sql)) < total:
        assert time.monotonic() < deadline, f"only {done} of {total} finished"
        await asyncio.sleep(0.05)


async def assert_all_delivered(db: asyncpg.Connection, total: int) -> None:
    assert await count(db, "SELECT count(*) FROM dispatcher.deliveries") == 0, "stuck deliveries"
    delivered = "SELECT count(*) FROM dispatcher.deliveries_done WHERE status = 'delivered'"
    assert await count(db, delivered) == total


def webhook_ids(receiver: Receiver) -> Counter[str]:
    return Counter(r.headers["webhook-id"] for r in receiver.requests)


def alive(proc: DaemonProcess) -> bool:
    return proc.proc is not None and proc.proc.poll() is None


async def readyz(proc: DaemonProcess) -> int | None:
    return await http_status(f"http://127.0.0.1:{proc.port}/readyz")


# -- Postgres stopped and started under a running daemon --------------------------------


@pytest.fixture
async def own_postgres() -> AsyncIterator[EmbeddedPostgres]:
    """A PostgreSQL server of this test's own, which the test may stop and start."""
    # A short base path: the Unix socket path must stay under 107 bytes.
    base = tempfile.mkdtemp(prefix="disp-f-")
    server = EmbeddedPostgres(Path(base), fast_unsafe=True)
    try:
        admin_dsn = await asyncio.to_thread(server.start)
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute("CREATE DATABASE faults")
        finally:
            await conn.close()
        yield server
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(150)
async def test_postgres_restart_mid_run_loses_nothing(
    own_postgres: EmbeddedPostgres, receiver: Receiver, tmp_path: Path
) -> None:
    dsn = own_postgres.dsn("faults")
    receiver.plan("/hook", then=slow_ok(0.2))
    # At debug, each failed call is a line (database.call_failed) the test can count.
    with DaemonProcess(dsn, {**FAST_LEASE, "DISPATCHER_LOG_LEVEL": "debug"}) as proc:
        proc.start(tmp_path)
        await proc.wait_ready()  # it applied the migrations
        db = await asyncpg.connect(dsn)
        try:
            await subscribe(db, receiver.url(), settings=RETRY_FAST)
            # Enough that the outage comes in the middle (slow start: 4 at once, one more per
            # answer): with 150 a loaded host sometimes had them all sent before it stopped.
            await publish(db, {"batch": "before"}, count=400)
            await receiver.wait_for(20, timeout=10)
        finally:
            await db.close()

        await asyncio.to_thread(own_postgres.stop)
        assert own_postgres.server_pid() is None, "the test's server should be down"
        assert len(receiver.requests) < 400, "the outage should come in the middle of the work"

        async def not_ready() -> bool:
            return await readyz(proc) == 503

        await poll_until(not_ready, timeout=10)

        def logged(event: str, operation: str | None = None) -> int:
            lines = [orjson.loads(x) for x in proc.output().splitlines() if x.startswith("{")]
            return sum(
                x["event"] == event and (operation is None or x.get("operation") == operation)
                for x in lines
            )

        # Down for several listener reconnects and safety polls, and long enough for the
        # outcomes of the requests in flight at the stop to wait for the database.
        async def retried_a_few_times() -> bool:
            return (
                logged("database.call_failed", "listen") >= 4
                and logged("database.call_failed", "poll") >= 2
                and logged("database.call_failed", "record") >= 1
            )

        await poll_until(retried_a_few_times, timeout=10)
        assert alive(proc), proc.output()
        assert await readyz(proc) == 503

        await asyncio.to_thread(own_postgres.start)

        async def ready() -> bool:
            return await readyz(proc) == 200

        await poll_until(ready, timeout=30)
        # However many calls failed, the outage is two lines at warning and info, and the
        # claim loop backed off (100 ms doubling to 5 s) instead of spinning.
        assert logged("database.unavailable") == 1, proc.output()
        assert logged("database.available") == 1, proc.output()
        assert logged("database.call_failed", "claim") < 40, proc.output()
        db = await asyncpg.connect(dsn)
        try:
            await publish(db, {"batch": "after"}, count=50)
            await wait_done(db, 450, timeout=40)
            await assert_all_delivered(db, 450)
        finally:
            await db.close()
        assert alive(proc), proc.output()

    ids = webhook_ids(receiver)
    assert len(ids) == 450, "every delivery arrived"
    # The outage was shorter than a lease: nothing was claimed twice.
    assert max(ids.values()) == 1, "a delivery was sent twice"
    seen = {(r.json()["data"]["batch"], r.json()["data"]["n"]) for r in receiver.requests}
    published = {("before", n) for n in range(1, 401)} | {("after", n) for n in range(1, 51)}
    assert seen == published


# -- several daemons on one database ----------------------------------------------------


def delivered_by(metrics: str) -> int:
    match = re.search(r'^dispatcher_deliveries_total\{outcome="delivered"\} (\S+)$', metrics, re.M)
    return int(float(match.group(1))) if match else 0


async def metrics_of(proc: DaemonProcess) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{proc.port}/metrics") as r,
    ):
        return await r.text()


@pytest.mark.timeout(120)
async def test_three_daemons_share_the_work_and_finish_a_killed_ones(
    database: str, db: asyncpg.Connection, receiver: Receiver, tmp_path: Path
) -> None:
    await subscribe(db, receiver.url("/a"), settings=RETRY_FAST)
    await subscribe(db, receiver.url("/b"), settings=RETRY_FAST)
    receiver.plan("/a", then=slow_ok(0.01))
    receiver.plan("/b", then=slow_ok(0.01))
    procs = [DaemonProcess(database, FAST_LEASE) for _ in range(3)]
    try:
        for proc in procs:
            proc.start(tmp_path)
        await asyncio.gather(*(p.wait_ready() for p in procs))

        await publish(db, count=150)
        await wait_done(db, 300, timeout=30)
        ids = webhook_ids(receiver)
        assert len(ids) == 300
        assert max(ids.values()) == 1, "a delivery was sent twice"
        assert await count(db, "SELECT count(*) FROM dispatcher.attempts") == 300
        shares = [delivered_by(await metrics_of(p)) for p in procs]
        assert sum(shares) == 300, shares
        assert sum(1 for s in shares if s > 0) >= 2, f"one daemon did all the work: {shares}"

        # Slower receivers, so every daemon holds leases when one of them dies.
        receiver.plan("/a", then=slow_ok(0.1))
        receiver.plan("/b", then=slow_ok(0.1))
        victim, survivors = procs[0], procs[1:]
        victim_owner = owner_of(victim)
        await publish(db, count=150)
        held = "SELECT count(*) FROM dispatcher.deliveries WHERE lease_owner = $1"

        async def victim_holds_leases() -> bool:
            return await count(db, held, victim_owner) > 0

        await poll_until(victim_holds_leases, timeout=10)
        before_kill = len(receiver.requests)
        victim.kill()
        orphaned = [
            r["id"]
            for r in await db.fetch(
                "SELECT id FROM dispatcher.deliveries WHERE lease_owner = $1", victim_owner
            )
        ]
        assert orphaned, "the kill should leave leased deliveries behind"
        assert before_kill < 600

        await wait_done(db, 600, timeout=40)
        await assert_all_delivered(db, 600)
        finished = await count(
            db,
            "SELECT count(*) FROM dispatcher.deliveries_done "
            "WHERE id = ANY($1::bigint[]) AND status = 'delivered'",
            orphaned,
        )
        assert finished == len(orphaned), "the survivors delivered the dead one's work"
        for proc in survivors:
            assert alive(proc), proc.output()
    finally:
        for proc in procs:
            proc.kill()
    ids = webhook_ids(receiver)
    assert len(ids) == 600
    duplicates = sum(n - 1 for n in ids.values())
    assert duplicates <= MAX_IN_FLIGHT, f"{duplicates} duplicates after one kill"


@pytest.mark.timeout(120)
async def test_repeated_kill_9_under_load_loses_nothing(
    database: str, db: asyncpg.Connection, receiver: Receiver, tmp_path: Path
) -> None:
    kills = 5
    await subscribe(db, receiver.url(), settings=RETRY_FAST)
    receiver.plan("/hook", then=slow_ok(0.05))
    await publish(db, count=300)
    total = 300
    orphaned = 0
    for _ in range(kills):
        with DaemonProcess(database, FAST_LEASE) as proc:
            proc.start(tmp_path)
            await proc.wait_ready()
            await receiver.wait_for(len(receiver.requests) + 40, timeout=20)
            proc.kill()
        orphaned += await count(
            db,
            "SELECT count(*) FROM dispatcher.deliveries WHERE lease_owner = $1",
            owner_of(proc),
        )
        # Load keeps coming while no daemon runs.
        await publish(db, count=40)
        total += 40
    assert orphaned > 0, "the kills should have left leased deliveries behind"
    assert len(webhook_ids(receiver)) < total, "the kills happened before the work was done"

    with DaemonProcess(database, FAST_LEASE) as last:
        last.start(tmp_path)
        await last.wait_ready()
        await wait_done(db, total, timeout=40)
    await assert_all_delivered(db, total)
    ids = webhook_ids(receiver)
    assert len(ids) == total, "every delivery arrived"
    duplicates = sum(n - 1 for n in ids.values())
    assert duplicates <= kills * MAX_IN_FLIGHT, f"{duplicates} duplicates after {kills} kills"


async def test_a_claim_held_up_by_a_lock_is_logged_as_a_slow_statement(
    database: str, db: asyncpg.Connection, receiver: Receiver, tmp_path: Path
) -> None:
    # The first attempt fails and its retry falls due 1 s later, while another session
    # holds the queue locked: the retry's claim waits for the lock, and says so.
    receiver.plan("/hook", 503, then=200)
    await subscribe(db, receiver.url(), settings={"retry": {"delays": [1.0]}})
    with DaemonProcess(database, {"DISPATCHER_LOG_LEVEL": "info"}) as proc:
        proc.start(tmp_path)
        await proc.wait_ready()
        await publish(db)

        async def first_attempt() -> bool:
            return bool(await db.fetchval("SELECT count(*) FROM dispatcher.attempts"))

        await poll_until(first_attempt, 10.0)
        watcher = await asyncpg.connect(database)
        try:
            async with db.transaction():
                await db.execute("LOCK TABLE dispatcher.deliveries IN ACCESS EXCLUSIVE MODE")

                async def claim_waits() -> bool:
                    return bool(
                        await watcher.fetchval(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                            "current_database() AND wait_event_type = 'Lock' "
                            "AND query LIKE '%WITH due AS%'"
                        )
                    )

                await poll_until(claim_waits, 10.0)
                # Held past the threshold from here; the claim has waited since before.
                await asyncio.sleep(0.6)
        finally:
            await watcher.close()

        async def logged() -> bool:
            return "db.slow_statement" in proc.output()

        await poll_until(logged, 10.0)
        output = proc.output()
    lines = [orjson.loads(x) for x in output.splitlines() if x.startswith("{")]
    slow = [x for x in lines if x["event"] == "db.slow_statement"]
    assert slow, output
    claim = [x for x in slow if x["operation"] == "claim"]
    assert claim, slow
    assert claim[0]["level"] == "warning"
    assert claim[0]["ms"] >= 500
    assert claim[0]["rows"] == 1
