"""/v1/events: publish over HTTP, with the same semantics as dispatcher.publish() in SQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson
from aiohttp import web
from msgspec import UnsetType

from .api import ApiError, body, decoded, environment_for, invalid, json_response, state
from .models import RESERVED_ENTITY, EventCreate, ImportCreate

PUBLISH = "SELECT dispatcher.publish($1, $2, $3::text::jsonb, $4, $5)"

# A repeat of an idempotency key returns the first event: it was created before this
# transaction began, which is how the answer tells a repeat (200) from a new event (201).
PUBLISHED = """
SELECT e.id, e.environment_id, e.event_name, e.entity_instance_id, e.created_at,
       e.created_at < now() AS repeated,
       (SELECT count(*) FROM dispatcher.deliveries d WHERE d.event_id = e.id)
     + (SELECT count(*) FROM dispatcher.deliveries_done d WHERE d.event_id = e.id) AS deliveries
FROM dispatcher.events e WHERE e.id = $1
"""


def _not_reserved(data: dict[str, Any]) -> None:
    """Refuse the dispatcher's own entity in words (the schema's pattern says it too, and the
    database refuses it whatever the path: sql/0008)."""
    name = data.get("event_name")
    if isinstance(name, str) and name.split(".", 1)[0] == RESERVED_ENTITY:
        raise invalid(
            "event_name",
            f'the entity "{RESERVED_ENTITY}" is reserved for the dispatcher\'s own operational '
            "events; publish under another entity",
        )


@asynccontextmanager
async def _within_payload_limit(field: str) -> AsyncIterator[None]:
    """The database measures every payload against [delivery] max_payload_bytes at insert
    (sql/0012), whichever way it was published: its refusal is a 413 naming the field."""
    try:
        yield
    except asyncpg.ProgramLimitExceededError as exc:
        if exc.sqlstate != "54000":  # its subclasses: not the payload's size
            raise
        raise ApiError(413, "too_large", exc.message, field) from None


async def publish(request: web.Request) -> web.Response:
    data = await body(request)
    _not_reserved(data)
    event = decoded(data, EventCreate)
    environment = environment_for(request, _or_none(event.environment_id))
    # body() has refused NUL characters, which text and jsonb cannot store.
    async with (
        _within_payload_limit("payload"),
        state(request).pool.acquire() as conn,
        conn.transaction(),
    ):
        event_id = await conn.fetchval(
            PUBLISH,
            environment,
            event.event_name,
            # The payload as sent (1.0 stays 1.0), not as decoding normalised it.
            orjson.dumps(data["payload"]).decode(),
            _or_none(event.entity_instance_id),
            _or_none(event.idempotency_key),
        )
        row = await conn.fetchrow(PUBLISHED, event_id)
    return json_response(
        {
            "id": row["id"],
            "environment_id": row["environment_id"],
            "event_name": row["event_name"],
            "entity_instance_id": row["entity_instance_id"],
            "created_at": row["created_at"],
            "deliveries": row["deliveries"],
            "duplicate": row["repeated"],
        },
        200 if row["repeated"] else 201,
    )


def _or_none(value: str | UnsetType) -> str | None:
    return None if isinstance(value, UnsetType) else value


IMPORT = "SELECT dispatcher.publish_import($1, $2, $3::text::jsonb)"


async def publish_import(request: web.Request) -> web.Response:
    """Many entities at once: items and customers go out in batches of at most 80 a request."""
    data = await body(request)
    _not_reserved(data)
    batch = decoded(data, ImportCreate)
    environment = environment_for(request, _or_none(batch.environment_id))
    entities = data["entities"]  # as sent, not as models.integral read them
    async with _within_payload_limit("entities"):
        events = await state(request).pool.fetchval(
            IMPORT, environment, batch.event_name, orjson.dumps(entities).decode()
        )
    return json_response({"events": events, "entities": len(entities)}, 201)


def routes() -> list[web.RouteDef]:
    return [web.post("/v1/events", publish), web.post("/v1/events/import", publish_import)]
