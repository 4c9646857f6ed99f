"""/v1/deliveries: history with every attempt, resend one, resend many as a background job."""

from __future__ import annotations

import asyncio
import re
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import msgspec
import orjson
import structlog
from aiohttp import web
from msgspec import UnsetType

from . import queries
from .api import (
    MAX_PAGE,
    ApiError,
    body,
    decoded,
    environment_for,
    json_response,
    not_found,
    path_int,
    query_cursor,
    query_int,
    query_uuid,
    scope,
    state,
)
from .endpoints import build
from .models import FINISHED, STATUSES, DeliveryCursor, ResendRequest
from .profiles import SettingsError
from .signing import SIGNERS

log = structlog.get_logger(__name__)

RESEND_BATCH = 500

# Live deliveries and finished ones, in one shape. A live row's state follows from its
# columns: a lease in force means it is being sent right now; a waiting one (ordering,
# sql/0010) goes out after its key's head, the key's one live row that is not waiting.
DELIVERIES = """
WITH d AS (
    SELECT id, subscription_id, event_id, event_created_at, environment_id, attempts,
           CASE WHEN paused THEN 'paused'
                WHEN waiting THEN 'waiting'
                WHEN lease_owner IS NOT NULL AND leased_until > now() THEN 'sending'
                WHEN attempts = 0 THEN 'pending'
                ELSE 'retrying' END AS status,
           created_at,
           CASE WHEN lease_owner IS NULL AND NOT waiting THEN due_at END AS next_attempt_at,
           NULL::timestamptz AS finished_at, last_status, last_error,
           CASE WHEN waiting THEN (
               SELECT h.id FROM dispatcher.deliveries h
               WHERE h.subscription_id = q.subscription_id AND h.order_key = q.order_key
                 AND NOT h.waiting
               ORDER BY h.order_seq
               LIMIT 1
           ) END AS waiting_behind
    FROM dispatcher.deliveries q
    WHERE ($1::text IS NULL OR environment_id = $1)
      AND ($2::uuid IS NULL OR subscription_id = $2)
    UNION ALL
    SELECT id, subscription_id, event_id, event_created_at, environment_id, attempts, status,
           created_at, NULL, finished_at, last_status, last_error, NULL
    FROM dispatcher.deliveries_done
    WHERE ($1::text IS NULL OR environment_id = $1)
      AND ($2::uuid IS NULL OR subscription_id = $2)
)
SELECT d.*, e.event_name, e.entity_instance_id, t.delivery_id IS NOT NULL AS test
FROM d JOIN dispatcher.events e ON e.id = d.event_id AND e.created_at = d.event_created_at
LEFT JOIN dispatcher.test_deliveries t ON t.delivery_id = d.id
WHERE ($3::text IS NULL OR d.status = $3)
  AND ($4::timestamptz IS NULL OR d.created_at >= $4)
  AND ($5::timestamptz IS NULL OR d.created_at < $5)
  AND ($6::text IS NULL OR e.event_name = $6)
  AND ($7::uuid IS NULL OR d.event_id = $7)
  AND ($8::bigint IS NULL OR d.id < $8)
  AND ($9::bigint IS NULL OR d.id = $9)
  AND ($11::text IS NULL OR e.entity_instance_id = $11)
  AND ($12::int IS NULL OR d.last_status = $12)
ORDER BY d.id DESC
LIMIT $10
"""

PAYLOAD = """
SELECT payload::text FROM dispatcher.events WHERE id = $1 AND created_at = $2
"""

ATTEMPTS = """
SELECT attempt, started_at, duration_ms, status_code, error, response_excerpt, outcome,
       retry_after
FROM dispatcher.attempts
WHERE delivery_id = $1
ORDER BY started_at, attempt
"""

RESEND = "SELECT dispatcher.resend($1::bigint[])"

# Finished deliveries a bulk resend picks up: visible to the caller, matching the filter,
# finished before the job started (so what it sent back and saw fail again stays put).
MATCHING = """
SELECT id FROM dispatcher.deliveries_done d
WHERE ($1::text IS NULL OR d.environment_id = $1)
  AND ($2::uuid IS NULL OR d.subscription_id = $2)
  AND d.status = ANY($3::text[])
  AND ($4::timestamptz IS NULL OR d.finished_at >= $4)
  AND d.finished_at <= $5
  AND ($6::bigint[] IS NULL OR d.id = ANY($6))
  AND ($7::text IS NULL OR EXISTS (
        SELECT 1 FROM dispatcher.events e
        WHERE e.id = d.event_id AND e.created_at = d.event_created_at AND e.event_name = $7))
  AND d.id > $8
ORDER BY d.id
LIMIT $9
"""

# How many a job will resend: the same filter, from the start ($8 = 0), without a limit.
COUNT_MATCHING = "SELECT count(*) FROM (" + MATCHING + ") matching"

NEW_JOB = """
INSERT INTO dispatcher.resend_jobs (environment_id, filter) VALUES ($1, $2::text::jsonb)
RETURNING *
"""

JOB = """
SELECT * FROM dispatcher.resend_jobs WHERE id = $1 AND ($2::text IS NULL OR environment_id = $2)
"""


def public(row: asyncpg.Record) -> dict[str, Any]:
    """A delivery as the API shows it (models.Delivery)."""
    return {
        "id": row["id"],
        "subscription_id": row["subscription_id"],
        "environment_id": row["environment_id"],
        "event_id": row["event_id"],
        "event_name": row["event_name"],
        "entity_instance_id": row["entity_instance_id"],
        "status": row["status"],
        "attempts": row["attempts"],
        "created_at": row["created_at"],
        "next_attempt_at": row["next_attempt_at"],
        "finished_at": row["finished_at"],
        "last_status_code": row["last_status"],
        "last_error": row["last_error"],
        "test": row["test"],
        "waiting_behind": row["waiting_behind"],
    }


def _time(request: web.Request, name: str) -> datetime | None:
    text = request.query.get(name)
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, "bad_query", f"{name} must be an ISO 8601 time", name) from None
    if moment.tzinfo is None:
        raise ApiError(400, "bad_query", f"{name} needs a time zone (e.g. Z)", name)
    return moment


SUBSCRIPTION_VISIBLE = """
SELECT EXISTS (
    SELECT 1 FROM dispatcher.subscriptions
    WHERE id = $1 AND ($2::text IS NULL OR environment_id = $2)
)
"""


async def _check_subscription(
    request: web.Request, subscription: UUID | None, environment: str | None
) -> None:
    """A filter naming a subscription the caller cannot see answers 404, as its own routes
    do, instead of an empty result that looks like "nothing happened"."""
    if subscription is not None and not await state(request).pool.fetchval(
        SUBSCRIPTION_VISIBLE, subscription, environment
    ):
        raise not_found("subscription")


async def list_(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        raise ApiError(400, "bad_query", f"status must be one of {list(STATUSES)}", "status")
    event_name = request.query.get("event_name")
    if event_name is not None and len(event_name) > 200:
        raise ApiError(400, "bad_query", "event_name is too long", "event_name")
    limit = query_int(request, "limit", 50, 1, MAX_PAGE)
    cursor = query_cursor(request, DeliveryCursor)
    before = None if cursor is None else int(cursor)
    subscription = query_uuid(request, "subscription_id")
    await _check_subscription(request, subscription, scope(request))
    entity = request.query.get("entity_instance_id")
    if entity is not None and not 1 <= len(entity) <= 200:
        raise ApiError(
            400, "bad_query", "entity_instance_id must be 1 to 200 characters", "entity_instance_id"
        )
    status_code = (
        query_int(request, "status_code", 0, 100, 599) if "status_code" in request.query else None
    )
    rows = await state(request).pool.fetch(
        DELIVERIES,
        scope(request),
        subscription,
        status,
        _time(request, "since"),
        _time(request, "until"),
        event_name,
        query_uuid(request, "event_id"),
        before,
        None,
        limit + 1,
        entity,
        status_code,
    )
    page = rows[:limit]
    return json_response(
        {
            "items": [public(r) for r in page],
            "next_cursor": str(page[-1]["id"]) if len(rows) > limit else None,
        }
    )


async def by_id(
    conn: asyncpg.Pool | asyncpg.Connection, environment: str | None, delivery_id: int
) -> asyncpg.Record | None:
    """One delivery, live or finished, as the list shows it; None when the caller cannot
    see it."""
    return await conn.fetchrow(
        DELIVERIES,
        environment,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        delivery_id,
        1,
        None,
        None,
    )


async def _one(request: web.Request) -> asyncpg.Record:
    row = await by_id(state(request).pool, scope(request), path_int(request, "delivery"))
    if row is None:
        raise not_found("delivery")
    return row


async def read(request: web.Request) -> web.Response:
    row = await _one(request)
    pool = state(request).pool
    payload = await pool.fetchval(PAYLOAD, row["event_id"], row["event_created_at"])
    attempts = await pool.fetch(ATTEMPTS, row["id"])
    out = public(row)
    out["payload"] = orjson.Fragment(payload)
    out["attempt_history"] = [
        {
            "attempt": a["attempt"],
            "started_at": a["started_at"],
            "duration_ms": a["duration_ms"],
            "status_code": a["status_code"],
            "error": a["error"],
            "response_excerpt": a["response_excerpt"],
            "outcome": a["outcome"],
            "retry_after": a["retry_after"],
        }
        for a in attempts
    ]
    out["request_headers"] = await _request_headers(request, row)
    return json_response(out)


# Headers that carry no secret although a signer sets them: the message id is the
# delivery's, the timestamp each attempt's own send time.
_PLAIN_SIGNATURE_HEADERS = {"webhook-id"}
_PER_ATTEMPT = {"webhook-timestamp": "<each attempt's send time, unix seconds>"}
_SECRET_RUN = re.compile(r"[A-Za-z0-9+/_-]{16,}=*")
MASK = "••••••••"


async def _request_headers(request: web.Request, row: asyncpg.Record) -> list[dict[str, Any]]:
    """The headers the delivery's attempts send, rebuilt from the subscription's settings.

    Rebuilt at read time rather than stored per attempt: they follow from the subscription
    (endpoints.build: content type, user agent, receiver auth; signing: the signature
    scheme), so storing them would add bytes to every attempt on the hot path to say what
    the settings already say. The catch, named in the schema: a settings change since the
    attempt shows the new headers. Secrets are masked: credentials whole, signatures' digests.
    """
    admin = state(request)
    subs = await admin.pool.fetch(queries.SUBSCRIPTIONS, [row["subscription_id"]])
    if not subs:
        return []
    endpoint = build(subs[0], admin.settings.delivery, admin.settings.security)
    shown = [
        {"name": name, "value": value, "masked": False}
        for name, value in endpoint.headers.items()
        if name in ("Content-Type", "User-Agent")
    ]
    for name, value in endpoint.headers.items():
        if name not in ("Content-Type", "User-Agent"):
            scheme, _, rest = value.partition(" ")
            kept = f"{scheme} {MASK}" if rest and scheme in ("Basic", "Bearer") else MASK
            shown.append({"name": name, "value": kept, "masked": True})
    settings = endpoint.settings
    if isinstance(settings, SettingsError):
        return shown
    signed = SIGNERS[settings.signature](
        ["0" * 32], f"msg_{row['id']}", b"", 0, settings.signature_header
    )
    for name, value in signed.items():
        if name in _PLAIN_SIGNATURE_HEADERS:
            shown.append({"name": name, "value": value, "masked": False})
        elif name in _PER_ATTEMPT:
            shown.append({"name": name, "value": _PER_ATTEMPT[name], "masked": False})
        else:
            masked = _SECRET_RUN.sub(MASK, re.sub(r"\bt=\d+", "t=<send time, unix ms>", value))
            shown.append({"name": name, "value": masked, "masked": True})
    return shown


async def resend_one(request: web.Request) -> web.Response:
    row = await _one(request)
    if row["status"] == "sending":
        raise ApiError(409, "busy", "the delivery is being sent right now; try again shortly")
    moved = await state(request).pool.fetchval(RESEND, [row["id"]])
    if not moved and row["status"] in FINISHED:
        raise ApiError(409, "gone", "the delivery's subscription no longer exists")
    fresh = await _one(request)
    return json_response(public(fresh), 202)


def _job(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "environment_id": row["environment_id"],
        "filter": orjson.loads(row["filter"]),
        "status": row["status"],
        "matched": row["matched"],
        "resent": row["resent"],
        "error": row["error"],
        "created_at": row["created_at"],
        "finished_at": row["finished_at"],
    }


def _resend_filter(request: web.Request, data: dict[str, Any]) -> dict[str, Any]:
    """The job's filter as stored: every key present, unset ones null (environment: all)."""
    asked = decoded(data, ResendRequest)
    given = msgspec.to_builtins(asked)
    environment = (
        environment_for(request, given.get("environment_id"))
        if scope(request) is not None or "environment_id" in given
        else None
    )
    out: dict[str, Any] = {"environment_id": environment}
    if "subscription_id" in given:
        out["subscription_id"] = given["subscription_id"]
    out["status"] = [asked.status] if isinstance(asked.status, str) else asked.status
    if not isinstance(asked.since, UnsetType):
        out["since"] = asked.since.isoformat()
    for key in ("event_name", "ids"):
        if key in given:
            out[key] = given[key]
    return out


def _filter_args(filt: dict[str, Any], cutoff: datetime) -> list[Any]:
    since = filt.get("since")
    return [
        filt.get("environment_id"),
        UUID(filt["subscription_id"]) if filt.get("subscription_id") else None,
        filt["status"],
        datetime.fromisoformat(since) if since else None,
        cutoff,
        filt.get("ids"),
        filt.get("event_name"),
    ]


async def resend_many(request: web.Request) -> web.Response:
    data = await body(request)
    filt = _resend_filter(request, data)
    if "subscription_id" in filt:
        await _check_subscription(request, UUID(filt["subscription_id"]), filt["environment_id"])
    pool = state(request).pool
    job = await pool.fetchrow(NEW_JOB, filt["environment_id"], orjson.dumps(filt).decode())
    jobs = request.app[RESEND_JOBS]
    jobs.start(job["id"])
    return json_response(_job(job), 202)


async def read_job(request: web.Request) -> web.Response:
    try:
        job_id = UUID(request.match_info["id"])
    except ValueError:
        raise not_found("resend job") from None
    row = await state(request).pool.fetchrow(JOB, job_id, scope(request))
    if row is None:
        raise not_found("resend job")
    return json_response(_job(row))


class ResendJobs:
    """Runs bulk resends in the background; jobs left running by a stop resume at start."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, job_id: UUID) -> None:
        task = asyncio.create_task(self._run(job_id), name=f"resend-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resume(self) -> None:
        for row in await self._pool.fetch(
            "SELECT id FROM dispatcher.resend_jobs WHERE status = 'running'"
        ):
            self.start(row["id"])

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, job_id: UUID) -> None:
        job = await self._pool.fetchrow(
            "SELECT * FROM dispatcher.resend_jobs WHERE id = $1", job_id
        )
        args = _filter_args(orjson.loads(job["filter"]), job["cutoff"])
        try:
            matched = await self._pool.fetchval(COUNT_MATCHING, *args, 0, None)
            await self._pool.execute(
                "UPDATE dispatcher.resend_jobs SET matched = resent + $2 WHERE id = $1",
                job_id,
                matched,
            )
            after = 0
            while True:
                ids = [
                    r["id"] for r in await self._pool.fetch(MATCHING, *args, after, RESEND_BATCH)
                ]
                if not ids:
                    break
                moved = await self._pool.fetchval(RESEND, ids)
                await self._pool.execute(
                    "UPDATE dispatcher.resend_jobs SET resent = resent + $2 WHERE id = $1",
                    job_id,
                    moved,
                )
                after = ids[-1]
            await self._pool.execute(
                "UPDATE dispatcher.resend_jobs SET status = 'done', finished_at = now() "
                "WHERE id = $1",
                job_id,
            )
            log.info("resend.done", job_id=str(job_id), matched=matched)
        except (asyncpg.PostgresError, OSError) as exc:
            log.error("resend.failed", job_id=str(job_id), error=str(exc))
            await self._pool.execute(
                "UPDATE dispatcher.resend_jobs SET status = 'failed', error = $2, "
                "finished_at = now() WHERE id = $1",
                job_id,
                str(exc)[:500],
            )


RESEND_JOBS = web.AppKey("resend_jobs", ResendJobs)

# The live queue of one environment ($1; NULL: all) now, by what each row waits for. A
# lease in force (owner set, its end ahead) is a send in progress; an expired one is due
# again, from its end (sql/0013). The queue table holds live rows only, so this reads it
# whole.
QUEUE = """
WITH held AS (
    SELECT subscription_id FROM dispatcher.endpoint_pauses WHERE until > now()
), q AS (
    SELECT d.paused, d.lease_owner IS NOT NULL AND d.leased_until > now() AS sending,
           greatest(d.due_at, d.leased_until) AS due_at, h.subscription_id IS NOT NULL AS held
    FROM dispatcher.deliveries d LEFT JOIN held h ON h.subscription_id = d.subscription_id
    WHERE $1::text IS NULL OR d.environment_id = $1
)
SELECT now() AS measured_at,
       count(*) AS depth,
       count(*) FILTER (WHERE NOT paused AND NOT held AND due_at <= now()) AS waiting,
       coalesce(extract(epoch FROM now() - min(due_at) FILTER (
           WHERE NOT paused AND NOT held AND due_at <= now())), 0)::float8 AS oldest_due_age,
       count(*) FILTER (WHERE sending) AS sending,
       count(*) FILTER (WHERE NOT paused AND NOT held AND NOT sending AND due_at > now())
           AS scheduled,
       count(*) FILTER (WHERE paused) AS paused,
       count(*) FILTER (WHERE held AND NOT paused AND NOT sending) AS endpoint_paused
FROM q
"""


async def queue(request: web.Request) -> web.Response:
    """What the environment's queue holds right now (the operator page's "queue now")."""
    row = await state(request).pool.fetchrow(QUEUE, scope(request))
    return json_response(
        {
            "environment_id": scope(request),
            "measured_at": row["measured_at"],
            "depth": row["depth"],
            "waiting_for_slot": row["waiting"],
            "oldest_due_age_seconds": row["oldest_due_age"],
            "sending": row["sending"],
            "scheduled": row["scheduled"],
            "paused": row["paused"],
            "endpoint_paused": row["endpoint_paused"],
        }
    )


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/deliveries", list_),
        web.post("/v1/deliveries/resend", resend_many),
        web.get("/v1/deliveries/{id:[0-9]+}", read),
        web.post("/v1/deliveries/{id:[0-9]+}/resend", resend_one),
        web.get("/v1/resend-jobs/{id}", read_job),
        web.get("/v1/queue", queue),
    ]
