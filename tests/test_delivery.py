"""End to end in one process: an inserted event becomes a delivered, retried, recorded POST."""

from __future__ import annotations

import asyncio
import gc
import itertools
from dataclasses import replace
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from dispatcher import worker
from dispatcher.config import SecuritySettings

from .helpers import (
    HANG,
    SECRET,
    Receiver,
    attempts_of,
    daemon,
    poll_until,
    publish,
    settings_for,
    subscribe,
    verify_standard,
    wait_done,
)


async def test_delivers_a_signed_standard_webhook_and_records_it(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    sid = await subscribe(db, receiver.url())
    async with daemon(settings_for(database)):
        [event_id] = await publish(db, {"sku": "A-1", "price": 12.5})
        await receiver.wait_for(1)
        await wait_done(db, 1)

    [request] = receiver.requests
    assert request.headers["Content-Type"] == "application/json"
    assert verify_standard(SECRET, request.headers, request.body)
    body = request.json()
    assert body["type"] == "products.create.v0"
    assert body["data"] == {"sku": "A-1", "price": 12.5, "n": 1}
    assert body["timestamp"].endswith("Z")
    done = await db.fetchrow("SELECT * FROM dispatcher.deliveries_done")
    assert (done["subscription_id"], done["event_id"]) == (sid, event_id)
    assert (done["status"], done["attempts"], done["last_status"]) == ("delivered", 1, 200)
    assert await db.fetchval("SELECT count(*) FROM dispatcher.deliveries") == 0
    [attempt] = await attempts_of(db)
    assert (attempt["status_code"], attempt["outcome"], attempt["response_excerpt"]) == (
        200,
        "delivered",
        "ok",
    )


async def test_retries_fire_at_their_due_times(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    delays = [0.3, 0.6, 0.9]
    await subscribe(db, receiver.url(), settings={"retry": {"delays": delays}})
    receiver.plan("/hook", 500, 502, 503, then=200)
    async with daemon(settings_for(database)):
        await publish(db)
        await receiver.wait_for(4, timeout=10)
        await wait_done(db, 1)

    times = [r.at for r in receiver.requests]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for gap, delay in zip(gaps, delays, strict=True):
        assert delay - 0.01 <= gap <= delay + 0.15, (gaps, delays)
    assert [a["outcome"] for a in await attempts_of(db)] == ["retry", "retry", "retry", "delivered"]
    assert [a["status_code"] for a in await attempts_of(db)] == [500, 502, 503, 200]


async def test_gives_up_after_the_last_attempt(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    await subscribe(db, receiver.url(), settings={"retry": {"delays": [0.05], "max_attempts": 3}})
    receiver.plan("/hook", then=500)
    async with daemon(settings_for(database)):
        await publish(db)
        await wait_done(db, 1)
    assert len(receiver.requests) == 3
    assert [a["outcome"] for a in await attempts_of(db)] == ["retry", "retry", "failed"]
    done = await db.fetchrow("SELECT status, attempts, last_status FROM dispatcher.deliveries_done")
    assert tuple(done) == ("failed", 3, 500)


async def test_a_receiver_that_never_answers_times_out(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    await subscribe(db, receiver.url(), settings={"timeout": 0.5, "retry": {"max_attempts": 1}})
    receiver.plan("/hook", then=HANG)
    async with daemon(settings_for(database)):
        await publish(db)
        await wait_done(db, 1)
    [attempt] = await attempts_of(db)
    assert attempt["status_code"] is None
    assert attempt["error"].startswith("timeout")
    assert 450 <= attempt["duration_ms"] <= 1500


async def test_refused_connection_is_classified_and_retried(
    database: str, db: asyncpg.Connection
) -> None:
    await subscribe(
        db, "http://127.0.0.1:9/hook", settings={"retry": {"delays": [0.05], "max_attempts": 2}}
    )
    async with daemon(settings_for(database)):
        await publish(db)
        await wait_done(db, 1)
    attempts = await attempts_of(db)
    assert [a["outcome"] for a in attempts] == ["retry", "failed"]
    assert all(a["error"].startswith("connect") for a in attempts)


async def test_private_destinations_are_refused_at_send_time_unless_allowed(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    await subscribe(db, receiver.url())
    settings = settings_for(database)
    settings = replace(
        settings, security=SecuritySettings(allow_http=True, allow_private_networks=False)
    )
    async with daemon(settings):
        await publish(db)
        await wait_done(db, 1)
    assert receiver.requests == []
    [attempt] = await attempts_of(db)
    assert attempt["outcome"] == "failed"
    assert attempt["error"].startswith("blocked_address")


async def test_a_slow_endpoint_does_not_starve_healthy_ones(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    await subscribe(db, receiver.url("/slow"), ["slow.*"], settings={"timeout": 20})
    await subscribe(db, receiver.url("/fast"), ["fast.*"])
    receiver.plan("/slow", then=HANG)
    settings = settings_for(database, max_in_flight=8, max_per_endpoint=3, claim_batch=8)
    async with daemon(settings) as running:
        await publish(db, event="slow.create.v0", count=30)
        await receiver.wait_for(3, "/slow")
        await publish(db, event="fast.create.v0", count=40)
        await receiver.wait_for(40, "/fast", timeout=5)
        assert len(receiver.at("/slow")) == 3, "the slow endpoint never gets more than its cap"

        async def only_slow_in_flight() -> bool:
            return running.worker.in_flight == 3

        await poll_until(only_slow_in_flight)


async def test_startup_objects_stay_out_of_full_garbage_collections(database: str) -> None:
    assert gc.get_freeze_count() == 0
    before = gc.get_threshold()
    async with daemon(settings_for(database)):
        assert gc.get_freeze_count() > 10_000  # modules, pools, the app
        assert gc.get_threshold()[0] > before[0]  # young objects collected less often
    assert gc.get_freeze_count() == 0  # an embedding process (tests, bench) gets them back
    assert gc.get_threshold() == before


async def test_paused_deliveries_wait_for_reactivation(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    sid = await subscribe(db, receiver.url())
    await db.execute("UPDATE dispatcher.subscriptions SET active = false WHERE id = $1", sid)
    await db.execute("UPDATE dispatcher.subscriptions SET active = true WHERE id = $1", sid)
    await publish(db, count=2)
    await db.execute("UPDATE dispatcher.subscriptions SET active = false WHERE id = $1", sid)
    async with daemon(settings_for(database)) as running:
        await asyncio.sleep(0.3)
        assert receiver.requests == []
        assert running.worker.in_flight == 0
        await db.execute("UPDATE dispatcher.subscriptions SET active = true WHERE id = $1", sid)
        await receiver.wait_for(2)
        await wait_done(db, 2)


async def test_two_daemons_never_send_the_same_delivery_twice(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    await subscribe(db, receiver.url("/a"), ["products.*"])
    await subscribe(db, receiver.url("/b"), ["products.*"])
    settings = settings_for(database, claim_batch=20, max_in_flight=40)
    async with daemon(settings) as one, daemon(settings) as two:
        for _ in range(10):
            await publish(db, count=30)
        await wait_done(db, 600, timeout=30)
        assert one.worker.owner != two.worker.owner
    ids = [r.headers["webhook-id"] for r in receiver.requests]
    assert len(ids) == 600
    assert len(set(ids)) == 600, "a delivery was sent twice"
    per_owner = await db.fetch("SELECT count(*) FROM dispatcher.attempts GROUP BY subscription_id")
    assert sorted(r["count"] for r in per_owner) == [300, 300]


async def test_health_readiness_and_metrics_are_exposed(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    await subscribe(db, receiver.url())
    receiver.plan("/hook", 500)
    await subscribe(db, receiver.url("/other"), settings={"retry": {"delays": [0.05]}})
    async with daemon(settings_for(database)) as running, aiohttp.ClientSession() as http:
        await publish(db)
        await wait_done(db, 1)
        async with http.get(running.admin_url + "/healthz") as r:
            assert r.status == 200
        async with http.get(running.admin_url + "/readyz") as r:
            assert r.status == 200
            body: dict[str, Any] = await r.json()
            assert body["checks"] == {"database": True, "listener": True}
        async with http.get(running.admin_url + "/metrics") as r:
            text = await r.text()
    assert 'dispatcher_attempts_total{status_class="2xx",verdict="delivered"} 1.0' in text
    assert 'dispatcher_deliveries_total{outcome="delivered"} 1.0' in text
    assert 'dispatcher_subscriptions{state="active"} 2.0' in text
    for name in (
        "dispatcher_in_flight",
        "dispatcher_queue_depth",
        "dispatcher_oldest_due_age_seconds",
        "dispatcher_attempt_duration_seconds_bucket",
    ):
        assert name in text


@pytest.mark.parametrize("max_in_flight", [1, 64])
async def test_a_backlog_is_burned_down_with_batched_claims(
    database: str, db: asyncpg.Connection, receiver: Receiver, max_in_flight: int
) -> None:
    await subscribe(db, receiver.url())
    await publish(db, count=300)
    settings = settings_for(database, max_in_flight=max_in_flight, max_per_endpoint=64)
    async with daemon(settings) as running:
        await wait_done(db, 300, timeout=30)
        metrics = running.worker
    assert len(receiver.requests) == 300
    assert metrics.in_flight == 0


async def test_a_notify_that_arrives_during_a_claim_is_not_lost(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    await subscribe(db, receiver.url())
    # With the safety poll a minute away, a lost wake-up shows as a timeout.
    async with daemon(settings_for(database, poll_interval=60.0)):
        for n in range(1, 31):
            # The second commit tends to land while the first one's claim is running.
            await publish(db)
            await publish(db)
            await receiver.wait_for(2 * n, timeout=3)


async def test_an_endpoint_that_times_out_is_throttled_to_few_slots(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    await subscribe(db, receiver.url("/stuck"), ["slow.*"], settings={"timeout": 0.4})
    receiver.plan("/stuck", then=HANG)
    settings = settings_for(database, max_in_flight=32, max_per_endpoint=8)
    async with daemon(settings):
        await publish(db, event="slow.create.v0", count=40)
        # The first wave is the slow start's 4 requests (not the cap of 8), and they time
        # out together; each timeout halves the cap, so what follows goes one at a time.
        await receiver.wait_for(4 + 4, "/stuck", timeout=10)
    arrivals = [r.at for r in receiver.at("/stuck")]
    first_wave = [t for t in arrivals if t - arrivals[0] < 0.2]
    assert len(first_wave) == 4
    later = arrivals[4:8]
    gaps_ = [b - a for a, b in itertools.pairwise(later)]
    assert all(gap >= 0.3 for gap in gaps_), gaps_


async def test_a_delivery_claimed_ahead_of_its_time_is_released_due_at_it_on_stop(
    database: str,
    db: asyncpg.Connection,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Claims take what falls due within the look-ahead (5 s here, 50 ms by default); at a
    stop such a delivery goes back due at its own time, or another instance would send it
    early."""
    monkeypatch.setattr(worker, "_LOOKAHEAD", 5.0)
    await subscribe(db, receiver.url())
    await publish(db)
    due = await db.fetchval(
        "UPDATE dispatcher.deliveries SET due_at = now() + interval '3 seconds' "
        "RETURNING extract(epoch FROM due_at)::float8"
    )

    async def claimed() -> bool:
        owner = await db.fetchval("SELECT lease_owner FROM dispatcher.deliveries")
        return owner is not None

    async with daemon(settings_for(database)):
        await poll_until(claimed, timeout=2.5)
    row = await db.fetchrow(
        "SELECT extract(epoch FROM due_at)::float8 AS due, lease_owner FROM dispatcher.deliveries"
    )
    assert row["lease_owner"] is None
    assert abs(row["due"] - due) < 0.001, (row["due"], due)
    assert receiver.requests == []


async def test_rows_held_back_by_a_share_are_claimed_without_waiting_for_the_poll(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    """A claim gives an idle endpoint a slow start's share (8 of the 40 due): the rest is
    claimed as soon as its requests end, not at the next poll (30 s here)."""
    await subscribe(db, receiver.url("/share"), ["share.*"])
    settings = settings_for(database, max_in_flight=64, max_per_endpoint=64, poll_interval=30.0)
    async with daemon(settings):
        await publish(db, event="share.create.v0", count=40)
        await receiver.wait_for(40, "/share", timeout=5)


async def test_an_idle_endpoint_starts_slow_and_ramps_to_its_full_cap(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    """4 requests at first, one more per answer: a healthy endpoint reaches its cap (16)
    within a few round trips and keeps it while it stays busy."""
    now = peak = 0
    concurrency: list[int] = []

    async def answer_in_30ms(request: web.Request) -> web.Response:
        nonlocal now, peak
        now += 1
        concurrency.append(now)
        await asyncio.sleep(0.03)
        now -= 1
        return web.Response(text="ok")

    await subscribe(db, receiver.url("/ramp"), ["ramp.*"])
    receiver.plan("/ramp", then=answer_in_30ms)
    settings = settings_for(database, max_in_flight=64, max_per_endpoint=16)
    async with daemon(settings):
        await publish(db, event="ramp.create.v0", count=300)
        await receiver.wait_for(300, "/ramp", timeout=20)
    # The receiver answers a wave at once: each wave's peak is the endpoint's cap then.
    peaks = [max(wave) for wave in _waves(concurrency)]
    assert peaks[0] == 4, peaks
    full = peaks.index(16)
    assert full <= 4, peaks
    # Busy, it never starts slow again (the backlog's last wave may be short).
    assert min(peaks[full:-1]) > 4, peaks


def _waves(counts: list[int]) -> list[list[int]]:
    """Split requests-in-progress counts, taken at each arrival, where they fall back."""
    waves: list[list[int]] = [[]]
    for count in counts:
        if waves[-1] and count <= waves[-1][-1]:
            waves.append([])
        waves[-1].append(count)
    return waves


async def test_a_subscription_changed_by_hand_in_sql_is_sent_with_its_new_url_and_secret(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    # The daemon caches a subscription by (id, updated_at); an UPDATE that names no
    # updated_at must still move it (sql/0006), or the old URL and secret would stay in use.
    sid = await subscribe(db, receiver.url("/old"))
    async with daemon(settings_for(database)):
        await publish(db)
        await wait_done(db, 1)
        before = await db.fetchval("SELECT updated_at FROM dispatcher.subscriptions")
        await db.execute(
            "UPDATE dispatcher.subscriptions SET url = $2, secret = $3 WHERE id = $1",
            sid,
            receiver.url("/new"),
            "whsec_" + "bmV3LXNlY3JldC1mb3ItdGhlLXRlc3Q=",
        )
        assert await db.fetchval("SELECT updated_at FROM dispatcher.subscriptions") > before
        await publish(db)
        await wait_done(db, 2)
    [old] = receiver.at("/old")
    [new] = receiver.at("/new")
    assert verify_standard(SECRET, old.headers, old.body)
    assert not verify_standard(SECRET, new.headers, new.body)
    assert verify_standard("whsec_bmV3LXNlY3JldC1mb3ItdGhlLXRlc3Q=", new.headers, new.body)
