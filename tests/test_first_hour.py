"""What tripped a newcomer's first hour with the admin API (issue 11), each pinned."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import asyncpg
import pytest

from dispatcher import tokens
from dispatcher.config import AdminSettings

from .api_client import Client
from .helpers import Receiver, daemon, settings_for, wait_done

ADMIN_TOKEN = "admin-token-for-the-first-hour-0123456789"


@dataclass
class Api:
    admin: Client
    a: Client
    b: Client
    receiver: Receiver
    db: asyncpg.Connection


@pytest.fixture
async def api(database: str, db: asyncpg.Connection, receiver: Receiver) -> AsyncIterator[Api]:
    settings = replace(
        settings_for(database), admin=AdminSettings(listen="127.0.0.1:0", token=ADMIN_TOKEN)
    )
    token_a = await tokens.create(db, "env-a")
    token_b = await tokens.create(db, "env-b")
    async with daemon(settings) as running, aiohttp.ClientSession() as http:
        base = running.admin_url
        yield Api(
            Client(http, base, ADMIN_TOKEN),
            Client(http, base, token_a),
            Client(http, base, token_b),
            receiver,
            db,
        )


async def test_a_tilby_duplicate_is_refused_before_its_subscribed_test(api: Api) -> None:
    fields: dict[str, Any] = {
        "url": api.receiver.url("/tilby"),
        "entity": "sales",
        "event_type": "closed",
        "profile": "tilby",
    }
    first = await api.a.post("/v1/subscriptions", fields, "Subscription")
    assert first.status == 201
    assert len(api.receiver.at("/tilby")) == 1  # its SUBSCRIBED test
    again = await api.a.post("/v1/subscriptions", fields)
    assert again.status == 409
    assert again.body["error"]["code"] == "exists"
    assert len(api.receiver.at("/tilby")) == 1, "the duplicate sent the receiver nothing"
    # Another environment may have the same one.
    other = await api.b.post("/v1/subscriptions", fields, "Subscription")
    assert other.status == 201


async def test_rotate_secret_with_no_body_means_the_defaults(api: Api) -> None:
    created = await api.a.post(
        "/v1/subscriptions", {"url": api.receiver.url(), "events": ["*"]}, "Subscription"
    )
    sid = created.body["id"]
    rotated = await api.a.call("POST", f"/v1/subscriptions/{sid}/rotate-secret")
    assert rotated.status == 200, rotated.body
    assert rotated.body["secret"].startswith("whsec_")
    assert rotated.body["secret"] != created.body["secret"]
    # One day of grace by default.
    expires = await api.db.fetchval(
        "SELECT extract(epoch FROM previous_secret_expires_at - now()) "
        "FROM dispatcher.subscriptions WHERE id = $1",
        sid,
    )
    assert 86_000 < expires <= 86_400
    # A body that is there must still be JSON.
    bad = await api.a.call("POST", f"/v1/subscriptions/{sid}/rotate-secret", raw=b"{oops")
    assert bad.status == 400


async def test_filters_naming_a_subscription_the_caller_cannot_see_answer_404(api: Api) -> None:
    mine = await api.a.post(
        "/v1/subscriptions", {"url": api.receiver.url(), "events": ["*"]}, "Subscription"
    )
    theirs = await api.b.post(
        "/v1/subscriptions", {"url": api.receiver.url(), "events": ["*"]}, "Subscription"
    )
    unknown = "00000000-0000-4000-8000-000000000000"
    for sid in (theirs.body["id"], unknown):
        listed = await api.a.get("/v1/deliveries", subscription_id=sid)
        assert listed.status == 404, listed.body
        assert listed.body["error"]["code"] == "not_found"
        resend = await api.a.post("/v1/deliveries/resend", {"subscription_id": sid})
        assert resend.status == 404, resend.body
    assert (await api.admin.get("/v1/deliveries", subscription_id=unknown)).status == 404
    # The caller's own, and the admin's view of anyone's, still answer.
    own = await api.a.get("/v1/deliveries", "DeliveryPage", subscription_id=mine.body["id"])
    assert own.status == 200
    admin = await api.admin.get("/v1/deliveries", "DeliveryPage", subscription_id=theirs.body["id"])
    assert admin.status == 200
    job = await api.a.post("/v1/deliveries/resend", {"subscription_id": mine.body["id"]})
    assert job.status == 202


async def test_a_manual_resend_is_not_a_retry_in_the_stats(api: Api) -> None:
    created = await api.a.post(
        "/v1/subscriptions",
        {"url": api.receiver.url(), "events": ["*"], "retry": {"delays": [0.05]}},
        "Subscription",
    )
    sid = created.body["id"]
    event = await api.a.post(
        "/v1/events", {"event_name": "products.create.v0", "payload": {"n": 1}}, "Event"
    )
    assert event.status == 201
    await wait_done(api.db, 1)
    delivery = await api.db.fetchval("SELECT id FROM dispatcher.deliveries_done")
    stats = (await api.a.get(f"/v1/subscriptions/{sid}/stats", "Stats")).body
    assert stats["retries_per_delivery"] == 0
    resent = await api.a.post(f"/v1/deliveries/{delivery}/resend", schema="Delivery")
    assert resent.status == 202
    deadline = time.monotonic() + 10
    while await api.db.fetchval("SELECT count(*) FROM dispatcher.attempts") < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await wait_done(api.db, 1)
    stats = (await api.a.get(f"/v1/subscriptions/{sid}/stats", "Stats")).body
    assert stats["attempts"] == 2
    assert stats["retries_per_delivery"] == 0, "a resend is not a retry"
    # A real retry still counts: 500, then 200.
    api.receiver.plan("/hook", 500, then=200)
    await api.a.post("/v1/events", {"event_name": "products.create.v0", "payload": {"n": 2}})
    await wait_done(api.db, 2)
    stats = (await api.a.get(f"/v1/subscriptions/{sid}/stats", "Stats")).body
    assert stats["attempts"] == 4
    assert stats["retries_per_delivery"] == pytest.approx(0.5)


async def test_tilby_objects_inside_events_mean_their_pattern(api: Api) -> None:
    """{"entity", "event_type"} as an item of `events` means `<entity>.<event_type>.*`, as
    the top-level pair does, and mixes with plain names."""
    created = await api.a.post(
        "/v1/subscriptions",
        {"url": api.receiver.url(), "events": [{"entity": "sales", "event_type": "closed"}]},
        "Subscription",
    )
    assert created.status == 201, created.body
    assert created.body["events"] == ["sales.closed.*"]
    mixed = await api.a.post(
        "/v1/subscriptions",
        {
            "url": api.receiver.url(),
            "events": [
                "products.update.v0",
                {"entity": "customers", "event_type": "create"},
                "customers.create.*",
            ],
        },
        "Subscription",
    )
    assert mixed.status == 201, mixed.body
    assert mixed.body["events"] == ["products.update.v0", "customers.create.*"]
    patched = await api.a.patch(
        f"/v1/subscriptions/{mixed.body['id']}",
        {"events": [{"entity": "items", "event_type": "delete"}]},
        "Subscription",
    )
    assert patched.status == 200, patched.body
    assert patched.body["events"] == ["items.delete.*"]
    # An event published under the pattern reaches the subscriber.
    await api.a.post("/v1/events", {"event_name": "sales.closed.v2", "payload": {}}, "Event")
    await wait_done(api.db, 1)
    # A bad object names the field inside it.
    for item, field in (
        ({"entity": "sales"}, "events.event_type"),
        ({"entity": "Sales", "event_type": "closed"}, "events.entity"),
        ({"entity": "sales", "event_type": "closed", "version": 1}, "events.version"),
        (7, "events"),
    ):
        bad = await api.a.post(
            "/v1/subscriptions", {"url": api.receiver.url(), "events": ["*", item]}
        )
        assert bad.status == 422, (item, bad.body)
        assert bad.body["error"]["field"] == field, (item, bad.body)
