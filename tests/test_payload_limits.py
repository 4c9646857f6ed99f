"""Memory bounded whatever the payload (issue 17): PostgreSQL refuses a payload over
[delivery] max_payload_bytes at insert, whichever way it was published (SQL or HTTP, one
rule, one message), and a claim takes payloads up to [delivery] claim_bytes, so the daemon
never holds more of them at once; one larger than the whole budget still goes out, alone.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import replace

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from dispatcher import config, tokens
from dispatcher.config import AdminSettings, ConfigError

from .helpers import Receiver, daemon, settings_for, subscribe, wait_done

LIMIT = 20_000
ADMIN = "admin-token-for-the-payload-tests-0123"


def payload_of(size: int) -> str:
    """A JSON object whose text (as PostgreSQL writes it) is exactly `size` bytes."""
    return orjson.dumps({"x": "y" * (size - len('{"x": ""}'))}).decode()


async def test_a_payload_over_the_limit_is_refused_in_sql_and_over_http(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    settings = settings_for(database, max_payload_bytes=LIMIT)
    settings = replace(settings, admin=AdminSettings(listen="127.0.0.1:0", token=ADMIN))
    await subscribe(db, receiver.url())
    token = await tokens.create(db, "env-1")
    async with daemon(settings) as running, aiohttp.ClientSession() as http:
        # The daemon wrote its limit where every publisher meets it.
        assert await db.fetchval("SELECT max_payload_bytes FROM dispatcher.limits") == LIMIT
        publish = "SELECT dispatcher.publish('env-1', 'products.update.v0', $1::jsonb)"
        await db.execute(publish, payload_of(LIMIT))
        with pytest.raises(asyncpg.ProgramLimitExceededError) as refused:
            await db.execute(publish, payload_of(LIMIT + 1))
        assert refused.value.message == (
            f"payload of {LIMIT + 1} bytes is over max_payload_bytes ({LIMIT})"
        )
        assert refused.value.hint == "split the event, or raise [delivery] max_payload_bytes"
        # A plain INSERT, many rows in one statement: the statement is refused whole.
        with pytest.raises(asyncpg.ProgramLimitExceededError):
            await db.execute(
                "INSERT INTO dispatcher.events (environment_id, event_name, payload) "
                "SELECT 'env-1', 'products.update.v0', "
                "CASE WHEN g = 3 THEN $1::jsonb ELSE '{}' END FROM generate_series(1, 5) g",
                payload_of(LIMIT + 100),
            )
        assert await db.fetchval("SELECT count(*) FROM dispatcher.events") == 1

        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

        async def post(size: int) -> tuple[int, dict[str, object]]:
            body = '{"event_name": "products.update.v0", "payload": ' + payload_of(size) + "}"
            async with http.post(
                f"{running.admin_url}/v1/events", data=body, headers=headers
            ) as answer:
                return answer.status, await answer.json()

        assert (await post(LIMIT))[0] == 201
        status, answer = await post(LIMIT + 1)
        assert status == 413
        assert answer == {
            "error": {
                "code": "too_large",
                "message": f"payload of {LIMIT + 1} bytes is over max_payload_bytes ({LIMIT})",
                "field": "payload",
            }
        }
        assert await db.fetchval("SELECT count(*) FROM dispatcher.events") == 2
        await wait_done(db, 2)


def test_the_limits_are_checked_when_the_config_is_read() -> None:
    with pytest.raises(ConfigError, match=r"\[delivery\] claim_bytes must be positive"):
        config.load(None, {"DISPATCHER_DELIVERY_CLAIM_BYTES": "0"})
    with pytest.raises(ConfigError, match=r"max_payload_bytes must be at most 1 GiB"):
        config.load(None, {"DISPATCHER_DELIVERY_MAX_PAYLOAD_BYTES": str(2 << 30)})


@pytest.mark.timeout(60)
async def test_claims_hold_no_more_payload_bytes_than_claim_bytes(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    size = 100_000
    in_flight = 0
    most = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await request.read()
            await asyncio.sleep(0.05)
            return web.Response(text="ok")
        finally:
            in_flight -= 1

    receiver.plan("/hook", then=slow)
    await subscribe(db, receiver.url())
    # Three payloads' worth: never more than three claimed at once, though 64 slots are free.
    settings = settings_for(database, claim_bytes=3 * size, max_in_flight=64)
    await db.execute(
        "INSERT INTO dispatcher.events (environment_id, event_name, payload) "
        "SELECT 'env-1', 'products.update.v0', $1::jsonb FROM generate_series(1, 24)",
        payload_of(size),
    )
    async with daemon(settings) as running:
        await wait_done(db, 24, timeout=30)
        assert running.worker.held_bytes == 0
    assert 1 < most <= 3, most

    # One payload larger than the whole budget goes out, alone.
    most = 0
    await db.execute(
        "INSERT INTO dispatcher.events (environment_id, event_name, payload) "
        "SELECT 'env-1', 'products.update.v0', $1::jsonb FROM generate_series(1, 3)",
        payload_of(4 * size),
    )
    async with daemon(settings):
        await wait_done(db, 27, timeout=30)
    assert most == 1
    delivered = await db.fetchval(
        "SELECT count(*) FROM dispatcher.deliveries_done WHERE status = 'delivered'"
    )
    assert delivered == 27


async def test_migrate_writes_the_configured_limit(database: str, db: asyncpg.Connection) -> None:
    """A deploy step's `dispatcher migrate` sets the limit publishers meet, daemon or not."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env |= {
        "DISPATCHER_CONFIG": os.devnull,
        "DISPATCHER_DATABASE_URL": database,
        "DISPATCHER_DELIVERY_MAX_PAYLOAD_BYTES": str(LIMIT),
    }
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "dispatcher", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert await db.fetchval("SELECT max_payload_bytes FROM dispatcher.limits") == LIMIT
    with pytest.raises(asyncpg.ProgramLimitExceededError, match="over max_payload_bytes"):
        await db.execute(
            "SELECT dispatcher.publish('env-1', 'products.update.v0', $1::text::jsonb)",
            payload_of(LIMIT + 1),
        )
