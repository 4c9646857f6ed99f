"""The receiver's word: Retry-After sets the next attempt, a 429 pauses its endpoint, retries
are spread (jitter), overload throttles (issue 14)."""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from dispatcher import tokens
from dispatcher.config import AdminSettings
from dispatcher.policy import (
    RETRY_AFTER_MAX,
    DeliveryPolicy,
    Outcome,
    RetryPolicy,
    Verdict,
    decide,
)
from dispatcher.send import parse_retry_after

from .api_client import Client
from .helpers import Receiver, daemon, publish, settings_for, subscribe, wait_done

T0 = 1_800_000_000.0


def answer(status: int, retry_after: float | None = None) -> Outcome:
    return Outcome(T0, T0, 0.01, status=status, retry_after=retry_after)


def with_header(status: int, value: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def reply(_: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Retry-After": value}, text="busy")

    return reply


def test_retry_after_is_seconds_or_an_http_date() -> None:
    assert parse_retry_after("8", T0) == 8.0
    assert parse_retry_after(" 120 ", T0) == 120.0
    date = email.utils.formatdate(T0 + 30, usegmt=True)
    assert parse_retry_after(date, T0) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(T0 - 30, usegmt=True), T0) == 0.0
    for junk in ("soon", "-5", "1.5", ""):
        assert parse_retry_after(junk, T0) is None


def test_retry_after_sets_the_earliest_next_attempt_up_to_the_cap() -> None:
    policy = DeliveryPolicy(retry=RetryPolicy(delays=(1.0,), max_attempts=5))
    honoured = decide(policy, 1, answer(503, 8.0), T0)
    assert (honoured.verdict, honoured.next_at, honoured.retry_after) == (
        Verdict.RETRY,
        T0 + 8.0,
        8.0,
    )
    assert honoured.pause_until is None, "only a 429 pauses the whole endpoint"
    # Never before the schedule either: a shorter Retry-After changes nothing.
    slow = DeliveryPolicy(retry=RetryPolicy(delays=(60.0,), max_attempts=5))
    assert decide(slow, 1, answer(503, 8.0), T0).next_at == T0 + 60.0
    assert decide(slow, 1, answer(503, 8.0), T0).retry_after is None
    capped = decide(policy, 1, answer(429, 10 * RETRY_AFTER_MAX), T0)
    assert capped.next_at == T0 + RETRY_AFTER_MAX
    assert capped.pause_until == T0 + RETRY_AFTER_MAX
    # Other statuses ignore it unless the policy lists them.
    assert decide(policy, 1, answer(500, 8.0), T0).next_at == T0 + 1.0
    listed = DeliveryPolicy(retry=policy.retry, retry_after_on=frozenset({500}))
    assert decide(listed, 1, answer(500, 8.0), T0).next_at == T0 + 8.0
    # Out of attempts: failed, but the endpoint still waits as it asked.
    last = decide(policy, 5, answer(429, 8.0), T0)
    assert (last.verdict, last.pause_until) == (Verdict.FAILED, T0 + 8.0)


def test_exponential_schedules_are_spread_by_twenty_percent_and_lists_stay_exact() -> None:
    exponential = RetryPolicy(initial=10.0, factor=2.0)
    spreads = [i / 100 for i in range(100)]
    for retry in range(4):
        base = 10.0 * 2**retry
        delays = [exponential.delay(retry, s) for s in spreads]
        assert min(delays) == pytest.approx(0.8 * base)
        assert max(delays) == pytest.approx(1.2 * base, rel=0.01)
        assert exponential.delay(retry) == base  # the middle of the band
    explicit = RetryPolicy(delays=(60.0, 120.0))
    assert {explicit.delay(1, s) for s in spreads} == {120.0}
    asked = RetryPolicy(delays=(100.0,), jitter=0.5)
    assert asked.delay(0, 0.0) == 50.0
    assert math.isclose(asked.delay(0, 0.999), 149.9)
    none = RetryPolicy(initial=5.0, factor=2.0, jitter=0.0)
    assert none.delay(3, 0.0) == none.delay(3, 0.99) == 40.0
    # decide places the retry where `spread` says.
    policy = DeliveryPolicy(retry=exponential)
    assert decide(policy, 1, answer(500), T0, 0.0).next_at == pytest.approx(T0 + 8.0)


async def test_a_503_retry_after_in_seconds_is_honoured_end_to_end(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    receiver.plan("/hook", with_header(503, "2"), then=200)
    await subscribe(db, receiver.url(), settings={"retry": {"delays": [0.1]}})
    await publish(db)
    async with daemon(settings_for(database)):
        await wait_done(db, 1, timeout=15)
    first, second = receiver.at("/hook")
    assert second.at - first.at >= 1.95, "not before the Retry-After"
    assert second.at - first.at < 3.5
    history = await db.fetch(
        "SELECT attempt, status_code, retry_after FROM dispatcher.attempts ORDER BY attempt"
    )
    assert [tuple(r) for r in history] == [(1, 503, 2.0), (2, 200, None)]


async def test_a_retry_after_date_is_honoured_end_to_end(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    until = math.ceil(time.time()) + 2  # HTTP dates have whole seconds

    async def reply(request: web.Request) -> web.Response:
        return await with_header(503, email.utils.formatdate(until, usegmt=True))(request)

    receiver.plan("/hook", reply, then=200)
    await subscribe(db, receiver.url(), settings={"retry": {"delays": [0.1]}})
    await publish(db)
    async with daemon(settings_for(database)):
        await wait_done(db, 1, timeout=15)
    second = receiver.at("/hook")[1]
    assert second.at >= until - 0.05, "not before the date"
    assert second.at < until + 1.5
    honoured = await db.fetchval("SELECT retry_after FROM dispatcher.attempts WHERE attempt = 1")
    assert 1.0 <= honoured <= 3.0


async def test_a_429_with_retry_after_pauses_the_whole_endpoint(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    receiver.plan("/hook", with_header(429, "2"), then=200)
    sid = await subscribe(
        db, receiver.url(), settings={"retry": {"delays": [0.1]}, "max_in_flight": 1}
    )
    await publish(db, count=5)
    async with daemon(settings_for(database)):
        await receiver.wait_for(1)
        await wait_done(db, 5, timeout=20)
    requests = receiver.at("/hook")
    assert len(requests) == 6
    # Nothing of the endpoint, not only the refused delivery, went out during the pause.
    assert requests[1].at - requests[0].at >= 1.95, [r.at - requests[0].at for r in requests]
    until = await db.fetchval(
        "SELECT extract(epoch FROM until)::float8 FROM dispatcher.endpoint_pauses "
        "WHERE subscription_id = $1",
        sid,
    )
    assert until == pytest.approx(requests[0].at + 2.0, abs=0.5)


async def test_other_instances_hear_of_a_pause_at_their_next_poll(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    sid = await subscribe(db, receiver.url())
    async with daemon(settings_for(database, poll_interval=0.2)):
        # As another instance would record it.
        paused = await db.fetchval(
            "INSERT INTO dispatcher.endpoint_pauses VALUES ($1, now() + interval '2 seconds') "
            "RETURNING extract(epoch FROM until)::float8",
            sid,
        )
        await asyncio.sleep(0.5)  # two polls
        await publish(db, count=3)
        await wait_done(db, 3, timeout=15)
    assert min(r.at for r in receiver.requests) >= paused - 0.05


async def test_410_gone_deactivates_a_standard_endpoint_with_the_reason_shown(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    receiver.plan("/gone", then=410)
    receiver.plan("/kept", 410, then=200)
    gone = await subscribe(db, receiver.url("/gone"), ["products.*"])
    # deactivate_on stays the way to change it per subscription.
    kept = await subscribe(
        db,
        receiver.url("/kept"),
        ["products.*"],
        settings={"deactivate_on": [], "retry": {"delays": [0.05]}},
    )
    await publish(db, count=3)
    async with daemon(settings_for(database)):
        await wait_done(db, 3 + 3, timeout=15)
    rows = {
        r["id"]: (r["active"], r["deactivated_reason"])
        for r in await db.fetch(
            "SELECT id, active, deactivated_reason FROM dispatcher.subscriptions"
        )
    }
    assert rows[gone] == (False, "receiver answered 410")
    assert rows[kept] == (True, None)
    # The first 410 ended it: what was queued behind waits, paused, for a reactivation.
    assert len(receiver.at("/gone")) <= 3
    assert await db.fetchval(
        "SELECT count(*) FROM dispatcher.deliveries WHERE subscription_id = $1 AND paused", gone
    ) == 3 - len(receiver.at("/gone"))


async def test_the_api_shows_the_honoured_retry_after_and_takes_the_new_settings(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    token = await tokens.create(db, "env-1")
    receiver.plan("/hook", with_header(500, "1"), then=200)
    settings = replace(settings_for(database), admin=AdminSettings(listen="127.0.0.1:0"))
    async with daemon(settings) as running, aiohttp.ClientSession() as http:
        api = Client(http, running.admin_url, token)
        created = await api.post(
            "/v1/subscriptions",
            {
                "url": receiver.url(),
                "events": ["*"],
                "retry": {"initial": 0.05, "factor": 2, "jitter": 0.5},
                "retry_after_on": [500],
            },
            "Subscription",
        )
        assert created.status == 201, created.body
        bad = await api.post(
            "/v1/subscriptions", {"url": receiver.url(), "events": ["*"], "retry": {"jitter": 2}}
        )
        assert bad.status == 422
        assert bad.body["error"]["field"].startswith("retry")
        await api.post("/v1/events", {"event_name": "products.create.v0", "payload": {}})
        await wait_done(db, 1, timeout=10)
        delivery = await db.fetchval("SELECT id FROM dispatcher.deliveries_done")
        detail = (await api.get(f"/v1/deliveries/{delivery}", "DeliveryDetail")).body
    assert [a["retry_after"] for a in detail["attempt_history"]] == [1.0, None]
