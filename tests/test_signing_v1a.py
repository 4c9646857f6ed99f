"""Standard Webhooks v1a: Ed25519 signatures a receiver verifies with the public key alone;
the private key never leaves the database (issue 14)."""

from __future__ import annotations

import base64
import time
from dataclasses import replace
from typing import Any

import aiohttp
import asyncpg
import orjson

from dispatcher import tokens
from dispatcher.config import AdminSettings
from dispatcher.signing import SIGNERS, new_signing_key, public_key

from .api_client import Client
from .helpers import (
    Receiver,
    daemon,
    publish,
    settings_for,
    subscribe,
    verify_standard,
    verify_standard_v1a,
    wait_done,
)


def test_a_v1a_signature_verifies_with_the_public_key_only() -> None:
    key, other = new_signing_key(), new_signing_key()
    assert key.startswith("whsk_")
    assert len(base64.b64decode(key[5:])) == 32
    pub = public_key(key)
    assert pub.startswith("whpk_")
    assert len(base64.b64decode(pub[5:])) == 32
    body = b'{"type":"products.create.v0"}'
    headers = SIGNERS["standard_v1a"]([key], "msg_1", body, 1_800_000_000_123)
    assert headers["webhook-timestamp"] == "1800000000"
    assert headers["webhook-signature"].startswith("v1a,")
    assert verify_standard_v1a(pub, headers, body)
    assert not verify_standard_v1a(pub, headers, body + b" ")
    assert not verify_standard_v1a(public_key(other), headers, body)
    # During a rotation both keys sign, space separated.
    both = SIGNERS["standard_v1a"]([other, key], "msg_1", body, 1_800_000_000_123)
    assert len(both["webhook-signature"].split()) == 2
    assert verify_standard_v1a(pub, both, body)
    assert verify_standard_v1a(public_key(other), both, body)


def _no_private_key(answer: Any) -> None:
    assert "whsk_" not in orjson.dumps(answer).decode()


async def test_v1a_subscriptions_sign_with_ed25519_and_rotate_with_a_grace_period(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    token = await tokens.create(db, "env-1")
    settings = replace(settings_for(database), admin=AdminSettings(listen="127.0.0.1:0"))
    async with daemon(settings) as running, aiohttp.ClientSession() as http:
        api = Client(http, running.admin_url, token)
        created = await api.post(
            "/v1/subscriptions",
            {"url": receiver.url(), "events": ["products.*"], "signature": "standard_v1a"},
            "Subscription",
        )
        assert created.status == 201, created.body
        _no_private_key(created.body)
        sid, first = created.body["id"], created.body["public_key"]
        assert first.startswith("whpk_")
        shown = await api.get(f"/v1/subscriptions/{sid}", "Subscription")
        listed = await api.get("/v1/subscriptions", "SubscriptionPage")
        assert shown.body["public_key"] == first == listed.body["items"][0]["public_key"]
        _no_private_key([shown.body, listed.body])

        await publish(db)
        await receiver.wait_for(1)
        request = receiver.requests[0]
        assert request.headers["webhook-signature"].startswith("v1a,")
        assert verify_standard_v1a(first, request.headers, request.body)

        rotated = await api.post(
            f"/v1/subscriptions/{sid}/rotate-secret",
            {"grace_seconds": 3600},
            "RotatedSubscription",
        )
        assert rotated.status == 200, rotated.body
        _no_private_key(rotated.body)
        second = rotated.body["public_key"]
        assert second != first
        assert rotated.body["previous_public_key"] == first
        refused = await api.post(
            f"/v1/subscriptions/{sid}/rotate-secret", {"secret": "whsec_" + "A" * 32}
        )
        assert (refused.status, refused.body["error"]["field"]) == (422, "secret")

        await publish(db)
        await receiver.wait_for(2)
        during = receiver.requests[1]
        assert len(during.headers["webhook-signature"].split()) == 2
        # A receiver still on the old key and one already on the new key both accept it.
        assert verify_standard_v1a(first, during.headers, during.body)
        assert verify_standard_v1a(second, during.headers, during.body)

        # The grace period over, only the new key signs.
        await db.execute(
            "UPDATE dispatcher.subscriptions SET previous_signing_key_expires_at = now()"
        )
        await publish(db)
        await receiver.wait_for(3)
        after = receiver.requests[2]
        assert len(after.headers["webhook-signature"].split()) == 1
        assert verify_standard_v1a(second, after.headers, after.body)
        assert not verify_standard_v1a(first, after.headers, after.body)
        await wait_done(db, 3)
    # The private key is in the database and nowhere in the daemon's answers.
    stored = await db.fetchval("SELECT signing_key FROM dispatcher.subscriptions")
    assert public_key(stored) == second


async def test_switching_to_and_from_v1a_keeps_the_secret_and_the_key_pair(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    token = await tokens.create(db, "env-1")
    settings = replace(settings_for(database), admin=AdminSettings(listen="127.0.0.1:0"))
    async with daemon(settings) as running, aiohttp.ClientSession() as http:
        api = Client(http, running.admin_url, token)
        created = await api.post(
            "/v1/subscriptions", {"url": receiver.url(), "events": ["products.*"]}, "Subscription"
        )
        sid, secret = created.body["id"], created.body["secret"]
        assert "public_key" not in created.body
        to_v1a = await api.patch(
            f"/v1/subscriptions/{sid}", {"signature": "standard_v1a"}, "Subscription"
        )
        key = to_v1a.body["public_key"]
        await publish(db)
        await receiver.wait_for(1)
        assert verify_standard_v1a(key, receiver.requests[0].headers, receiver.requests[0].body)

        back = await api.patch(f"/v1/subscriptions/{sid}", {"signature": "standard"})
        assert back.body["public_key"] == key, "kept for a switch back"
        await publish(db)
        await receiver.wait_for(2)
        assert verify_standard(secret, receiver.requests[1].headers, receiver.requests[1].body)

        again = await api.patch(f"/v1/subscriptions/{sid}", {"signature": "standard_v1a"})
        assert again.body["public_key"] == key, "the receiver's trusted key still works"
        await wait_done(db, 2)


async def test_a_v1a_subscription_made_in_sql_gets_its_key_pair_from_the_daemon(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    sid = await subscribe(db, receiver.url(), settings={"signature": "standard_v1a"})
    await publish(db)
    async with daemon(settings_for(database)):
        await wait_done(db, 1)
    key = await db.fetchval("SELECT signing_key FROM dispatcher.subscriptions WHERE id = $1", sid)
    request = receiver.requests[0]
    assert verify_standard_v1a(public_key(key), request.headers, request.body)
    assert await db.fetchval("SELECT outcome FROM dispatcher.attempts") == "delivered"


def test_signing_cost_stays_small() -> None:
    """Not a benchmark: a guard that v1a stays well under a millisecond a request."""
    key = new_signing_key()
    body = b"x" * 1024
    began = time.perf_counter()
    for i in range(200):
        SIGNERS["standard_v1a"]([key], f"msg_{i}", body, 1_800_000_000_000)
    assert (time.perf_counter() - began) / 200 < 0.001
