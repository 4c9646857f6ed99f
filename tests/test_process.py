"""The daemon as a process: kill -9 loses nothing, SIGTERM is graceful."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from aiohttp import web

from .helpers import DaemonProcess, Receiver, publish, subscribe

FAST_LEASE = {
    "DISPATCHER_DELIVERY_TIMEOUT": "0.5",
    "DISPATCHER_DELIVERY_LEASE_SECONDS": "6",
    "DISPATCHER_DELIVERY_POLL_INTERVAL": "0.5",
    "DISPATCHER_DELIVERY_GRACE_PERIOD": "1",
}


async def done_count(db: asyncpg.Connection) -> int:
    n: int = await db.fetchval("SELECT count(*) FROM dispatcher.deliveries_done")
    return n


async def wait_done(db: asyncpg.Connection, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while await done_count(db) < count:
        assert time.monotonic() < deadline, f"only {await done_count(db)} of {count} finished"
        await asyncio.sleep(0.05)


def slow_ok(seconds: float) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def reply(request: web.Request) -> web.Response:
        await asyncio.sleep(seconds)
        return web.Response(text="ok")

    return reply


async def test_kill_9_under_load_loses_nothing_and_leases_recover(
    database: str, db: asyncpg.Connection, receiver: Receiver, tmp_path: Path
) -> None:
    await subscribe(db, receiver.url(), settings={"retry": {"delays": [0.1]}})
    receiver.plan("/hook", then=slow_ok(0.05))
    await publish(db, count=300)
    env = {**FAST_LEASE, "DISPATCHER_DELIVERY_MAX_IN_FLIGHT": "16"}
    with DaemonProcess(database, env) as first:
        first.start(tmp_path)
        await first.wait_ready()
        await receiver.wait_for(60, timeout=20)
        first.kill()
    sent_before_kill = len(receiver.requests)
    stuck = await db.fetchval(
        "SELECT count(*) FROM dispatcher.deliveries WHERE lease_owner IS NOT NULL"
    )
    assert stuck > 0, "the kill should leave leased deliveries behind"
    with DaemonProcess(database, env) as second:
        second.start(tmp_path)
        await second.wait_ready()
        await wait_done(db, 300, timeout=40)
    ids = Counter(r.headers["webhook-id"] for r in receiver.requests)
    assert len(ids) == 300, "every delivery arrived"
    duplicates = sum(n - 1 for n in ids.values())
    assert duplicates <= 16, f"{duplicates} duplicates, more than were in flight at the kill"
    assert sent_before_kill < 300
    assert await db.fetchval("SELECT count(*) FROM dispatcher.deliveries") == 0
    assert (
        await db.fetchval(
            "SELECT count(*) FROM dispatcher.deliveries_done WHERE status = 'delivered'"
        )
        == 300
    )


async def test_sigterm_lets_in_flight_requests_finish_and_exits_zero(
    database: str, db: asyncpg.Connection, receiver: Receiver, tmp_path: Path
) -> None:
    await subscribe(db, receiver.url())
    receiver.plan("/hook", then=slow_ok(0.8))
    env = {"DISPATCHER_DELIVERY_GRACE_PERIOD": "5"}
    with DaemonProcess(database, env) as proc:
        proc.start(tmp_path)
        await proc.wait_ready()
        await publish(db, count=5)
        await receiver.wait_for(5)
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit(timeout=10) == 0, proc.output()
        assert time.monotonic() - started < 5
    assert await done_count(db) == 5, "the requests in flight at SIGTERM were recorded"
    assert "dispatcher.stopped" in proc.output()


async def test_sigterm_releases_what_cannot_finish_in_the_grace_period(
    database: str, db: asyncpg.Connection, receiver: Receiver, tmp_path: Path
) -> None:
    await subscribe(db, receiver.url(), settings={"timeout": 20})
    receiver.plan("/hook", slow_ok(30), slow_ok(30), then=200)
    env = {"DISPATCHER_DELIVERY_GRACE_PERIOD": "0.5"}
    with DaemonProcess(database, env) as proc:
        proc.start(tmp_path)
        await proc.wait_ready()
        await publish(db, count=2)
        await receiver.wait_for(2)
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit(timeout=10) == 0, proc.output()
        assert time.monotonic() - started < 3
    released = await db.fetch(
        "SELECT lease_owner, attempts, due_at <= now() AS due FROM dispatcher.deliveries"
    )
    assert [tuple(r) for r in released] == [(None, 0, True)] * 2
    with DaemonProcess(database) as again:
        again.start(tmp_path)
        await again.wait_ready()
        await wait_done(db, 2, timeout=10)
