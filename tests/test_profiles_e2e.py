"""Each seed product end to end: the real loop, a real receiver that checks the signature
with its own HMAC code and the envelope field by field, failures driven by the receiver,
attempts at the profile's own delays (a clock running RATE times faster than the wall), and
the mails at a real SMTP server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from dispatcher import tokens
from dispatcher.config import AdminSettings
from dispatcher.schedule import Clock

from .api_client import Client
from .helpers import Receiver, daemon, free_port, poll_until, settings_for
from .test_mailer import Sink, smtp_server

ENV = "shop-42"
STATIC_TOKEN = "tilby-static-token-0123456789"


@dataclass
class Shop:
    api: Client
    db: asyncpg.Connection
    receiver: Receiver
    sink: Sink
    rate: float


@contextlib.asynccontextmanager
async def shop(
    database: str,
    db: asyncpg.Connection,
    receiver: Receiver,
    *,
    rate: float,
    offset: float = 0.0,
) -> AsyncIterator[Shop]:
    """A daemon whose clock runs `rate` times faster, mailing to a real SMTP server."""
    sink = Sink()
    port = free_port()
    settings = settings_for(database)
    settings = replace(
        settings,
        admin=AdminSettings(listen="127.0.0.1:0", token="admin-token-profiles-0123456789"),
        email=replace(settings.email, smtp_host="127.0.0.1", smtp_port=port, poll_interval=0.2),
    )
    token = await tokens.create(db, ENV)
    async with (
        smtp_server(sink, port),
        daemon(settings, clock=Clock(rate=rate, offset=offset)) as running,
        aiohttp.ClientSession() as http,
    ):
        yield Shop(Client(http, running.admin_url, token), db, receiver, sink, rate)


def gaps(shop: Shop, path: str) -> list[float]:
    """Seconds between consecutive requests to `path`, in the daemon's (fast) clock."""
    times = [r.at for r in shop.receiver.at(path)]
    return [(b - a) * shop.rate for a, b in itertools.pairwise(times)]


def assert_schedule(observed: list[float], expected: list[float], jitter: float = 0.0) -> None:
    """Gaps as expected, within the schedule's own jitter band (+-`jitter` of each)."""
    assert len(observed) == len(expected), (observed, expected)
    for got, want in zip(observed, expected, strict=True):
        # 30 ms of wall-clock jitter, times the clock's rate, or 15 %, beyond the band.
        assert abs(got - want) <= jitter * want + max(0.15 * want, 12.0), (observed, expected)


async def delivery_of(shop: Shop, subscription_id: str) -> dict[str, Any]:
    page = await shop.api.get("/v1/deliveries", subscription_id=subscription_id)
    [item] = page.body["items"]
    detail = await shop.api.get(f"/v1/deliveries/{item['id']}", "DeliveryDetail")
    body: dict[str, Any] = detail.body
    return body


async def wait_status(shop: Shop, subscription_id: str, status: str, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        page = await shop.api.get("/v1/deliveries", subscription_id=subscription_id)
        if page.body["items"] and all(d["status"] == status for d in page.body["items"]):
            return page.body["items"]
        statuses = [(d["status"], d["attempts"], d["last_error"]) for d in page.body["items"]]
        assert time.monotonic() < deadline, statuses
        await asyncio.sleep(0.05)


def tilby_signature(token: str, body: bytes) -> str:
    return hmac.new(token.encode(), body, hashlib.sha256).hexdigest()


def tillhub_verified(secret: str, headers: Mapping[str, str], body: bytes) -> bool:
    parts = dict(p.split("=", 1) for p in headers["Tillhub-Signature"].split(","))
    if abs(int(parts["t"]) - time.time() * 1000) > 5 * 60 * 1000:
        return False
    mac = hmac.new(secret.encode(), parts["t"].encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest(base64.b64encode(mac.digest()).decode(), parts["v1"])


# -- Tilby ------------------------------------------------------------------------------


async def test_tilby_end_to_end(database: str, db: asyncpg.Connection, receiver: Receiver) -> None:
    async with shop(database, db, receiver, rate=900) as s:
        # The SUBSCRIBED test must get exactly 200, or the create fails.
        receiver.plan("/tilby", 201)
        refused = await s.api.post(
            "/v1/subscriptions",
            {
                "url": receiver.url("/tilby"),
                "entity": "sales",
                "event_type": "closed",
                "profile": "tilby",
                "secret": STATIC_TOKEN,
                "email": "dev@partner.example",
            },
        )
        assert refused.status == 422
        assert refused.body["error"]["field"] == "url"
        assert await db.fetchval("SELECT count(*) FROM dispatcher.subscriptions") == 0

        receiver.plan("/tilby", 200, then=500)
        created = await s.api.post(
            "/v1/subscriptions",
            {
                "url": receiver.url("/tilby"),
                "entity": "sales",
                "event_type": "closed",
                "profile": "tilby",
                "secret": STATIC_TOKEN,
                "email": "dev@partner.example",
            },
            "Subscription",
        )
        assert created.status == 201
        test = receiver.at("/tilby")[1]
        body = test.json()
        assert set(body) == {"type", "entity_name", "time", "environment_id", "client_id"}
        assert (body["type"], body["entity_name"], body["environment_id"]) == (
            "SUBSCRIBED",
            "sales",
            ENV,
        )
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["time"])
        assert body["client_id"]
        assert test.headers["X-Tilby-Signature"] == tilby_signature(STATIC_TOKEN, test.body)

        # One subscription per (environment, entity, event type).
        receiver.plan("/tilby", 200, then=500)
        again = await s.api.post(
            "/v1/subscriptions",
            {
                "url": receiver.url("/tilby"),
                "entity": "sales",
                "event_type": "closed",
                "profile": "tilby",
                "secret": STATIC_TOKEN,
            },
        )
        assert again.status == 409
        assert again.body["error"]["field"] == "events"
        assert len(receiver.at("/tilby")) == 2, "a refused duplicate sends no SUBSCRIBED test"
        receiver.plan("/tilby", then=500)
        sales = {"id": 7, "closed_at": "2022-02-23T15:43:31.714Z", "final_amount": 12.5}
        await s.api.post("/v1/events", {"event_name": "sales.closed.v0", "payload": sales})

        # 1 + 3 retries, 15 minutes apart, then the delivery gives up.
        items = await wait_status(s, created.body["id"], "failed")
        attempts = receiver.at("/tilby")[2:]
        assert len(attempts) == 4
        assert_schedule(gaps(s, "/tilby")[2:], [900, 900, 900])
        for request in attempts:
            assert request.json() == sales  # the entity model itself
            assert request.headers["X-Tilby-Signature"] == tilby_signature(
                STATIC_TOKEN, request.body
            )
        assert items[0]["attempts"] == 4

        # "Notified for each retry error by email with the body of the request", and at the
        # last retry "that the message reached the limit": one mail per failed attempt.
        async def all_mails() -> bool:
            return len(s.sink.mails) >= 4

        await poll_until(all_mails)
        subjects = s.sink.subjects()
        assert (
            subjects.count("Webhook delivery failed: sales.closed.v0 to " + receiver.url("/tilby"))
            == 3
        )
        assert sum(subject.startswith("Webhook delivery gave up") for subject in subjects) == 1
        for mail in s.sink.mails:
            assert mail.rcpt_tos == ["dev@partner.example"]
            text = mail.message.get_body(("plain",))
            assert text is not None
            content = str(text.get_content())
            assert attempts[0].body.decode() in content.replace("\r\n", "\n")
        # The mailer marks a batch sent once the SMTP server has accepted all of it, so the
        # rows follow the sink's count by a moment: wait for them rather than read once.
        sent = "SELECT count(*) FROM dispatcher.emails WHERE sent_at IS NOT NULL"

        async def all_marked_sent() -> bool:
            count: int = await db.fetchval(sent)
            return count >= 4

        await poll_until(all_marked_sent)
        assert await db.fetchval(sent) == 4
        assert len(s.sink.mails) == 4


async def test_tilby_imports_arrive_in_batches_of_80(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    async with shop(database, db, receiver, rate=1) as s:
        for entity, path in (
            ("items", "/items"),
            ("customers", "/customers"),
            ("stock_movements", "/stock"),
        ):
            receiver.plan(path, 200)
            answer = await s.api.post(
                "/v1/subscriptions",
                {
                    "url": receiver.url(path),
                    "entity": entity,
                    "event_type": "imported",
                    "profile": "tilby",
                    "secret": STATIC_TOKEN,
                },
            )
            assert answer.status == 201
        for entity, count in (("items", 170), ("customers", 81), ("stock_movements", 3)):
            answer = await s.api.post(
                "/v1/events/import",
                {
                    "event_name": f"{entity}.imported.v0",
                    "entities": [{"id": n} for n in range(count)],
                },
            )
            assert answer.status == 201
        await receiver.wait_for(1 + 3, "/items")
        await receiver.wait_for(1 + 2, "/customers")
        await receiver.wait_for(1 + 3, "/stock")
    batches = sorted(len(r.json()) for r in receiver.at("/items")[1:])
    assert batches == [10, 80, 80]
    assert sorted(e["id"] for r in receiver.at("/items")[1:] for e in r.json()) == list(range(170))
    assert sorted(len(r.json()) for r in receiver.at("/customers")[1:]) == [1, 80]
    # Stock movements are not batched: one entity a request.
    assert sorted(r.json()["id"] for r in receiver.at("/stock")[1:]) == [0, 1, 2]


# -- Tillhub ----------------------------------------------------------------------------

TRANSACTION = {
    "id": "10b06f38-031d-4e0c-8706-0474c8c5b61c",
    "register_id": "reg_12345",
    "status": "completed",
    "total_amount": 150.75,
    "currency": "EUR",
}


async def test_tillhub_end_to_end(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    async with shop(database, db, receiver, rate=100) as s:
        created = await s.api.post(
            "/v1/subscriptions",
            {
                "url": receiver.url("/th"),
                "events": ["transaction.create.v0"],
                "profile": "tillhub",
                "auth": {"type": "basic", "username": "shop", "password": "hunter2"},
            },
            "Subscription",
        )
        secret = created.body["secret"]
        receiver.plan("/th", 503, 500, 502, then=200)
        event = await s.api.post(
            "/v1/events",
            {
                "event_name": "transaction.create.v0",
                "payload": TRANSACTION,
                "entity_instance_id": TRANSACTION["id"],
            },
        )
        await wait_status(s, created.body["id"], "delivered")

        # 30 s x e^n between attempts.
        # An exponential schedule is spread by +-20 % (jitter).
        assert_schedule(gaps(s, "/th"), [30.0, 81.55, 221.67], jitter=0.2)
        for request in receiver.at("/th"):
            assert request.headers["User-Agent"] == "Tillhub HTTP Connector/2.1.0"
            assert (
                request.headers["Authorization"]
                == "Basic " + base64.b64encode(b"shop:hunter2").decode()
            )
            assert tillhub_verified(secret, request.headers, request.body)
            body = request.json()
            assert body == {
                "webhook_id": created.body["id"],
                "event_id": event.body["id"],
                "event_entity": "transaction",
                "event_type": "create",
                "event_version": 0,
                "entity_instance_id": TRANSACTION["id"],
                "timestamp": body["timestamp"],
                "payload": TRANSACTION,
            }
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["timestamp"])

        # 4xx are not retried by default (the guide contradicts itself; see README).
        gone = await s.api.post(
            "/v1/subscriptions",
            {
                "url": receiver.url("/th-404"),
                "events": ["transaction.create.v0"],
                "profile": "tillhub",
            },
        )
        receiver.plan("/th-404", then=404)
        await s.api.post(
            "/v1/events", {"event_name": "transaction.create.v0", "payload": TRANSACTION}
        )
        await wait_status(s, gone.body["id"], "failed")
        assert len(receiver.at("/th-404")) == 1


async def test_tillhub_high_error_rate_deactivates_and_queued_events_wait(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    async with shop(database, db, receiver, rate=100) as s:
        created = await s.api.post(
            "/v1/subscriptions",
            {
                "url": receiver.url("/flaky"),
                "events": ["transaction.*"],
                "profile": "tillhub",
                "deactivate_on_error_rate": {"threshold": 0.9, "min_attempts": 4, "window": 3600},
                "retry": {"delays": [120], "max_attempts": 50},
            },
        )
        sid = created.body["id"]
        receiver.plan("/flaky", then=500)
        for _ in range(2):
            await s.api.post(
                "/v1/events", {"event_name": "transaction.create.v0", "payload": TRANSACTION}
            )

        async def deactivated() -> bool:
            return not (await s.api.get(f"/v1/subscriptions/{sid}")).body["active"]

        await poll_until(deactivated, timeout=15)
        sub = (await s.api.get(f"/v1/subscriptions/{sid}", "Subscription")).body
        assert sub["deactivated_reason"].startswith("error rate")
        await wait_status(s, sid, "paused")
        paused_at = len(receiver.at("/flaky"))
        receiver.plan("/flaky", then=200)
        await asyncio.sleep(3 * 120 / s.rate)  # three retry periods: nothing may be sent
        assert len(receiver.at("/flaky")) == paused_at
        await s.api.post(f"/v1/subscriptions/{sid}/activate")
        await wait_status(s, sid, "delivered")


async def test_tillhub_deliveries_expire_after_seven_days(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    # The daemon's clock stands 8 days after the event was published.
    async with shop(database, db, receiver, rate=1, offset=8 * 86400) as s:
        created = await s.api.post(
            "/v1/subscriptions",
            {"url": receiver.url("/late"), "events": ["transaction.*"], "profile": "tillhub"},
        )
        receiver.plan("/late", then=500)
        await s.api.post(
            "/v1/events", {"event_name": "transaction.create.v0", "payload": TRANSACTION}
        )
        await wait_status(s, created.body["id"], "expired")
        assert len(receiver.at("/late")) == 1


# -- Tilia ------------------------------------------------------------------------------


async def test_tilia_end_to_end(database: str, db: asyncpg.Connection, receiver: Receiver) -> None:
    async with shop(database, db, receiver, rate=300) as s:
        ok = await s.api.post(
            "/v1/subscriptions",
            {
                "url": receiver.url("/tilia"),
                "events": ["payout.complete.v1"],
                "profile": "tilia",
                "name": "payouts",
            },
            "Subscription",
        )
        # Anything below 400 is success: a 302 (not followed) is delivered.
        receiver.plan("/tilia", 302)
        message = {"payout_id": "po_1", "amount": {"value": 1000, "currency": "USD"}}
        await s.api.post("/v1/events", {"event_name": "payout.complete.v1", "payload": message})
        await wait_status(s, ok.body["id"], "delivered")
        [request] = receiver.at("/tilia")
        body = request.json()
        assert set(body) == {"event_name", "bucket_key", "sent_at", "message"}
        assert (body["event_name"], body["bucket_key"], body["message"]) == (
            "payout.complete.v1",
            ENV,
            message,
        )
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", body["sent_at"])
        sent = datetime.strptime(body["sent_at"][:26], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC)
        assert abs(sent.timestamp() - request.at) < 5

        # 400 and up is retried, with the policy this destination chose (preset "linear":
        # every 5 minutes); the failure address is mailed when it gives up.
        failing = await s.api.post(
            "/v1/subscriptions",
            {
                "url": receiver.url("/tilia-down"),
                "events": ["payout.*"],
                "profile": "tilia",
                "retry": "linear",
                "email": "ops@publisher.example",
            },
        )
        receiver.plan("/tilia-down", then=400)
        await s.api.post("/v1/events", {"event_name": "payout.complete.v1", "payload": message})
        await receiver.wait_for(3, "/tilia-down", timeout=10)
        assert_schedule(gaps(s, "/tilia-down")[:2], [300, 300])
        assert (await s.api.delete(f"/v1/subscriptions/{failing.body['id']}")).status == 204

        capped = await s.api.post(
            "/v1/subscriptions",
            {
                "url": receiver.url("/tilia-capped"),
                "events": ["payout.*"],
                "profile": "tilia",
                "retry": {"delays": [60], "max_attempts": 2},
                "email": "ops@publisher.example",
            },
        )
        receiver.plan("/tilia-capped", then=503)
        await s.api.post("/v1/events", {"event_name": "payout.complete.v1", "payload": message})
        await wait_status(s, capped.body["id"], "failed")

        async def mailed() -> bool:
            return len(s.sink.mails) >= 1

        await poll_until(mailed)
    [mail] = s.sink.mails
    assert str(mail.message["Subject"]).strip().startswith("Webhook delivery gave up")
    assert mail.rcpt_tos == ["ops@publisher.example"]


# -- The store --------------------------------------------------------------------------

ORDER = {
    "id": 1001,
    "status": "paid",
    "payment_status": "completed",
    "fulfilment_status": "not_fulfilled",
    "total": 49.9,
}


async def test_store_end_to_end(database: str, db: asyncpg.Connection, receiver: Receiver) -> None:
    async with shop(database, db, receiver, rate=300) as s:
        created = await s.api.post(
            "/v1/subscriptions",
            {"url": receiver.url("/orders"), "events": ["orders.create.v0"], "profile": "store"},
            "Subscription",
        )
        receiver.plan("/orders", then=500)
        await s.api.post("/v1/events", {"event_name": "orders.create.v0", "payload": ORDER})
        # 6 attempts: at once, then 60, 120, 180, 240, 300 s after the previous one.
        await wait_status(s, created.body["id"], "failed")
        assert len(receiver.at("/orders")) == 6
        assert_schedule(gaps(s, "/orders"), [60, 120, 180, 240, 300])
        assert all(r.json() == ORDER for r in receiver.at("/orders"))

        # Exactly 200: a 204 is a failure and is tried again.
        exact = await s.api.post(
            "/v1/subscriptions",
            {"url": receiver.url("/exact"), "events": ["orders.*"], "profile": "store"},
        )
        receiver.plan("/exact", 204, then=200)
        await s.api.post("/v1/events", {"event_name": "orders.paid.v0", "payload": ORDER})
        await wait_status(s, exact.body["id"], "delivered")
        assert len(receiver.at("/exact")) == 2


async def test_store_retry_waits_from_the_end_of_a_slow_answer(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    """The delay counts from the answer, on the daemon's clock: 0.2 s of a receiver's time
    is 60 s of a clock running 300 times faster, and the retry comes 60 s after that."""
    answered: list[float] = []

    async def slow_500(request: web.Request) -> web.Response:
        await asyncio.sleep(0.2)
        answered.append(time.time())
        return web.Response(status=500)

    async with shop(database, db, receiver, rate=300) as s:
        created = await s.api.post(
            "/v1/subscriptions",
            {"url": receiver.url("/slow"), "events": ["orders.*"], "profile": "store"},
        )
        receiver.plan("/slow", slow_500, then=200)
        await s.api.post("/v1/events", {"event_name": "orders.create.v0", "payload": ORDER})
        await wait_status(s, created.body["id"], "delivered")
    first, second = receiver.at("/slow")
    assert_schedule([(second.at - answered[0]) * s.rate], [60])
    assert (second.at - first.at) * s.rate >= 60 + 0.2 * s.rate * 0.9


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 406, 410, 411])
async def test_store_deactivates_on_its_eight_statuses(
    database: str, db: asyncpg.Connection, receiver: Receiver, status: int
) -> None:
    async with shop(database, db, receiver, rate=300) as s:
        created = await s.api.post(
            "/v1/subscriptions",
            {"url": receiver.url("/gone"), "events": ["orders.*"], "profile": "store"},
        )
        sid = created.body["id"]
        receiver.plan("/gone", then=status)
        await s.api.post("/v1/events", {"event_name": "orders.create.v0", "payload": ORDER})
        await wait_status(s, sid, "failed")
        sub = (await s.api.get(f"/v1/subscriptions/{sid}")).body
        assert sub["active"] is False
        assert sub["deactivated_reason"] == f"receiver answered {status}"
        assert len(receiver.at("/gone")) == 1
        # Later events wait for a reactivation; they are not sent.
        await s.api.post("/v1/events", {"event_name": "orders.create.v0", "payload": ORDER})
        assert len((await s.api.get("/v1/deliveries", subscription_id=sid)).body["items"]) == 1


async def test_store_deletes_a_subscription_that_asks_to_be_unsubscribed(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    async def unsubscribe(request: web.Request) -> web.Response:
        return web.Response(status=200, text="Thanks. Please unsubscribe me!")

    async with shop(database, db, receiver, rate=300) as s:
        created = await s.api.post(
            "/v1/subscriptions",
            {"url": receiver.url("/bye"), "events": ["orders.*"], "profile": "store"},
        )
        sid = created.body["id"]
        receiver.plan("/bye", then=unsubscribe)
        await s.api.post("/v1/events", {"event_name": "orders.create.v0", "payload": ORDER})

        async def deleted() -> bool:
            return (await s.api.get(f"/v1/subscriptions/{sid}")).status == 404

        await poll_until(deleted)
        async with s.api.http.get(s.api.base + "/metrics") as answer:
            metrics = await answer.text()
        assert 'dispatcher_subscriptions_deactivated_total{reason="unsubscribe"} 1.0' in metrics
        # The history stays: the attempt and its delivery are still on record.
        assert (
            await db.fetchval(
                "SELECT count(*) FROM dispatcher.attempts WHERE subscription_id = $1",
                created.body["id"],
            )
            == 1
        )


async def test_store_answer_slower_than_five_seconds_is_a_failure(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5.5)
        return web.Response(text="ok")

    async with shop(database, db, receiver, rate=1) as s:
        created = await s.api.post(
            "/v1/subscriptions",
            {
                "url": receiver.url("/slow"),
                "events": ["orders.*"],
                "profile": "store",
                "retry": {"max_attempts": 1},
            },
        )
        receiver.plan("/slow", then=slow)
        await s.api.post("/v1/events", {"event_name": "orders.create.v0", "payload": ORDER})
        await wait_status(s, created.body["id"], "failed", timeout=20)
        delivery = await delivery_of(s, created.body["id"])
    [attempt] = delivery["attempt_history"]
    assert attempt["error"].startswith("timeout")
    assert 4900 <= attempt["duration_ms"] <= 5600
