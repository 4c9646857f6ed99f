"""Many machines, one database: the primary dies under load and its synchronous standby takes
over; the daemon, given both hosts in one URL, finds the new primary by itself.

This is what users of Patroni or a managed HA Postgres run (issue 13): a multi-host URL with
`target_session_attrs=read-write`. The test plays the cluster manager (kill -9 of the
primary's postmaster, `pg_ctl promote`, synchronous replication off on the promoted server)
and checks the daemon's side: it stays up, says it is not ready while no primary answers,
answers the API with a prompt 503 instead of hanging, comes back by itself and delivers
everything. tests/test_faults.py covers a single server stopped and restarted at the same
address; here the address the daemon must use changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from dispatcher import logs, tokens
from dispatcher.app import apply_migrations

from .helpers import DaemonProcess, Receiver, http_status, poll_until, publish, subscribe
from .pgcluster import Pair, wait_sync
from .test_faults import (
    FAST_LEASE,
    RETRY_FAST,
    alive,
    assert_all_delivered,
    slow_ok,
    wait_done,
    webhook_ids,
)

# Small, so the duplicate bound below says something (the README: duplicates are bounded by
# the requests in flight).
MAX_IN_FLIGHT = 32
DAEMON_ENV = {**FAST_LEASE, "DISPATCHER_DELIVERY_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT)}
ENVIRONMENT = "env-1"
FIRST, SECOND = 600, 200
# How long no primary answers before the test promotes the standby: a few listener
# reconnects and safety polls, and shorter than a lease (FAST_LEASE: 6 s), as a cluster
# manager's failover of a few seconds would be.
OUTAGE = 3.0
# What "promptly" means for an API answer while the database is away.
PROMPT = 2.0


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    """A primary and a synchronous standby of this test's own (tests/pgcluster.py)."""
    cluster = await asyncio.to_thread(Pair.create)
    try:
        await wait_sync(cluster)
        yield cluster
    finally:
        await asyncio.to_thread(cluster.close)


async def api(
    session: aiohttp.ClientSession, method: str, url: str, token: str, body: Any = None
) -> tuple[int, Any, float]:
    """One API call: its status, its JSON body and how long it took to answer."""
    began = time.monotonic()
    async with session.request(
        method,
        url,
        headers={"Authorization": f"Bearer {token}"},
        data=None if body is None else orjson.dumps(body),
        timeout=aiohttp.ClientTimeout(total=10),
    ) as r:
        payload = await r.json(content_type=None)
        return r.status, payload, time.monotonic() - began


def assert_unavailable(answer: tuple[int, Any, float], what: str) -> None:
    status, payload, took = answer
    assert status == 503, f"{what}: {status} {payload}"
    error = payload["error"]
    assert error["code"] == "unavailable", f"{what}: {payload}"
    assert isinstance(error["message"], str), f"{what}: {payload}"
    assert error["message"], f"{what}: {payload}"
    assert took < PROMPT, f"{what} took {took:.2f}s to answer"


class ReadyzWatch:
    """Polls /readyz every 100 ms in the background and keeps every answer."""

    def __init__(self, proc: DaemonProcess) -> None:
        self.url = f"http://127.0.0.1:{proc.port}/readyz"
        self.seen: list[tuple[float, int | None]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        for _ in range(3000):  # bounded: 5 minutes at most, far beyond the test's timeout
            self.seen.append((time.time(), await http_status(self.url)))
            await asyncio.sleep(0.1)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def log_lines(proc: DaemonProcess, since: float, until: float) -> Counter[str]:
    """How many lines of each event (with its level) the daemon logged in the window; a line
    that is not JSON (a library's own logging) has no time and is counted whatever its time."""
    counts: Counter[str] = Counter()
    for line in proc.output().splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            counts[f"plain {line[:48]}"] += 1
            continue
        at = datetime.fromisoformat(entry["timestamp"]).timestamp()
        if since <= at <= until:
            counts[f"{entry.get('level')} {entry.get('event')}"] += 1
    return counts


@pytest.mark.timeout(120)
async def test_failover_to_the_synchronous_standby_loses_nothing(
    pair: Pair, receiver: Receiver, tmp_path: Path
) -> None:
    admin = await asyncpg.connect(pair.primary.dsn())
    try:
        await admin.execute("CREATE DATABASE dispatcher")
    finally:
        await admin.close()
    url = pair.url("dispatcher")
    await apply_migrations(url)
    db = await asyncpg.connect(url)
    try:
        await subscribe(db, receiver.url(), environment=ENVIRONMENT, settings=RETRY_FAST)
        token = await tokens.create(db, ENVIRONMENT)
    finally:
        await db.close()
    # Slow enough that requests are in flight when the primary dies.
    receiver.plan("/hook", then=slow_ok(0.03))

    with DaemonProcess(url, DAEMON_ENV) as proc:
        proc.start(tmp_path)
        await proc.wait_ready()
        base = f"http://127.0.0.1:{proc.port}"
        watch = ReadyzWatch(proc)
        watch.start()
        try:
            async with aiohttp.ClientSession() as session:
                db = await asyncpg.connect(url)
                try:
                    await publish(db, {"batch": "first"}, environment=ENVIRONMENT, count=FIRST)
                    await receiver.wait_for(60, timeout=20)
                finally:
                    await db.close()

                killed_at = time.time()
                await asyncio.to_thread(pair.primary.kill)
                assert pair.primary.pid() is None
                sent_before = len(receiver.requests)
                assert sent_before < FIRST, "the primary should die in the middle of the work"

                # No primary anywhere: the old one refuses connections, the standby is read
                # only. The API says so at once, as JSON.
                event = {"event_name": "products.create.v0", "payload": {"batch": "refused"}}
                assert_unavailable(
                    await api(session, "POST", f"{base}/v1/events", token, event), "publish"
                )
                assert_unavailable(
                    await api(session, "GET", f"{base}/v1/subscriptions", token), "list"
                )

                async def not_ready() -> bool:
                    return await http_status(f"{base}/readyz") == 503

                await poll_until(not_ready, timeout=10)
                await asyncio.sleep(max(0.0, killed_at + OUTAGE - time.time()))
                assert alive(proc), proc.output()
                assert await http_status(f"{base}/readyz") == 503

                # The cluster manager's part: promote, and stop waiting for a standby that
                # is gone (else every commit on the new primary would wait forever).
                await asyncio.to_thread(pair.standby.promote)
                promoted = await asyncpg.connect(pair.standby.dsn())
                try:
                    await promoted.execute("ALTER SYSTEM SET synchronous_standby_names = ''")
                    await promoted.execute("SELECT pg_reload_conf()")
                finally:
                    await promoted.close()
                promoted_at = time.time()

                async def ready() -> bool:
                    return await http_status(f"{base}/readyz") == 200

                await poll_until(ready, timeout=30)
                ready_at = time.time()

                event = {"event_name": "products.create.v0", "payload": {"batch": "api", "n": 1}}
                status, payload, _ = await api(session, "POST", f"{base}/v1/events", token, event)
                assert status == 201, payload
                status, payload, _ = await api(session, "GET", f"{base}/v1/subscriptions", token)
                assert status == 200, payload
                assert len(payload["items"]) == 1, payload

            total = FIRST + SECOND + 1
            db = await asyncpg.connect(url)
            try:
                assert await db.fetchval("SELECT inet_server_port()") == pair.standby.port
                await publish(db, {"batch": "second"}, environment=ENVIRONMENT, count=SECOND)
                await wait_done(db, total, timeout=40)
                await assert_all_delivered(db, total)
            finally:
                await db.close()
            assert await http_status(f"{base}/readyz") == 200
            assert alive(proc), proc.output()
        finally:
            await watch.stop()
        output = proc.output()

    assert "Traceback" not in output, output
    assert "dispatcher.task_died" not in output, output
    statuses = [status for _, status in watch.seen]
    assert 503 in statuses, "readyz never said not ready during the outage"
    assert statuses[-1] == 200, statuses[-10:]

    ids = webhook_ids(receiver)
    assert len(ids) == total, "every delivery arrived"
    duplicates = sum(n - 1 for n in ids.values())
    assert duplicates <= MAX_IN_FLIGHT, f"{duplicates} duplicates after one failover"
    seen = {(r.json()["data"]["batch"], r.json()["data"]["n"]) for r in receiver.requests}
    published = (
        {("first", n) for n in range(1, FIRST + 1)}
        | {("second", n) for n in range(1, SECOND + 1)}
        | {("api", 1)}
    )
    assert seen == published

    # What the outage looked like (the numbers a later backoff change compares against).
    outage = log_lines(proc, killed_at, ready_at)
    print(
        f"\nfailover: down {promoted_at - killed_at:.1f}s, ready again "
        f"{ready_at - promoted_at:.2f}s after the promotion; "
        f"sent before the kill {sent_before}, duplicates {duplicates}; "
        f"log lines in {ready_at - killed_at:.1f}s: {dict(outage.most_common())}"
    )


def test_a_failed_pool_reconnect_is_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """asyncpg's pool logs each failed background reconnect with a traceback while the
    database is away (the failover above saw several); logs.configure makes it one line,
    and keeps the traceback of anything that is not the database being away."""
    logs.configure("console", "warning")
    pool_log = logging.getLogger("asyncpg.pool")
    with caplog.at_level(logging.WARNING, logger="asyncpg.pool"):
        for exc in (ConnectionRefusedError(111, "Connection refused"), ValueError("a bug")):
            try:
                raise exc
            except Exception:
                pool_log.warning(
                    "Failed to restore the pool connection floor; retrying", exc_info=True
                )
    away, bug = caplog.records[-2:]
    assert away.exc_info is None
    assert away.getMessage() == (
        "Failed to restore the pool connection floor; retrying: "
        "ConnectionRefusedError: [Errno 111] Connection refused"
    )
    assert bug.exc_info is not None
