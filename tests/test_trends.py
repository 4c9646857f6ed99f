"""The operator page's API: stats series, finding deliveries, why one failed, test
deliveries and the queue now, against a daemon and a real receiver."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import asyncpg
import pytest

from dispatcher import tokens

from .api_client import Client, wait_status
from .helpers import Receiver, daemon, publish, settings_for, subscribe, wait_done


@dataclass
class Env:
    api: Client
    other: Client
    receiver: Receiver
    db: asyncpg.Connection


@pytest.fixture
async def env(database: str, db: asyncpg.Connection, receiver: Receiver) -> AsyncIterator[Env]:
    mine = await tokens.create(db, "shop-1")
    theirs = await tokens.create(db, "shop-2")
    async with daemon(settings_for(database)) as running, aiohttp.ClientSession() as http:
        yield Env(
            Client(http, running.admin_url, mine),
            Client(http, running.admin_url, theirs),
            receiver,
            db,
        )


async def test_stats_series_counts_attempts_by_outcome_per_bucket(env: Env) -> None:
    env.receiver.plan("/hook", 500)
    sub = await subscribe(
        env.db,
        env.receiver.url(),
        environment="shop-1",
        settings={"retry": {"delays": [0], "max_attempts": 2}},
    )
    await publish(env.db, environment="shop-1")  # 500, then 200: retried, delivered
    await wait_done(env.db, 1)
    await publish(env.db, environment="shop-1", count=3)  # delivered
    await wait_done(env.db, 4)

    answer = await env.api.get(f"/v1/subscriptions/{sub}/stats", "Stats", bucket="3600")
    assert answer.status == 200
    stats = answer.body
    assert stats["window_seconds"] == 86_400
    assert stats["bucket_seconds"] == 3600
    series = stats["series"]
    assert len(series) == 24
    starts = [s["start"] for s in series]
    assert starts == sorted(starts)
    assert starts[-1].endswith(":00:00Z")
    assert sum(s["delivered"] for s in series) == 4
    assert sum(s["retried"] for s in series) == 1
    assert sum(s["failed"] for s in series) == 0
    busy = [s for s in series if s["delivered"]]
    assert busy
    assert busy[-1]["p50_response_ms"] is not None
    assert busy[-1]["p95_response_ms"] >= busy[-1]["p50_response_ms"]
    assert stats["attempts"] == 5  # the window's summary is there as before

    week = await env.api.get(
        f"/v1/subscriptions/{sub}/stats", "Stats", window="604800", bucket="21600"
    )
    assert len(week.body["series"]) == 28
    assert sum(s["delivered"] for s in week.body["series"]) == 4

    plain = await env.api.get(f"/v1/subscriptions/{sub}/stats", "Stats")
    assert "series" not in plain.body
    assert "bucket_seconds" not in plain.body


async def test_stats_series_refuses_windows_that_are_not_whole_buckets(env: Env) -> None:
    sub = await subscribe(env.db, env.receiver.url(), environment="shop-1")
    path = f"/v1/subscriptions/{sub}/stats"
    for params, field, words in (
        ({"bucket": "3601"}, "bucket", "must be one of"),
        ({"bucket": "3600", "window": "5400"}, "window", "whole number of buckets"),
        ({"bucket": "60", "window": "86400"}, "bucket", "at most 500 buckets"),
        ({"bucket": "hour"}, "bucket", "integer"),
    ):
        answer = await env.api.get(path, **params)
        assert answer.status == 400, params
        assert answer.body["error"]["field"] == field
        assert words in answer.body["error"]["message"]
    # Without a window, small buckets cover what 500 of them can.
    answer = await env.api.get(path, "Stats", bucket="60")
    assert answer.body["window_seconds"] == 30_000
    assert len(answer.body["series"]) == 500
    assert (await env.other.get(path, bucket="3600")).status == 404


async def test_deliveries_are_found_by_entity_instance_and_status_code(env: Env) -> None:
    env.receiver.plan("/a", 422)
    a = await subscribe(
        env.db,
        env.receiver.url("/a"),
        environment="shop-1",
        settings={"retry": {"max_attempts": 1}},
    )
    await subscribe(env.db, env.receiver.url("/b"), environment="shop-1")
    await env.api.post(
        "/v1/events",
        {"event_name": "products.update.v0", "payload": {"id": 7}, "entity_instance_id": "p-7"},
    )
    await env.api.post(
        "/v1/events",
        {"event_name": "products.update.v0", "payload": {"id": 8}, "entity_instance_id": "p-8"},
    )
    await wait_done(env.db, 4)

    found = await env.api.get("/v1/deliveries", "DeliveryPage", entity_instance_id="p-7")
    # Across the environment's subscriptions, newest first.
    assert [d["entity_instance_id"] for d in found.body["items"]] == ["p-7", "p-7"]
    assert {d["subscription_id"] for d in found.body["items"]} >= {str(a)}
    refused = await env.api.get("/v1/deliveries", "DeliveryPage", status_code="422")
    assert [(d["entity_instance_id"], d["status"]) for d in refused.body["items"]] == [
        ("p-7", "failed")
    ]
    assert (await env.api.get("/v1/deliveries", status_code="99")).status == 400
    assert (await env.api.get("/v1/deliveries", entity_instance_id="")).status == 400
    # Another environment finds nothing of it.
    other = await env.other.get("/v1/deliveries", "DeliveryPage", entity_instance_id="p-7")
    assert other.body["items"] == []


async def test_a_delivery_shows_the_request_headers_with_secrets_masked(env: Env) -> None:
    env.receiver.plan("/hook", 500)
    sub = await subscribe(
        env.db,
        env.receiver.url(),
        environment="shop-1",
        profile="tillhub",
        settings={"retry": {"max_attempts": 1}},
    )
    await env.db.execute(
        "UPDATE dispatcher.subscriptions SET auth = $2::text::jsonb WHERE id = $1",
        sub,
        '{"type": "basic", "username": "shop", "password": "hunter2-hunter2"}',
    )
    await publish(env.db, environment="shop-1")
    await wait_done(env.db, 1)
    delivery_id = await env.db.fetchval("SELECT id FROM dispatcher.deliveries_done")
    detail = (await env.api.get(f"/v1/deliveries/{delivery_id}", "DeliveryDetail")).body
    headers = {h["name"]: h for h in detail["request_headers"]}
    assert headers["Content-Type"]["value"] == "application/json"
    assert headers["Authorization"] == {
        "name": "Authorization",
        "value": "Basic ••••••••",
        "masked": True,
    }
    signature = headers["Tillhub-Signature"]
    assert signature["masked"]
    assert signature["value"].startswith("t=<send time")
    assert "v1=••••••••" in signature["value"]
    # What the receiver got carries the same names.
    sent = env.receiver.at("/hook")[0].headers
    assert {"Authorization", "Tillhub-Signature", "User-Agent"} <= set(sent)
    assert "hunter2" not in str(detail)


async def test_a_test_delivery_reaches_only_its_subscription_and_stays_out_of_stats(
    env: Env,
) -> None:
    sub = await subscribe(env.db, env.receiver.url("/mine"), ["*"], environment="shop-1")
    neighbour = await subscribe(env.db, env.receiver.url("/theirs"), ["*"], environment="shop-1")
    answer = await env.api.post(f"/v1/subscriptions/{sub}/test", schema="Delivery")
    assert answer.status == 202
    queued = answer.body
    assert queued["test"] is True
    assert queued["event_name"] == "products.create.v0"
    assert queued["entity_instance_id"] == "product_789"
    done = await wait_status(env.api, queued["id"], "delivered")
    assert done["test"] is True
    got = env.receiver.at("/mine")
    assert len(got) == 1
    assert got[0].json()["data"]["sku"] == "COFFEE-PREMIUM-001"
    assert "webhook-signature" in got[0].headers
    assert env.receiver.at("/theirs") == []
    assert (
        await env.db.fetchval(
            "SELECT count(*) FROM dispatcher.deliveries_done WHERE subscription_id = $1", neighbour
        )
        == 0
    )

    # Its own event and payload; a tilby-style name makes an example of its entity.
    custom = await env.api.post(
        f"/v1/subscriptions/{sub}/test",
        {"event_name": "orders.paid.v2", "payload": {"order": 3.0}},
        schema="Delivery",
    )
    await wait_status(env.api, custom.body["id"], "delivered")
    assert env.receiver.at("/mine")[1].json()["data"] == {"order": 3.0}

    stats = (await env.api.get(f"/v1/subscriptions/{sub}/stats", "Stats", bucket="3600")).body
    assert stats["attempts"] == 0
    assert stats["deliveries"]["delivered"] == 0
    assert sum(s["delivered"] for s in stats["series"]) == 0

    assert (await env.other.post(f"/v1/subscriptions/{sub}/test")).status == 404
    await env.api.post(f"/v1/subscriptions/{sub}/deactivate")
    refused = await env.api.post(f"/v1/subscriptions/{sub}/test")
    assert refused.status == 409
    assert refused.body["error"]["code"] == "inactive"
    bad = await env.api.post(f"/v1/subscriptions/{sub}/test", {"event_name": "nope"})
    assert bad.status == 422
    assert bad.body["error"]["field"] == "event_name"


async def test_the_queue_now_counts_what_waits_in_the_environment(env: Env) -> None:
    later = await subscribe(env.db, env.receiver.url(), environment="shop-1", active=False)
    await subscribe(env.db, env.receiver.url(), environment="shop-2", active=False)
    for environment in ("shop-1", "shop-1", "shop-2"):
        await env.db.execute(
            "INSERT INTO dispatcher.deliveries (subscription_id, event_id, event_created_at, "
            "environment_id, paused) "
            "SELECT id, gen_random_uuid(), now(), environment_id, true "
            "FROM dispatcher.subscriptions WHERE environment_id = $1",
            environment,
        )
    queue = (await env.api.get("/v1/queue", "Queue")).body
    assert queue["environment_id"] == "shop-1"
    assert queue["depth"] == 2
    assert queue["paused"] == 2
    assert queue["waiting_for_slot"] == 0
    assert queue["oldest_due_age_seconds"] == 0
    # Not paused, due in an hour: a retry that waits for its time.
    await env.db.execute(
        "UPDATE dispatcher.deliveries SET paused = false, due_at = now() + interval '1 hour' "
        "WHERE subscription_id = $1",
        later,
    )
    queue = (await env.api.get("/v1/queue", "Queue")).body
    assert queue["scheduled"] == 2
    assert queue["paused"] == 0
    assert queue["sending"] == 0
    assert (await env.other.get("/v1/queue", "Queue")).body["depth"] == 1
