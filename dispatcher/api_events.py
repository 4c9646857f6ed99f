"""/v1/events: publish over HTTP, with the same semantics as dispatcher.publish() in SQL."""

from __future__ import annotations

import re
from typing import Any

import orjson
from aiohttp import web

from .api import body, environment_for, invalid, json_response, state

EVENT_NAME = re.compile(r"^[a-z0-9_-]+\.[a-z0-9_-]+\.v[0-9]+$")
FIELDS = {"environment_id", "event_name", "payload", "entity_instance_id", "idempotency_key"}

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


def _optional_text(data: dict[str, object], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 200:
        raise invalid(key, "must be a non-empty string of at most 200 characters")
    return value


async def _target(request: web.Request, fields: set[str]) -> tuple[dict[str, Any], str, str]:
    """The body, its environment and its event name, checked."""
    data = await body(request)
    unknown = set(data) - fields
    if unknown:
        raise invalid(sorted(unknown)[0], "unknown field")
    environment = environment_for(request, data.get("environment_id"))
    name = data.get("event_name")
    if not isinstance(name, str) or len(name) > 200 or not EVENT_NAME.match(name):
        raise invalid("event_name", "must look like entity.action.v0 (lowercase)")
    return data, environment, name


async def publish(request: web.Request) -> web.Response:
    data, environment, name = await _target(request, FIELDS)
    if "payload" not in data:
        raise invalid("payload", "required: the event's JSON")
    # body() has refused NUL characters, which text and jsonb cannot store.
    async with state(request).pool.acquire() as conn, conn.transaction():
        event_id = await conn.fetchval(
            PUBLISH,
            environment,
            name,
            orjson.dumps(data["payload"]).decode(),
            _optional_text(data, "entity_instance_id"),
            _optional_text(data, "idempotency_key"),
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


IMPORT = "SELECT dispatcher.publish_import($1, $2, $3::text::jsonb)"


async def publish_import(request: web.Request) -> web.Response:
    """Many entities at once: items and customers go out in batches of at most 80 a request."""
    data, environment, name = await _target(request, {"environment_id", "event_name", "entities"})
    entities = data.get("entities")
    if not isinstance(entities, list) or not 1 <= len(entities) <= 100_000:
        raise invalid("entities", "must be a list of 1 to 100000 entities")
    events = await state(request).pool.fetchval(
        IMPORT, environment, name, orjson.dumps(entities).decode()
    )
    return json_response({"events": events, "entities": len(entities)}, 201)


def routes() -> list[web.RouteDef]:
    return [web.post("/v1/events", publish), web.post("/v1/events/import", publish_import)]
