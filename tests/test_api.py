"""The admin API over real HTTP against the running daemon and a real database."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
import pytest

from dispatcher import tokens
from dispatcher.config import AdminSettings, SecuritySettings

from .api_client import Client, wait_status
from .helpers import Receiver, daemon, poll_until, settings_for, verify_standard

ADMIN_TOKEN = "admin-token-for-the-tests-0123456789"


@dataclass
class Api:
    admin: Client
    a: Client
    b: Client
    anonymous: Client
    receiver: Receiver
    db: asyncpg.Connection


@pytest.fixture
async def api(database: str, db: asyncpg.Connection, receiver: Receiver) -> AsyncIterator[Api]:
    settings = settings_for(database)
    settings = replace(settings, admin=AdminSettings(listen="127.0.0.1:0", token=ADMIN_TOKEN))
    token_a = await tokens.create(db, "env-a")
    token_b = await tokens.create(db, "env-b")
    async with daemon(settings) as running, aiohttp.ClientSession() as http:
        base = running.admin_url
        yield Api(
            Client(http, base, ADMIN_TOKEN),
            Client(http, base, token_a),
            Client(http, base, token_b),
            Client(http, base, None),
            receiver,
            db,
        )


def hook(api: Api, **extra: Any) -> dict[str, Any]:
    return {"url": api.receiver.url(), "events": ["products.*"], **extra}


async def test_subscription_crud_cycle(api: Api) -> None:
    created = await api.a.post(
        "/v1/subscriptions", hook(api, name="shop sync", retry={"delays": [30, 60]}), "Subscription"
    )
    assert created.status == 201
    sub = created.body
    assert sub["environment_id"] == "env-a"
    assert sub["active"] is True
    assert sub["secret"].startswith("whsec_")
    assert sub["settings"] == {"retry": {"delays": [30, 60]}}
    path = f"/v1/subscriptions/{sub['id']}"

    read = await api.a.get(path, "Subscription")
    assert read.status == 200
    assert "secret" not in read.body
    assert read.body["name"] == "shop sync"

    listed = await api.a.get("/v1/subscriptions", "SubscriptionPage")
    assert [s["id"] for s in listed.body["items"]] == [sub["id"]]

    patched = await api.a.patch(
        path, {"name": "renamed", "events": ["orders.create.v1"], "timeout": 10}, "Subscription"
    )
    assert patched.status == 200
    assert patched.body["name"] == "renamed"
    assert patched.body["events"] == ["orders.create.v1"]
    assert patched.body["settings"] == {"retry": {"delays": [30, 60]}, "timeout": 10}

    off = await api.a.post(f"{path}/deactivate", schema="Subscription")
    assert off.body["active"] is False
    assert off.body["deactivated_reason"]
    on = await api.a.post(f"{path}/activate", schema="Subscription")
    assert on.body["active"] is True
    assert on.body["deactivated_reason"] is None

    assert (await api.a.delete(path)).status == 204
    assert (await api.a.get(path)).status == 404
    assert (await api.a.delete(path)).status == 404


async def test_tilby_style_entity_and_event_type(api: Api) -> None:
    created = await api.a.post(
        "/v1/subscriptions",
        {"url": api.receiver.url(), "entity": "sales", "event_type": "closed", "profile": "tilby"},
        "Subscription",
    )
    assert created.status == 201
    assert created.body["events"] == ["sales.closed.*"]


async def test_tokens_are_required_and_checked(api: Api) -> None:
    missing = await api.anonymous.get("/v1/subscriptions")
    assert missing.status == 401
    assert missing.body["error"]["code"] == "unauthorized"
    wrong = Client(api.a.http, api.a.base, "dsp_not-a-token")
    assert (await wrong.get("/v1/subscriptions")).status == 401
    assert (await api.anonymous.get("/healthz")).status == 200


async def test_the_admin_token_sees_every_environment_and_must_name_one(api: Api) -> None:
    await api.a.post("/v1/subscriptions", hook(api))
    await api.b.post("/v1/subscriptions", hook(api))
    everything = await api.admin.get("/v1/subscriptions", "SubscriptionPage")
    assert {s["environment_id"] for s in everything.body["items"]} == {"env-a", "env-b"}
    unnamed = await api.admin.post("/v1/subscriptions", hook(api))
    assert unnamed.status == 422
    assert unnamed.body["error"]["field"] == "environment_id"
    named = await api.admin.post("/v1/subscriptions", hook(api, environment_id="env-c"))
    assert named.status == 201
    assert named.body["environment_id"] == "env-c"


async def test_tenants_are_isolated_on_every_route(api: Api) -> None:
    for owner, other, path in ((api.a, api.b, "/a"), (api.b, api.a, "/b")):
        sub = await owner.post(
            "/v1/subscriptions", hook(api, url=api.receiver.url(path), retry={"max_attempts": 1})
        )
        sid = sub.body["id"]
        api.receiver.plan(path, 500)
        event = await owner.post(
            "/v1/events", {"event_name": "products.create.v0", "payload": {"n": 1}}
        )
        assert event.body.get("deliveries") == 1, event.body
        [delivery] = (await owner.get("/v1/deliveries", subscription_id=sid)).body["items"]
        await wait_status(owner, delivery["id"], "failed")
        job = (await owner.post("/v1/deliveries/resend", {"subscription_id": sid})).body

        for method, path, body in [
            ("GET", f"/v1/subscriptions/{sid}", None),
            ("PATCH", f"/v1/subscriptions/{sid}", {"name": "stolen"}),
            ("POST", f"/v1/subscriptions/{sid}/activate", {}),
            ("POST", f"/v1/subscriptions/{sid}/deactivate", {}),
            ("GET", f"/v1/subscriptions/{sid}/stats", None),
            ("POST", f"/v1/subscriptions/{sid}/rotate-secret", {}),
            ("GET", f"/v1/deliveries/{delivery['id']}", None),
            ("POST", f"/v1/deliveries/{delivery['id']}/resend", {}),
            ("GET", f"/v1/resend-jobs/{job['id']}", None),
            ("DELETE", f"/v1/subscriptions/{sid}", None),
        ]:
            answer = await other.call(method, path, body)
            assert answer.status == 404, (method, path, answer.body)
        assert sid not in {s["id"] for s in (await other.get("/v1/subscriptions")).body["items"]}
        # A filter naming their subscription is as unknown as the subscription itself.
        theirs = await other.get("/v1/deliveries", subscription_id=sid)
        assert theirs.status == 404, theirs.body
        listed = (await other.get("/v1/deliveries", "DeliveryPage")).body["items"]
        assert sid not in {d["subscription_id"] for d in listed}
        foreign = await other.post("/v1/subscriptions", hook(api, environment_id="env-x"))
        assert foreign.status == 422
        assert (await owner.get(f"/v1/subscriptions/{sid}")).body["name"] is None


async def test_pagination_walks_every_item_once(api: Api) -> None:
    for n in range(7):
        await api.a.post("/v1/subscriptions", hook(api, name=f"s{n}"))
    seen: list[str] = []
    params: dict[str, str] = {"limit": "3"}
    pages = 0
    while True:
        page = await api.a.get("/v1/subscriptions", "SubscriptionPage", **params)
        seen += [s["name"] for s in page.body["items"]]
        pages += 1
        if page.body["next_cursor"] is None:
            break
        params["cursor"] = page.body["next_cursor"]
    assert sorted(seen) == [f"s{n}" for n in range(7)]
    assert pages == 3

    await api.a.post("/v1/events", {"event_name": "products.create.v0", "payload": {}})
    await api.a.post("/v1/events", {"event_name": "products.create.v0", "payload": {}})
    first = await api.a.get("/v1/deliveries", "DeliveryPage", limit="10")
    second = await api.a.get(
        "/v1/deliveries", "DeliveryPage", limit="10", cursor=first.body["next_cursor"]
    )
    ids = [d["id"] for d in first.body["items"] + second.body["items"]]
    assert len(ids) == len(set(ids)) == 14


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"url": "ftp://x.example/hook", "events": ["*"]}, 422, "url"),
        ({"url": "not a url", "events": ["*"]}, 422, "url"),
        ({"events": ["*"]}, 422, "url"),
        ({"url": "http://127.0.0.1:1/h", "events": []}, 422, "events"),
        ({"url": "http://127.0.0.1:1/h", "events": ["Products.*"]}, 422, "events"),
        ({"url": "http://127.0.0.1:1/h", "events": ["products"]}, 422, "events"),
        ({"url": "http://127.0.0.1:1/h", "events": "products.*"}, 422, "events"),
        ({"url": "http://127.0.0.1:1/h", "events": ["*"], "profile": "acme"}, 422, "profile"),
        ({"url": "http://127.0.0.1:1/h", "events": ["*"], "timeout": -1}, 422, "timeout"),
        ({"url": "http://127.0.0.1:1/h", "events": ["*"], "timeout": "5"}, 422, "timeout"),
        (
            {"url": "http://127.0.0.1:1/h", "events": ["*"], "retry": {"delays": "x"}},
            422,
            "retry.delays",
        ),
        (
            {"url": "http://127.0.0.1:1/h", "events": ["*"], "settings": {"success": "3xx"}},
            422,
            "settings.success",
        ),
        ({"url": "http://127.0.0.1:1/h", "events": ["*"], "secret": "short"}, 422, "secret"),
        ({"url": "http://127.0.0.1:1/h", "events": ["*"], "email": "nobody"}, 422, "email"),
        (
            {"url": "http://127.0.0.1:1/h", "events": ["*"], "auth": {"type": "magic"}},
            422,
            "auth.type",
        ),
        (
            {
                "url": "http://127.0.0.1:1/h",
                "events": ["*"],
                "auth": {"type": "basic", "username": "u"},
            },
            422,
            "auth.password",
        ),
        ({"url": "http://127.0.0.1:1/h", "events": ["*"], "name": "x" * 201}, 422, "name"),
        ({"url": "http://127.0.0.1:1/h", "events": ["*"], "active": "yes"}, 422, "active"),
        ({"url": "http://127.0.0.1:1/h", "events": ["*"], "colour": "red"}, 422, "colour"),
        ({"url": "http://127.0.0.1:1/h", "events": ["*"], "ordering": "fifo"}, 422, "ordering"),
        ({"url": "http://127.0.0.1:1/h", "events": ["*"], "ordering": 1}, 422, "ordering"),
        ([1, 2], 400, "body"),
    ],
)
async def test_invalid_subscriptions_name_the_field(
    api: Api, body: Any, status: int, field: str
) -> None:
    answer = await api.a.post("/v1/subscriptions", body)
    assert answer.status == status, answer.body
    assert answer.body["error"]["field"] == field


async def test_malformed_and_oversized_bodies_are_rejected_cleanly(api: Api) -> None:
    bad = await api.a.call("POST", "/v1/subscriptions", raw=b"{not json")
    assert bad.status == 400
    assert bad.body["error"]["field"] == "body"
    huge = await api.a.call("POST", "/v1/events", raw=b'{"payload": "' + b"x" * 2_000_000 + b'"}')
    assert huge.status == 413
    nul = await api.a.post("/v1/events", {"event_name": "a.b.v1", "payload": {"t": "\u0000"}})
    assert nul.status == 422
    assert nul.body["error"]["field"] == "payload"
    odd = await api.a.post(
        "/v1/events", {"event_name": "a.b.v1", "payload": {"t": "\U0001f600\u202e"}}
    )
    assert odd.status == 201
    assert (await api.a.get("/v1/deliveries/abc")).status == 404
    assert (await api.a.get("/v1/subscriptions/not-a-uuid")).status == 404
    assert (await api.a.get("/v1/deliveries", status="lost")).status == 400
    assert (await api.a.get("/v1/deliveries", cursor="!!")).status == 400
    assert (await api.a.get("/v1/subscriptions", limit="0")).status == 400


async def test_private_destinations_are_refused_at_create_time(
    database: str, db: asyncpg.Connection
) -> None:
    settings = replace(
        settings_for(database),
        security=SecuritySettings(),
        admin=AdminSettings(listen="127.0.0.1:0", token=ADMIN_TOKEN),
    )
    token = await tokens.create(db, "env-a")
    async with daemon(settings) as running, aiohttp.ClientSession() as http:
        client = Client(http, running.admin_url, token)
        for url in (
            "http://partner.example/hook",
            "https://127.0.0.1/hook",
            "https://10.1.2.3/hook",
            "https://169.254.169.254/latest",
            "https://[::1]/hook",
            "https://localhost/hook",
        ):
            answer = await client.post("/v1/subscriptions", {"url": url, "events": ["*"]})
            assert answer.status == 422, url
            assert answer.body["error"]["field"] == "url"
        # Numeric shorthands of the same addresses get the dotted form's answer.
        for url, dotted in (
            ("https://127.1/hook", "https://127.0.0.1/hook"),
            ("https://0x7f000001/hook", "https://127.0.0.1/hook"),
            ("https://2130706433/hook", "https://127.0.0.1/hook"),
            ("https://2852039166/latest", "https://169.254.169.254/latest"),
        ):
            short = await client.post("/v1/subscriptions", {"url": url, "events": ["*"]})
            full = await client.post("/v1/subscriptions", {"url": dotted, "events": ["*"]})
            assert short.status == 422, url
            assert short.body == full.body
        ok = await client.post(
            "/v1/subscriptions", {"url": "https://partner.example/h", "events": ["*"]}
        )
        assert ok.status == 201


async def test_publish_over_http_is_idempotent_with_a_key(api: Api) -> None:
    await api.a.post("/v1/subscriptions", hook(api))
    body = {
        "event_name": "products.create.v0",
        "payload": {"id": 1},
        "idempotency_key": "order-77",
        "entity_instance_id": "p-1",
    }
    first = await api.a.post("/v1/events", body, "Event")
    again = await api.a.post("/v1/events", body, "Event")
    assert (first.status, again.status) == (201, 200)
    assert again.body["id"] == first.body["id"]
    assert again.body["duplicate"] is True
    assert first.body["deliveries"] == again.body["deliveries"] == 1
    assert await api.db.fetchval("SELECT count(*) FROM dispatcher.events") == 1
    other = await api.b.post("/v1/events", body, "Event")
    assert other.status == 201
    assert other.body["id"] != first.body["id"]
    bad = await api.a.post("/v1/events", {"event_name": "products", "payload": {}})
    assert bad.status == 422
    assert bad.body["error"]["field"] == "event_name"


async def test_resend_one_adds_an_attempt_and_keeps_the_history(api: Api) -> None:
    sid = (await api.a.post("/v1/subscriptions", hook(api, retry={"max_attempts": 1}))).body["id"]
    api.receiver.plan("/hook", 503)
    await api.a.post("/v1/events", {"event_name": "products.update.v0", "payload": {"p": 9}})
    [item] = (await api.a.get("/v1/deliveries", subscription_id=sid)).body["items"]
    failed = await wait_status(api.a, item["id"], "failed")
    assert [a["status_code"] for a in failed["attempt_history"]] == [503]
    assert failed["payload"] == {"p": 9}

    resent = await api.a.post(f"/v1/deliveries/{item['id']}/resend", schema="Delivery")
    assert resent.status == 202
    delivered = await wait_status(api.a, item["id"], "delivered")
    assert [
        (a["attempt"], a["status_code"], a["outcome"]) for a in delivered["attempt_history"]
    ] == [(1, 503, "failed"), (2, 200, "delivered")]
    assert len(api.receiver.requests) == 2


async def test_bulk_resend_by_filter_reports_progress_until_done(api: Api) -> None:
    mine = (await api.a.post("/v1/subscriptions", hook(api, retry={"max_attempts": 1}))).body
    other = (
        await api.a.post(
            "/v1/subscriptions",
            {
                "url": api.receiver.url("/other"),
                "events": ["orders.*"],
                "retry": {"max_attempts": 1},
            },
        )
    ).body
    api.receiver.plan("/hook", *[500] * 5)
    api.receiver.plan("/other", *[500] * 2)
    for _ in range(5):
        await api.a.post("/v1/events", {"event_name": "products.create.v0", "payload": {}})
    for _ in range(2):
        await api.a.post("/v1/events", {"event_name": "orders.create.v0", "payload": {}})
    await api.receiver.wait_for(7)

    async def failed_count(sid: str) -> int:
        page = await api.a.get("/v1/deliveries", subscription_id=sid, status="failed")
        return len(page.body["items"])

    deadline = time.monotonic() + 10
    while await failed_count(mine["id"]) + await failed_count(other["id"]) < 7:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)

    job = await api.a.post(
        "/v1/deliveries/resend", {"subscription_id": mine["id"], "status": "failed"}, "ResendJob"
    )
    assert job.status == 202
    deadline = time.monotonic() + 10
    while (state := await api.a.get(f"/v1/resend-jobs/{job.body['id']}", "ResendJob")).body[
        "status"
    ] == "running":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert state.body["status"] == "done"
    assert (state.body["matched"], state.body["resent"]) == (5, 5)
    await api.receiver.wait_for(12)
    deadline = time.monotonic() + 10
    while True:
        page = await api.a.get("/v1/deliveries", subscription_id=mine["id"], status="delivered")
        if len(page.body["items"]) == 5:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert await failed_count(other["id"]) == 2
    attempts = await api.db.fetch(
        "SELECT delivery_id, array_agg(outcome ORDER BY attempt) AS outcomes "
        "FROM dispatcher.attempts WHERE subscription_id = $1 GROUP BY delivery_id",
        mine["id"],
    )
    assert [r["outcomes"] for r in attempts] == [["failed", "delivered"]] * 5


async def test_stats_match_the_attempts_recorded(api: Api) -> None:
    sid = (await api.a.post("/v1/subscriptions", hook(api, retry={"delays": [0.05]}))).body["id"]
    api.receiver.plan("/hook", 500, 200, 500, 500, 200, 200)
    for _ in range(4):
        await api.a.post("/v1/events", {"event_name": "products.create.v0", "payload": {}})
    deadline = time.monotonic() + 10
    while await api.db.fetchval("SELECT count(*) FROM dispatcher.deliveries_done") < 4:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    stats = (await api.a.get(f"/v1/subscriptions/{sid}/stats", "Stats")).body
    rows = await api.db.fetch(
        "SELECT delivery_id, duration_ms, outcome FROM dispatcher.attempts "
        "WHERE subscription_id = $1",
        sid,
    )
    durations = sorted(r["duration_ms"] for r in rows)
    succeeded = sum(r["outcome"] == "delivered" for r in rows)
    deliveries = len({r["delivery_id"] for r in rows})
    assert stats["attempts"] == len(rows) >= 6
    assert stats["success_rate"] == pytest.approx(succeeded / len(rows))
    assert stats["error_rate"] == pytest.approx(1 - succeeded / len(rows))
    assert stats["mean_response_ms"] == pytest.approx(statistics.fmean(durations))
    position = 0.95 * (len(durations) - 1)
    low = durations[int(position)]
    high = durations[min(int(position) + 1, len(durations) - 1)]
    p95 = low + (high - low) * (position - int(position))
    assert stats["p95_response_ms"] == pytest.approx(p95)
    assert stats["retries_per_delivery"] == pytest.approx((len(rows) - deliveries) / deliveries)
    assert stats["deliveries"]["delivered"] == 4


async def test_openapi_describes_every_route(api: Api) -> None:
    doc = (await api.anonymous.get("/openapi.json")).body
    assert doc["openapi"].startswith("3.1")
    app_routes = {
        ("POST", "/v1/subscriptions"),
        ("GET", "/v1/subscriptions"),
        ("GET", "/v1/subscriptions/{id}"),
        ("PATCH", "/v1/subscriptions/{id}"),
        ("DELETE", "/v1/subscriptions/{id}"),
        ("POST", "/v1/subscriptions/{id}/activate"),
        ("POST", "/v1/subscriptions/{id}/deactivate"),
        ("GET", "/v1/subscriptions/{id}/stats"),
        ("POST", "/v1/subscriptions/{id}/rotate-secret"),
        ("POST", "/v1/subscriptions/{id}/test"),
        ("GET", "/v1/queue"),
        ("POST", "/v1/events"),
        ("POST", "/v1/events/import"),
        ("GET", "/v1/deliveries"),
        ("POST", "/v1/deliveries/resend"),
        ("GET", "/v1/deliveries/{id}"),
        ("POST", "/v1/deliveries/{id}/resend"),
        ("GET", "/v1/resend-jobs/{id}"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
    }
    documented = {
        (m.upper(), p) for p, ops in doc["paths"].items() for m in ops if m != "parameters"
    }
    assert documented == app_routes


async def test_secret_rotation_signs_with_both_secrets_until_the_old_one_expires(api: Api) -> None:
    created = (await api.a.post("/v1/subscriptions", hook(api))).body
    old = created["secret"]
    rotated = await api.a.post(
        f"/v1/subscriptions/{created['id']}/rotate-secret",
        {"grace_seconds": 3600},
        "RotatedSubscription",
    )
    assert rotated.status == 200
    new = rotated.body["secret"]
    assert new != old
    assert new.startswith("whsec_")
    await api.a.post("/v1/events", {"event_name": "products.create.v0", "payload": {}})
    await api.receiver.wait_for(1)
    [during] = api.receiver.requests
    assert len(during.headers["webhook-signature"].split()) == 2
    assert verify_standard(old, during.headers, during.body)
    assert verify_standard(new, during.headers, during.body)

    await api.db.execute(
        "UPDATE dispatcher.subscriptions SET previous_secret_expires_at = now() - interval '1s'"
    )
    # The daemon caches settings by subscription version; the update above did not bump it.
    await api.a.patch(f"/v1/subscriptions/{created['id']}", {"name": "after expiry"})
    await api.a.post("/v1/events", {"event_name": "products.create.v0", "payload": {}})
    await api.receiver.wait_for(2)
    after = api.receiver.requests[1]
    assert len(after.headers["webhook-signature"].split()) == 1
    assert verify_standard(new, after.headers, after.body)
    assert not verify_standard(old, after.headers, after.body)
    bad = await api.a.post(
        f"/v1/subscriptions/{created['id']}/rotate-secret", {"grace_seconds": -1}
    )
    assert bad.status == 422
    assert bad.body["error"]["field"] == "grace_seconds"


async def test_ordering_is_a_setting_and_the_history_shows_who_a_delivery_waits_behind(
    api: Api,
) -> None:
    # The head fails and retries in an hour: the line behind it stays as published.
    api.receiver.plan("/hook", then=500)
    created = await api.a.post(
        "/v1/subscriptions", hook(api, ordering="entity", retry={"delays": [3600]}), "Subscription"
    )
    assert created.status == 201, created.body
    assert created.body["settings"]["ordering"] == "entity"
    sid = created.body["id"]
    for n in range(3):
        published = await api.a.post(
            "/v1/events",
            {"event_name": "products.update.v0", "entity_instance_id": "p-1", "payload": {"n": n}},
        )
        assert published.status == 201, published.body
    waiting = await api.a.get(
        "/v1/deliveries", "DeliveryPage", subscription_id=sid, status="waiting"
    )
    assert waiting.status == 200
    items = waiting.body["items"]
    assert len(items) == 2
    head = min(item["waiting_behind"] for item in items)
    assert all(item["waiting_behind"] == head for item in items)
    one = await api.a.get(f"/v1/deliveries/{items[0]['id']}", "DeliveryDetail")
    assert (one.body["status"], one.body["waiting_behind"]) == ("waiting", head)
    changed = await api.a.patch(f"/v1/subscriptions/{sid}", {"ordering": "none"}, "Subscription")
    assert changed.body["settings"]["ordering"] == "none"


async def test_an_integral_float_setting_is_stored_as_an_integer_and_claims_go_on(
    api: Api,
) -> None:
    """JSON's 4.0 is the integer 4 (the API reads it so); stored as 4.0, the claim's `::int`
    of max_in_flight refused the row, and with it every claim of every subscription (found
    by the fuzzer)."""
    created = await api.a.post("/v1/subscriptions", hook(api, max_in_flight=4.0), "Subscription")
    assert created.status == 201
    path = f"/v1/subscriptions/{created.body['id']}"
    patched = await api.a.patch(path, {"settings": {"max_in_flight": 6.0}}, "Subscription")
    assert patched.status == 200
    stored = await api.db.fetchval(
        "SELECT settings->>'max_in_flight' FROM dispatcher.subscriptions WHERE id = $1",
        UUID(created.body["id"]),
    )
    assert stored == "6"
    await api.db.execute("SELECT dispatcher.publish('env-a', 'products.create.v1', '{}')")

    async def delivered() -> bool:
        return len(api.receiver.at("/hook")) == 1

    await poll_until(delivered)


async def test_a_connection_the_server_ended_answers_503_not_a_500(api: Api) -> None:
    """A pooled connection whose backend was ended (a failover's old primary going down, an
    administrator's pg_terminate_backend) fails its next query with the server's FATAL
    57P01 (asyncpg's AdminShutdownError), or with asyncpg's InternalClientError when the end
    comes mid-operation, after which that connection went back to the pool broken and every
    later request failed. The API answered those with 500 "internal error" where the client
    should retry. Which of the three a round meets is a race (the pool may also notice the
    closed socket first, and the request succeeds): ten rounds; without the fix each run
    tried ended some of them in a 500."""
    answers = []
    for _ in range(10):
        before = await api.a.get("/v1/subscriptions")
        ended = await api.db.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'dispatcher' AND datname = current_database() "
            "AND pid <> pg_backend_pid()"
        )
        assert ended > 0
        after = await api.a.get("/v1/subscriptions")
        answers += [(a.status, a.body.get("error", {}).get("code")) for a in (before, after)]
    assert set(answers) <= {(200, None), (503, "unavailable")}, answers

    async def answers_again() -> bool:
        return (await api.a.get("/v1/subscriptions")).status == 200

    await poll_until(answers_again, 5.0)
