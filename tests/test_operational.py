"""Operational events: the dispatcher tells a environment's subscribers about its endpoints
and deliveries as ordinary, signed, retried events of the reserved entity `dispatcher`."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import replace
from typing import Any
from uuid import UUID, uuid4

import aiohttp
import asyncpg
import msgspec
import pytest

from dispatcher import tokens
from dispatcher.config import AdminSettings
from dispatcher.models import OPERATIONAL_EVENTS
from dispatcher.policy import Decision, Outcome, Verdict
from dispatcher.record import Result

from .api_client import Client
from .helpers import (
    SECRET,
    Receiver,
    daemon,
    poll_until,
    publish,
    recorder_for,
    settings_for,
    subscribe,
    verify_standard,
    wait_done,
)

FAST = {"retry": {"delays": [0.05]}}


def ops(receiver: Receiver, path: str = "/ops") -> list[tuple[str, dict[str, Any]]]:
    """The operational events a watcher received: (event name, payload), each checked
    against its documented schema and its signature."""
    out = []
    for r in receiver.at(path):
        assert verify_standard(SECRET, r.headers, r.body)
        body = r.json()
        msgspec.convert(body["data"], OPERATIONAL_EVENTS[body["type"]])
        out.append((body["type"], body["data"]))
    return out


async def watch(db: asyncpg.Connection, receiver: Receiver, **kwargs: Any) -> UUID:
    return await subscribe(db, receiver.url("/ops"), ["dispatcher.*"], **kwargs)


async def wait_ops(receiver: Receiver, name: str, count: int = 1, timeout: float = 15.0) -> None:
    async def enough() -> bool:
        return sum(1 for n, _ in ops(receiver) if n == name) >= count

    await poll_until(enough, timeout)


async def test_a_410_publishes_endpoint_disabled_with_the_reason(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    await watch(db, receiver)
    receiver.plan("/gone", then=410)
    gone = await subscribe(db, receiver.url("/gone"))
    await publish(db)
    async with daemon(settings_for(database)):
        await wait_ops(receiver, "dispatcher.endpoint_disabled.v1")
    disabled = [d for n, d in ops(receiver) if n == "dispatcher.endpoint_disabled.v1"]
    assert disabled == [
        {
            "subscription_id": str(gone),
            "url": receiver.url("/gone"),
            "reason": "receiver answered 410",
        }
    ]


async def test_deactivating_by_api_or_sql_and_reactivating_publish_disabled_and_enabled(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    token = await tokens.create(db, "env-1")
    await watch(db, receiver)
    target = await subscribe(db, receiver.url("/hook"))
    other_env = await subscribe(db, receiver.url("/elsewhere"), environment="env-2")
    settings = replace(settings_for(database), admin=AdminSettings(listen="127.0.0.1:0"))
    async with daemon(settings) as running, aiohttp.ClientSession() as http:
        api = Client(http, running.admin_url, token)
        assert (await api.post(f"/v1/subscriptions/{target}/deactivate")).status == 200
        await wait_ops(receiver, "dispatcher.endpoint_disabled.v1")
        assert (await api.post(f"/v1/subscriptions/{target}/activate")).status == 200
        await wait_ops(receiver, "dispatcher.endpoint_enabled.v1")
        await db.execute(
            "UPDATE dispatcher.subscriptions SET active = false, "
            "deactivated_reason = 'maintenance' WHERE id = $1",
            target,
        )
        await wait_ops(receiver, "dispatcher.endpoint_disabled.v1", 2)
        await db.execute(
            "UPDATE dispatcher.subscriptions SET active = false WHERE id = $1", other_env
        )
        # PATCH active: true reactivates too.
        assert (await api.patch(f"/v1/subscriptions/{target}", {"active": True})).status == 200
        await wait_ops(receiver, "dispatcher.endpoint_enabled.v1", 2)
        await wait_done(db, 4)
    url = receiver.url("/hook")
    assert ops(receiver) == [
        (
            "dispatcher.endpoint_disabled.v1",
            {"subscription_id": str(target), "url": url, "reason": "deactivated by API"},
        ),
        ("dispatcher.endpoint_enabled.v1", {"subscription_id": str(target), "url": url}),
        (
            "dispatcher.endpoint_disabled.v1",
            {"subscription_id": str(target), "url": url, "reason": "maintenance"},
        ),
        ("dispatcher.endpoint_enabled.v1", {"subscription_id": str(target), "url": url}),
    ], "env-2's subscription is none of env-1's business"


async def test_the_unsubscribe_phrase_publishes_endpoint_disabled_for_the_deleted_one(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    await watch(db, receiver)

    from aiohttp import web

    async def unsubscribe(_: web.Request) -> web.Response:
        return web.Response(status=200, text="Please unsubscribe me")

    receiver.plan("/shop", unsubscribe)
    shop = await subscribe(db, receiver.url("/shop"), profile="store")
    await publish(db)
    async with daemon(settings_for(database)):
        await wait_ops(receiver, "dispatcher.endpoint_disabled.v1")
    assert ops(receiver) == [
        (
            "dispatcher.endpoint_disabled.v1",
            {
                "subscription_id": str(shop),
                "url": receiver.url("/shop"),
                "reason": "deleted: the receiver asked to unsubscribe",
            },
        )
    ]


async def test_a_delivery_that_gives_up_publishes_delivery_exhausted(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    await watch(db, receiver)
    receiver.plan("/hook", then=500)
    sid = await subscribe(
        db, receiver.url("/hook"), settings={"retry": {"delays": [0.05], "max_attempts": 2}}
    )
    await publish(db)
    async with daemon(settings_for(database)):
        await wait_ops(receiver, "dispatcher.delivery_exhausted.v1")
    delivery = await db.fetchval(
        "SELECT id FROM dispatcher.deliveries_done WHERE subscription_id = $1", sid
    )
    exhausted = [d for n, d in ops(receiver) if n == "dispatcher.delivery_exhausted.v1"]
    assert exhausted == [
        {
            "delivery_id": delivery,
            "subscription_id": str(sid),
            "url": receiver.url("/hook"),
            "event_name": "products.create.v0",
            "outcome": "failed",
            "attempts": 2,
            "last_status": 500,
            "last_error": None,
        }
    ]


async def test_ordered_deliveries_that_give_up_each_publish_delivery_exhausted(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    """An ordered head that gives up is recorded (and its successor released) by
    dispatcher.record_ending_heads; its delivery_exhausted comes from the transaction's
    second statement, which finds it in deliveries_done (queries.RECORD_FAILURES, $23)."""
    await watch(db, receiver)
    receiver.plan("/hook", then=500)
    sid = await subscribe(
        db,
        receiver.url("/hook"),
        settings={"ordering": "subscription", "retry": {"delays": [0.05], "max_attempts": 1}},
    )
    await publish(db, count=3)
    async with daemon(settings_for(database)):
        await wait_ops(receiver, "dispatcher.delivery_exhausted.v1", count=3)
    finished = await db.fetch(
        "SELECT id FROM dispatcher.deliveries_done WHERE subscription_id = $1 ORDER BY id", sid
    )
    exhausted = [d for n, d in ops(receiver) if n == "dispatcher.delivery_exhausted.v1"]
    assert sorted(d["delivery_id"] for d in exhausted) == [r["id"] for r in finished]
    assert len(finished) == 3


async def test_failing_is_published_once_per_streak_at_the_threshold_and_recovered_after(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    await watch(db, receiver)
    # Two streaks: four failures, a success, three failures, a success.
    receiver.plan("/hook", 500, 500, 500, 500, 200, 500, 500, 500, then=200)
    sid = await subscribe(
        db,
        receiver.url("/hook"),
        settings={"retry": {"delays": [0.05], "max_attempts": 10}, "failing_threshold": 3},
    )
    async with daemon(settings_for(database)):
        await publish(db)
        await wait_done(db, 1, timeout=15)
        await publish(db)
        await wait_ops(receiver, "dispatcher.delivery_recovered.v1", 2)
        await asyncio.sleep(0.3)
    url = receiver.url("/hook")
    failing = {"subscription_id": str(sid), "url": url, "consecutive_failures": 3, "threshold": 3}
    recovered = {"subscription_id": str(sid), "url": url}
    assert ops(receiver) == [
        ("dispatcher.delivery_failing.v1", failing),
        ("dispatcher.delivery_recovered.v1", recovered),
        ("dispatcher.delivery_failing.v1", failing),
        ("dispatcher.delivery_recovered.v1", recovered),
    ]
    assert await db.fetchval("SELECT failures FROM dispatcher.failure_streaks") == 0


async def test_a_watcher_that_always_fails_causes_no_storm_of_events_about_itself(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    receiver.plan("/ops", then=500)
    receiver.plan("/hook", then=500)
    # The watcher fails on every operational event, with a threshold it would cross at once.
    await watch(
        db,
        receiver,
        settings={"retry": {"delays": [0.02], "max_attempts": 3}, "failing_threshold": 1},
    )
    await subscribe(
        db, receiver.url("/hook"), settings={"retry": {"delays": [0.02], "max_attempts": 2}}
    )
    # A catch-all subscriber is not sent operational events at all.
    await subscribe(db, receiver.url("/all"), ["*"])
    await publish(db, count=3)
    async with daemon(settings_for(database, poll_interval=0.2)):
        await asyncio.sleep(4)
    names = [
        r["event_name"]
        for r in await db.fetch(
            "SELECT event_name FROM dispatcher.events WHERE event_name LIKE 'dispatcher.%'"
        )
    ]
    # About /hook only: one failing (threshold 5 by default: not reached by 2 attempts x 3?
    # 6 consecutive failures: reached once) and three exhausted. Nothing about /ops.
    assert sorted(names) == sorted(
        ["dispatcher.delivery_failing.v1"] + ["dispatcher.delivery_exhausted.v1"] * 3
    )
    assert len(receiver.at("/ops")) == 4 * 3, "each tried its 3 attempts and gave up quietly"
    assert len(receiver.at("/all")) == 3


async def test_the_dispatcher_entity_is_refused_on_every_publish_path(
    database: str, db: asyncpg.Connection
) -> None:
    token = await tokens.create(db, "env-1")
    settings = replace(settings_for(database), admin=AdminSettings(listen="127.0.0.1:0"))
    async with daemon(settings) as running, aiohttp.ClientSession() as http:
        api = Client(http, running.admin_url, token)
        for path, body in (
            ("/v1/events", {"event_name": "dispatcher.endpoint_disabled.v1", "payload": {}}),
            ("/v1/events/import", {"event_name": "dispatcher.x.v1", "entities": [{}]}),
        ):
            refused = await api.post(path, body)
            assert refused.status == 422, refused.body
            assert refused.body["error"]["field"] == "event_name"
            assert "reserved" in refused.body["error"]["message"]
    for sql in (
        "SELECT dispatcher.publish('env-1', 'dispatcher.endpoint_disabled.v1', '{}')",
        "SELECT dispatcher.publish_import('env-1', 'dispatcher.x.v1', '[{}]')",
        "INSERT INTO dispatcher.events (environment_id, event_name, payload) "
        "VALUES ('env-1', 'products.create.v0', '{}'), ('env-1', 'dispatcher.x.v1', '{}')",
    ):
        with pytest.raises(
            asyncpg.InvalidParameterValueError, match='entity "dispatcher" is reserved'
        ):
            await db.execute(sql)
    # Not even by setting the flag and leaving it on: publish_internal restores it.
    async with db.transaction():
        await db.execute(
            "SELECT dispatcher.publish_internal(ARRAY['env-1'], ARRAY['dispatcher.x.v1'], "
            "ARRAY['{}'::jsonb])"
        )
        with pytest.raises(asyncpg.InvalidParameterValueError):
            await db.execute(
                "INSERT INTO dispatcher.events (environment_id, event_name, payload) "
                "VALUES ('env-1', 'dispatcher.x.v1', '{}')"
            )
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher",
        "publish",
        "dispatcher.x.v1",
        "--environment",
        "env-1",
        "--payload",
        "{}",
        env={**os.environ, "DISPATCHER_DATABASE_URL": database, "DISPATCHER_CONFIG": os.devnull},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await cli.communicate()
    assert cli.returncode != 0
    assert b'entity "dispatcher" is reserved' in err, (out, err)
    assert (
        await db.fetchval(
            "SELECT count(*) FROM dispatcher.events WHERE event_name LIKE 'dispatcher.%'"
        )
        == 0
    )


def test_streaks_write_only_batches_with_failures_or_known_streaks() -> None:
    from dispatcher.operational import Streaks
    from dispatcher.policy import Decision, Outcome, Verdict
    from dispatcher.record import Result

    a, b = UUID(int=1), UUID(int=2)

    def result(sid: UUID, verdict: Verdict, event: str = "products.create.v0") -> Result:
        return Result(
            1, sid, 1, Outcome(0, 0, 0), Decision(verdict), event_name=event, failing_threshold=5
        )

    streaks = Streaks()
    assert streaks.changes([result(a, Verdict.DELIVERED)]) is None, "the common batch"
    assert streaks.changes([result(a, Verdict.RETRY, "dispatcher.delivery_failing.v1")]) is None
    failed = streaks.changes(
        [result(a, Verdict.RETRY), result(a, Verdict.FAILED), result(b, Verdict.DELIVERED)]
    )
    assert failed is not None
    assert (failed.subscription_ids, failed.failures, failed.succeeded) == ([a], [2], [False])
    streaks.settle(failed)
    ended = streaks.changes([result(a, Verdict.RETRY), result(a, Verdict.DELIVERED)])
    assert ended is not None
    assert (ended.failures, ended.succeeded) == ([0], [True])
    streaks.settle(ended)
    assert streaks.changes([result(a, Verdict.DELIVERED)]) is None
    # Another instance's streak, learnt at a poll, is ended by a success here.
    streaks.refresh(streaks.snapshot(), [b])
    assert streaks.changes([result(b, Verdict.DELIVERED)]) is not None


async def test_a_delivery_another_instance_took_over_is_announced_there_only(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    """An instance whose lease ran out (another took the delivery over) records its attempt
    but does not finish the delivery: it publishes no delivery_exhausted for it."""
    sid = await subscribe(db, receiver.url("/hook"))
    await publish(db)
    delivery = await db.fetchval("SELECT id FROM dispatcher.deliveries")
    mine, theirs = uuid4(), uuid4()
    pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
    try:
        recorder = recorder_for(pool, mine)
        gave_up = Result(
            delivery,
            sid,
            3,
            Outcome(0.0, 0.0, 0.0, status=500),
            Decision(Verdict.FAILED),
            event_name="products.create.v0",
        )

        async def exhausted() -> int:
            count: int = await db.fetchval(
                "SELECT count(*) FROM dispatcher.events "
                "WHERE event_name = 'dispatcher.delivery_exhausted.v1'"
            )
            return count

        for owner, announced in ((theirs, 0), (mine, 1)):
            await db.execute(
                "UPDATE dispatcher.deliveries SET lease_owner = $2 WHERE id = $1", delivery, owner
            )
            recorder.add(gave_up)
            await recorder.flush()
            assert await exhausted() == announced, owner
        assert await db.fetchval("SELECT count(*) FROM dispatcher.deliveries") == 0
        assert await db.fetchval("SELECT count(*) FROM dispatcher.attempts") == 2
    finally:
        await pool.close()
