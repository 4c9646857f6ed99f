"""A subscription's own egress through the API: its proxy, its receiver's CA, its client
certificate (validated on create, the key never shown again, its expiry watched)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import trustme

from dispatcher import tokens
from dispatcher.config import AdminSettings, EgressSettings
from dispatcher.metrics import Metrics
from dispatcher.upkeep import Upkeep

from .api_client import Client
from .helpers import Receiver, TLSReceiver, daemon, settings_for, wait_done
from .test_egress import client_tls, server_context, tinyproxy
from .test_upkeep import Dispatch


@pytest.fixture
async def api(database: str, db: asyncpg.Connection) -> AsyncIterator[Client]:
    token = await tokens.create(db, "env-1")
    settings = replace(settings_for(database), admin=AdminSettings(listen="127.0.0.1:0"))
    async with daemon(settings) as running, aiohttp.ClientSession() as http:
        yield Client(http, running.admin_url, token)


async def publish(api: Client) -> None:
    answer = await api.post("/v1/events", {"event_name": "products.create.v0", "payload": {}})
    assert answer.status == 201, answer.body


async def test_a_subscriptions_client_certificate_reaches_an_mtls_receiver_and_is_never_shown(
    api: Client, db: asyncpg.Connection
) -> None:
    ca, client_ca = trustme.CA(), trustme.CA()
    tls = client_tls(ca, client_ca)
    async with TLSReceiver(server_context(ca, "127.0.0.1", client_ca=client_ca)) as mtls:
        created = await api.post(
            "/v1/subscriptions",
            {"url": mtls.url(), "events": ["*"], "tls": tls, "retry": {"max_attempts": 1}},
            "Subscription",
        )
        assert created.status == 201, created.body
        await publish(api)
        await wait_done(db, 1)
        assert len(mtls.requests) == 1
    shown = created.body["settings"]["tls"]
    assert "client_key" not in shown
    assert "client_cert" not in shown
    assert "trustme" in shown["client_cert_subject"]
    assert shown["client_cert_expires_at"]
    read = await api.get(f"/v1/subscriptions/{created.body['id']}", "Subscription")
    assert read.body["settings"]["tls"] == shown
    assert tls["client_key"] not in str(read.body)
    status = await db.fetchval("SELECT status FROM dispatcher.deliveries_done")
    assert status == "delivered"


async def test_tls_material_that_cannot_be_used_is_refused_naming_the_field(
    api: Client,
) -> None:
    ca, client_ca = trustme.CA(), trustme.CA()
    good = client_tls(ca, client_ca)
    other = client_tls(ca, client_ca)
    expired = client_tls(ca, client_ca, not_after=datetime.now(UTC) - timedelta(days=1))
    for tls, field in (
        ({"ca": "not a certificate"}, "tls.ca"),
        ({**good, "client_key": other["client_key"]}, "tls.client_key"),
        ({"client_cert": good["client_cert"]}, "tls.client_cert"),
        (expired, "tls.client_cert"),
    ):
        answer = await api.post(
            "/v1/subscriptions", {"url": "https://partner.example/h", "events": ["*"], "tls": tls}
        )
        assert answer.status == 422, (field, answer.body)
        assert answer.body["error"]["field"] == field, answer.body
    bad = await api.post(
        "/v1/subscriptions",
        {"url": "https://partner.example/h", "events": ["*"], "proxy": "socks5://p:1080"},
    )
    assert bad.status == 422
    assert bad.body["error"]["field"] == "proxy"


async def test_a_subscription_goes_through_its_own_proxy_or_none(
    database: str, db: asyncpg.Connection, receiver: Receiver, tmp_path: Path
) -> None:
    token = await tokens.create(db, "env-1")
    async with tinyproxy(tmp_path) as daemon_proxy, tinyproxy(tmp_path) as own_proxy:
        settings = replace(
            settings_for(database),
            admin=AdminSettings(listen="127.0.0.1:0"),
            egress=EgressSettings(proxy=daemon_proxy.url()),
        )
        async with daemon(settings) as running, aiohttp.ClientSession() as http:
            api = Client(http, running.admin_url, token)
            for path, proxy in (("/own", own_proxy.url()), ("/direct", "none"), ("/default", None)):
                body: dict[str, Any] = {
                    "url": receiver.url(path),
                    "events": ["*"],
                    "retry": {"max_attempts": 1},
                }
                if proxy is not None:
                    body["proxy"] = proxy
                assert (await api.post("/v1/subscriptions", body)).status == 201
            await publish(api)
            await wait_done(db, 3)
        assert [r.split()[1] for r in own_proxy.requests()] == [receiver.url("/own")]
        assert [r.split()[1] for r in daemon_proxy.requests()] == [receiver.url("/default")]
    assert sorted(r.path for r in receiver.requests) == ["/default", "/direct", "/own"]


async def test_client_certificates_expiring_within_14_days_are_counted(
    database: str, db: asyncpg.Connection
) -> None:
    ca, client_ca = trustme.CA(), trustme.CA()
    now = datetime.now(UTC)
    for days in (3, 60):
        tls = client_tls(ca, client_ca, not_after=now + timedelta(days=days))
        await db.execute(
            "INSERT INTO dispatcher.subscriptions (environment_id, url, events, settings, secret) "
            "VALUES ('env-1', 'https://partner.example/h', '{*}', $1::text::jsonb, 'whsec_x')",
            orjson.dumps({"tls": tls}).decode(),
        )
    metrics = Metrics()
    pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
    try:
        await Upkeep(pool, Dispatch(), metrics, interval=60.0, retention_days=14).maintain()
    finally:
        await pool.close()
    assert metrics.registry.get_sample_value("dispatcher_client_certificates_expiring") == 1
