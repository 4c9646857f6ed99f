"""/v1/subscriptions: create, list, read, update, delete, (de)activate, stats."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import msgspec
import orjson
import structlog
from aiohttp import web
from msgspec import UNSET

from . import api_deliveries, queries
from .api import (
    MAX_PAGE,
    ApiError,
    body,
    decoded,
    environment_for,
    invalid,
    json_response,
    not_found,
    path_uuid,
    principal,
    query_cursor,
    query_int,
    scope,
    state,
)
from .egress import DIRECT_EGRESS, EgressError, describe_client_cert
from .envelope import iso_millis
from .examples import event_name_for, example
from .models import (
    MAX_STATS_BUCKETS,
    SETTING_KEYS,
    STATS_BUCKETS,
    AuthNone,
    RotateSecret,
    SendTest,
    SubscriptionCreate,
    SubscriptionCursor,
    SubscriptionUpdate,
    integral,
)
from .netguard import URLRejectedError, check_url
from .profiles import PROFILES, EndpointSettings, SettingsError, resolve
from .signing import ASYMMETRIC, SIGNERS, auth_headers, new_secret, new_signing_key, public_key

log = structlog.get_logger(__name__)

INSERT = """
INSERT INTO dispatcher.subscriptions
    (environment_id, url, events, profile, settings, secret, name, description, active,
     auth, email, signing_key)
VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, $7, $8, $9, $10::text::jsonb, $11, $12)
RETURNING *
"""

SELECT_ONE = """
SELECT * FROM dispatcher.subscriptions
WHERE id = $1 AND ($2::text IS NULL OR environment_id = $2)
"""

SELECT_PAGE = """
SELECT * FROM dispatcher.subscriptions
WHERE ($1::text IS NULL OR environment_id = $1)
  AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3::uuid))
ORDER BY created_at, id
LIMIT $4
"""

UPDATE = """
UPDATE dispatcher.subscriptions
SET url = $2, events = $3, profile = $4, settings = $5::text::jsonb, secret = $6, name = $7,
    description = $8, active = $9, auth = $10::text::jsonb, email = $11,
    signing_key = coalesce(signing_key, $12),
    deactivated_reason = CASE WHEN $9 THEN NULL WHEN active THEN 'deactivated by API'
                              ELSE deactivated_reason END,
    updated_at = now()
WHERE id = $1
RETURNING *
"""

SET_ACTIVE = """
UPDATE dispatcher.subscriptions
SET active = $3, deactivated_reason = CASE WHEN $3 THEN NULL ELSE 'deactivated by API' END,
    updated_at = now()
WHERE id = $1 AND ($2::text IS NULL OR environment_id = $2)
RETURNING *
"""

DELETE = """
DELETE FROM dispatcher.subscriptions
WHERE id = $1 AND ($2::text IS NULL OR environment_id = $2)
"""

# Over the attempts of the last $2 seconds. A retry is an attempt that follows one whose
# outcome was "retry"; the first attempt after a final one is a resend, not a retry (an attempt
# whose predecessor lies before the window counts as a retry unless it is the first).
STATS = """
WITH recent AS (
    SELECT delivery_id, attempt, duration_ms, outcome,
           lag(outcome) OVER (PARTITION BY delivery_id ORDER BY attempt) AS before
    FROM dispatcher.attempts a
    WHERE subscription_id = $1 AND started_at >= now() - make_interval(secs => $2)
      AND NOT EXISTS (SELECT 1 FROM dispatcher.test_deliveries t
                      WHERE t.delivery_id = a.delivery_id)
)
SELECT count(*) AS attempts,
       count(*) FILTER (WHERE outcome = 'delivered') AS succeeded,
       count(DISTINCT delivery_id) AS deliveries,
       count(*) FILTER (WHERE before = 'retry' OR (before IS NULL AND attempt > 1)) AS retries,
       avg(duration_ms) AS mean_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) AS p95_ms
FROM recent
"""

OUTCOMES = """
SELECT status, count(*) AS n FROM dispatcher.deliveries_done d
WHERE subscription_id = $1 AND finished_at >= now() - make_interval(secs => $2)
  AND NOT EXISTS (SELECT 1 FROM dispatcher.test_deliveries t WHERE t.delivery_id = d.id)
GROUP BY status
"""

PENDING = """
SELECT count(*) FROM dispatcher.deliveries d
WHERE subscription_id = $1
  AND NOT EXISTS (SELECT 1 FROM dispatcher.test_deliveries t WHERE t.delivery_id = d.id)
"""

# Where a series ends: the end of the bucket now() is in ($1 seconds a bucket, aligned to
# the epoch), on the database's clock.
SERIES_END = "SELECT ceil(extract(epoch FROM now()) / $1::int) * $1::int"

# The attempts of [$2, $3) (unix seconds) by bucket of $4 seconds: an index range scan of
# attempts_subscription_idx on each daily partition the range touches (the bounds are
# parameters, so the planner prunes the others), test deliveries left out by a hash
# anti-join. Empty buckets are absent; the handler fills them in.
SERIES = """
SELECT (floor(extract(epoch FROM a.started_at) / $4::int) * $4::int)::float8 AS slot,
       count(*) FILTER (WHERE a.outcome = 'delivered') AS delivered,
       count(*) FILTER (WHERE a.outcome = 'retry') AS retried,
       count(*) FILTER (WHERE a.outcome IN ('failed', 'expired')) AS failed,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY a.duration_ms) AS p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY a.duration_ms) AS p95
FROM dispatcher.attempts a
WHERE a.subscription_id = $1
  AND a.started_at >= to_timestamp($2::float8) AND a.started_at < to_timestamp($3::float8)
  AND NOT EXISTS (SELECT 1 FROM dispatcher.test_deliveries t
                  WHERE t.delivery_id = a.delivery_id)
GROUP BY 1
ORDER BY 1
"""


def public(row: asyncpg.Record, secret: str | None = None) -> dict[str, Any]:
    """A subscription as the API shows it: secrets of the receiver's auth are never shown."""
    auth = orjson.loads(row["auth"])
    shown = {"type": auth.get("type", "none")}
    if "username" in auth:
        shown["username"] = auth["username"]
    if "name" in auth:
        shown["name"] = auth["name"]
    out: dict[str, Any] = {
        "id": row["id"],
        "environment_id": row["environment_id"],
        "url": row["url"],
        "events": row["events"],
        "profile": row["profile"],
        "settings": _shown_settings(orjson.loads(row["settings"])),
        "name": row["name"],
        "description": row["description"],
        "active": row["active"],
        "deactivated_reason": row["deactivated_reason"],
        "auth": shown,
        "email": row["email"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }
    if row["signing_key"] is not None:
        # Derived from the private key, which never leaves the database.
        out["public_key"] = public_key(row["signing_key"])
    if secret is not None:
        out["secret"] = secret
    return out


def _shown_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as answers show them: a client certificate as its subject and expiry, its
    key never."""
    tls = settings.get("tls")
    if not isinstance(tls, dict) or not ({"client_cert", "client_key"} & set(tls)):
        return settings
    shown = {k: v for k, v in tls.items() if k not in ("client_cert", "client_key")}
    cert = tls.get("client_cert")
    described = describe_client_cert(cert) if isinstance(cert, str) else None
    if described is not None:
        shown["client_cert_subject"] = described.subject
        shown["client_cert_expires_at"] = described.not_after
    return {**settings, "tls": shown}


def _egress_checked(endpoint: EndpointSettings, where: str) -> None:
    """A subscription's proxy and TLS material are usable (422 naming the field if not)."""
    if endpoint.proxy is not None:
        try:
            DIRECT_EGRESS.override(proxy=endpoint.proxy)
        except EgressError as exc:
            raise invalid(where + "proxy", str(exc)) from None
    if endpoint.tls is not None:
        try:
            DIRECT_EGRESS.override(tls=endpoint.tls)
        except EgressError as exc:
            message = str(exc)
            # The messages begin with what they are about ("client_key does not belong...").
            key = next(
                (k for k in ("client_cert", "client_key", "ca") if message.startswith(k)), None
            )
            raise invalid(where + "tls" + (f".{key}" if key else ""), message) from None


def _events(sub: SubscriptionCreate) -> list[str]:
    if sub.entity is not UNSET or sub.event_type is not UNSET:
        # Tilby's way to subscribe: one entity and one event type, any version.
        for key, value in (("entity", sub.entity), ("event_type", sub.event_type)):
            if value is UNSET:
                raise invalid(key, "give entity and event_type together")
        if sub.events is not UNSET:
            raise invalid("events", "give either events or entity + event_type")
        return [f"{sub.entity}.{sub.event_type}.*"]
    if sub.events is UNSET:
        raise invalid("events", "required: a list of event names or patterns")
    # Plain names and patterns as given; Tilby-style objects as the pattern they mean.
    return list(dict.fromkeys(e if isinstance(e, str) else e.pattern() for e in sub.events))


def _settings(request: web.Request, data: dict[str, Any], profile: str) -> dict[str, Any]:
    """Profile overrides, given nested under "settings" or at the top level (as given)."""
    top = {k: v for k, v in data.items() if k in SETTING_KEYS}
    overrides = {**data.get("settings", {}), **top}
    config = state(request).settings.delivery
    try:
        endpoint = resolve(
            profile, overrides, timeout=config.timeout, connect_timeout=config.connect_timeout
        )
    except SettingsError as exc:
        where = "" if exc.field == "profile" or exc.field.split(".")[0] in top else "settings."
        raise invalid(where + exc.field, exc.message) from None
    _egress_checked(endpoint, "" if "tls" in top or "proxy" in top else "settings.")
    # Stored as they were read: 3.0 as 3, or the claim's `::int` of max_in_flight would
    # refuse the row, and with it every claim.
    settings = integral(overrides)
    assert isinstance(settings, dict)
    return settings


def _asymmetric(request: web.Request, profile: str, settings: Any) -> bool:
    """Whether the subscription signs with an Ed25519 key pair (standard_v1a)."""
    config = state(request).settings.delivery
    try:
        endpoint = resolve(
            profile, settings, timeout=config.timeout, connect_timeout=config.connect_timeout
        )
    except SettingsError:
        return False
    return endpoint.signature in ASYMMETRIC


def _validated(request: web.Request, data: dict[str, Any]) -> dict[str, Any]:
    sub = decoded(data, SubscriptionCreate)
    security = state(request).settings.security
    try:
        check_url(
            sub.url,
            allow_http=security.allow_http,
            allow_private=security.allow_private_networks,
            allow_loopback=security.allow_loopback,
        )
    except URLRejectedError as exc:
        raise invalid("url", str(exc)) from None
    profile = "standard" if sub.profile is UNSET else sub.profile
    if profile not in PROFILES:
        raise invalid("profile", f"must be one of {sorted(PROFILES)}")
    auth = sub.auth if sub.auth is not UNSET and sub.auth is not None else AuthNone()
    return {
        "url": sub.url,
        "events": _events(sub),
        "profile": profile,
        "settings": _settings(request, data, profile),
        "name": _or_none(sub.name),
        "description": _or_none(sub.description),
        "active": True if sub.active is UNSET else sub.active,
        "secret": _or_none(sub.secret),
        "auth": msgspec.to_builtins(auth),
        "email": _or_none(sub.email),
    }


def _or_none(value: Any) -> Any:
    return None if value is UNSET else value


async def _verify(
    request: web.Request, environment: str, fields: dict[str, Any], secret: str
) -> None:
    """Tilby's create-time check: POST a SUBSCRIBED test; anything but 200 refuses the create."""
    config = state(request).settings.delivery
    endpoint = resolve(
        fields["profile"],
        fields["settings"],
        timeout=config.timeout,
        connect_timeout=config.connect_timeout,
    )
    if not endpoint.verify_on_create:
        return
    now_ns = time.time_ns()
    test = orjson.dumps(
        {
            "type": "SUBSCRIBED",
            "entity_name": fields["events"][0].split(".")[0],
            "time": iso_millis(datetime.fromtimestamp(now_ns / 1e9, UTC)),
            "environment_id": environment,
            "client_id": principal(request).client_id,
        }
    )
    headers = {
        "Content-Type": "application/json",
        "User-Agent": endpoint.user_agent,
        **auth_headers(fields["auth"]),
    }
    headers.update(
        SIGNERS[endpoint.signature](
            [secret], "msg_subscribed", test, now_ns // 1_000_000, endpoint.signature_header
        )
    )
    outcome = await state(request).sender.post(fields["url"], test, headers, endpoint)
    if outcome.status != 200:
        got = f"answered {outcome.status}" if outcome.status else f"failed ({outcome.error})"
        raise invalid("url", f"the SUBSCRIBED test request {got}; it must answer 200")


def _taken() -> ApiError:
    return ApiError(
        409,
        "exists",
        "this environment already has a tilby subscription for this entity and event type",
        "events",
    )


async def _store(
    request: web.Request,
    query: str,
    key: object,
    fields: dict[str, Any],
    secret: str,
    signing_key: str | None,
) -> asyncpg.Record:
    """INSERT (keyed by environment) or UPDATE (keyed by id): the same columns in order. An
    UPDATE keeps a key pair the subscription has (`signing_key` only fills a missing one)."""
    try:
        row: asyncpg.Record = await state(request).pool.fetchrow(
            query,
            key,
            fields["url"],
            fields["events"],
            fields["profile"],
            orjson.dumps(fields["settings"]).decode(),
            secret,
            fields["name"],
            fields["description"],
            fields["active"],
            orjson.dumps(fields["auth"]).decode(),
            fields["email"],
            signing_key,
        )
    except asyncpg.UniqueViolationError:
        raise _taken() from None
    return row


# The same rows subscriptions_tilby_unique keeps to one.
TILBY_TAKEN = """
SELECT EXISTS (
    SELECT 1 FROM dispatcher.subscriptions
    WHERE environment_id = $1 AND profile = 'tilby' AND events[1] = $2
)
"""


async def create(request: web.Request) -> web.Response:
    data = await body(request)
    environment = environment_for(request, data.get("environment_id"))
    fields = _validated(request, data)
    secret = fields["secret"] or new_secret()
    if fields["profile"] == "tilby" and await state(request).pool.fetchval(
        TILBY_TAKEN, environment, fields["events"][0]
    ):
        # Before the SUBSCRIBED test: a refused create sends the receiver nothing. (A create
        # racing this one is still refused by the index, after its test.)
        raise _taken()
    # Standard Webhooks v1a: a key pair made here; only its public key is ever shown.
    signing_key = (
        new_signing_key() if _asymmetric(request, fields["profile"], fields["settings"]) else None
    )
    await _verify(request, environment, fields, signing_key or secret)
    row = await _store(request, INSERT, environment, fields, secret, signing_key)
    return json_response(public(row, secret=secret), 201)


async def list_(request: web.Request) -> web.Response:
    limit = query_int(request, "limit", 50, 1, MAX_PAGE)
    cursor = query_cursor(request, SubscriptionCursor)
    after_time: Any = None
    after_id: Any = None
    if cursor is not None:
        micros, _, hex_id = cursor.partition("-")
        after_time, after_id = EPOCH + timedelta(microseconds=int(micros)), UUID(hex=hex_id)
    rows = await state(request).pool.fetch(
        SELECT_PAGE, scope(request), after_time, after_id, limit + 1
    )
    page = rows[:limit]
    next_cursor = _cursor(page[-1]) if len(rows) > limit else None
    return json_response({"items": [public(r) for r in page], "next_cursor": next_cursor})


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _cursor(row: asyncpg.Record) -> str:
    """The position after `row` (models.SubscriptionCursor)."""
    micros = (row["created_at"] - EPOCH) // timedelta(microseconds=1)
    return f"{micros}-{UUID(str(row['id'])).hex}"


async def _one(request: web.Request) -> asyncpg.Record:
    row = await state(request).pool.fetchrow(SELECT_ONE, path_uuid(request), scope(request))
    if row is None:
        raise not_found("subscription")
    return row


async def read(request: web.Request) -> web.Response:
    return json_response(public(await _one(request)))


async def update(request: web.Request) -> web.Response:
    data = await body(request)
    current = await _one(request)
    merged: dict[str, Any] = {
        "url": current["url"],
        "profile": current["profile"],
        "settings": orjson.loads(current["settings"]),
        "name": current["name"],
        "description": current["description"],
        "active": current["active"],
        "secret": current["secret"],
        "auth": orjson.loads(current["auth"]),
        "email": current["email"],
    }
    if not ({"entity", "event_type"} & set(data)):
        merged["events"] = current["events"]
    decoded(data, SubscriptionUpdate)
    merged.update(data)
    fields = _validated(request, merged)
    # Switching to standard_v1a makes a key pair unless it has one; switching away keeps it
    # (and the HMAC secret is kept all along), so switching back needs no new trust.
    signing_key = (
        new_signing_key()
        if current["signing_key"] is None
        and _asymmetric(request, fields["profile"], fields["settings"])
        else None
    )
    row = await _store(
        request,
        UPDATE,
        current["id"],
        fields,
        fields["secret"] or current["secret"],
        signing_key,
    )
    return json_response(public(row))


async def delete(request: web.Request) -> web.Response:
    result = await state(request).pool.execute(DELETE, path_uuid(request), scope(request))
    if result == "DELETE 0":
        raise not_found("subscription")
    return web.Response(status=204)


async def _set_active(request: web.Request, active: bool) -> web.Response:
    row = await state(request).pool.fetchrow(SET_ACTIVE, path_uuid(request), scope(request), active)
    if row is None:
        raise not_found("subscription")
    return json_response(public(row))


async def activate(request: web.Request) -> web.Response:
    return await _set_active(request, True)


async def deactivate(request: web.Request) -> web.Response:
    return await _set_active(request, False)


def _window_and_bucket(request: web.Request) -> tuple[int, int | None]:
    """The stats window and, when asked for, the series' bucket, both in seconds.

    A series has at most MAX_STATS_BUCKETS buckets of one of STATS_BUCKETS seconds and
    covers whole buckets, so every bucket is comparable and the last one is the current.
    Without `window`, a series covers a day or, for small buckets, the most it may.
    """
    if "bucket" not in request.query:
        return query_int(request, "window", 86_400, 60, 90 * 86_400), None
    bucket = query_int(request, "bucket", 3600, 60, 86_400)
    if bucket not in STATS_BUCKETS:
        raise ApiError(
            400, "bad_query", f"bucket must be one of {list(STATS_BUCKETS)} seconds", "bucket"
        )
    default = min(86_400, bucket * MAX_STATS_BUCKETS)
    window = query_int(request, "window", default, 60, 90 * 86_400)
    if window % bucket:
        raise ApiError(
            400, "bad_query", f"window must be a whole number of buckets ({bucket} s)", "window"
        )
    if window // bucket > MAX_STATS_BUCKETS:
        raise ApiError(
            400,
            "bad_query",
            f"at most {MAX_STATS_BUCKETS} buckets: {window // bucket} asked; "
            "use a larger bucket or a shorter window",
            "bucket",
        )
    return window, bucket


async def _series(pool: asyncpg.Pool, sid: UUID, window: int, bucket: int) -> list[Any]:
    """Every bucket of the window, oldest first, empty ones as zeros."""
    end = float(await pool.fetchval(SERIES_END, bucket))
    start = end - window
    found = {r["slot"]: r for r in await pool.fetch(SERIES, sid, start, end, bucket)}
    out = []
    for n in range(window // bucket):
        slot = start + n * bucket
        r = found.get(slot)
        out.append(
            {
                "start": datetime.fromtimestamp(slot, UTC),
                "delivered": r["delivered"] if r else 0,
                "retried": r["retried"] if r else 0,
                "failed": r["failed"] if r else 0,
                "p50_response_ms": r["p50"] if r else None,
                "p95_response_ms": r["p95"] if r else None,
            }
        )
    return out


async def stats(request: web.Request) -> web.Response:
    window, bucket = _window_and_bucket(request)
    row = await _one(request)
    pool = state(request).pool
    numbers = await pool.fetchrow(STATS, row["id"], float(window))
    outcomes = {r["status"]: r["n"] for r in await pool.fetch(OUTCOMES, row["id"], float(window))}
    attempts = numbers["attempts"]
    deliveries = numbers["deliveries"]
    series: dict[str, Any] = {}
    if bucket is not None:
        series = {
            "bucket_seconds": bucket,
            "series": await _series(pool, row["id"], window, bucket),
        }
    return json_response(
        {
            **series,
            "subscription_id": row["id"],
            "window_seconds": window,
            "attempts": attempts,
            "succeeded_attempts": numbers["succeeded"],
            "success_rate": numbers["succeeded"] / attempts if attempts else None,
            "error_rate": (attempts - numbers["succeeded"]) / attempts if attempts else None,
            "mean_response_ms": numbers["mean_ms"],
            "p95_response_ms": numbers["p95_ms"],
            "retries_per_delivery": numbers["retries"] / deliveries if deliveries else None,
            "deliveries": {
                "delivered": outcomes.get("delivered", 0),
                "failed": outcomes.get("failed", 0),
                "expired": outcomes.get("expired", 0),
                "pending": await pool.fetchval(PENDING, row["id"]),
            },
        }
    )


ROTATE = """
UPDATE dispatcher.subscriptions
SET previous_secret = secret, secret = $3,
    previous_secret_expires_at = now() + make_interval(secs => $4), updated_at = now()
WHERE id = $1 AND ($2::text IS NULL OR environment_id = $2)
RETURNING *
"""


ROTATE_KEY = """
UPDATE dispatcher.subscriptions
SET previous_signing_key = signing_key, signing_key = $3,
    previous_signing_key_expires_at = now() + make_interval(secs => $4), updated_at = now()
WHERE id = $1 AND ($2::text IS NULL OR environment_id = $2)
RETURNING *
"""


async def rotate_secret(request: web.Request) -> web.Response:
    """A new signing secret, or for standard_v1a a new key pair; the old one keeps signing
    alongside for `grace_seconds`. An empty body means the defaults."""
    asked = decoded(await body(request, empty_ok=True), RotateSecret)
    grace = float(asked.grace_seconds)
    current = await _one(request)
    if _asymmetric(request, current["profile"], orjson.loads(current["settings"])):
        if asked.secret is not UNSET:
            raise invalid("secret", "a standard_v1a key pair is generated; give no secret")
        row = await state(request).pool.fetchrow(
            ROTATE_KEY, current["id"], scope(request), new_signing_key(), grace
        )
        if row is None:
            raise not_found("subscription")
        out = public(row)
        if row["previous_signing_key"] is not None:
            out["previous_public_key"] = public_key(row["previous_signing_key"])
        out["previous_secret_expires_at"] = row["previous_signing_key_expires_at"]
        return json_response(out)
    new = new_secret() if asked.secret is UNSET else asked.secret
    row = await state(request).pool.fetchrow(ROTATE, current["id"], scope(request), new, grace)
    if row is None:
        raise not_found("subscription")
    out = public(row, secret=new)
    out["previous_secret_expires_at"] = row["previous_secret_expires_at"]
    return json_response(out)


# A test delivery, in one transaction: the event goes in (the fan-out trigger queues it for
# every subscription that wants it), the deliveries of other subscriptions come straight
# out again before anyone can see them, this subscription's is added if the fan-out did
# not queue one (an event name its patterns do not match), and it is marked as a test.
TEST_EVENT = """
INSERT INTO dispatcher.events (environment_id, event_name, payload, entity_instance_id)
VALUES ($1, $2, $3::text::jsonb, $4)
RETURNING id, created_at
"""

TEST_ONLY_HERE = """
DELETE FROM dispatcher.deliveries
WHERE event_id = $1 AND event_created_at = $2 AND subscription_id <> $3
"""

TEST_DELIVERY = """
WITH queued AS (
    SELECT id FROM dispatcher.deliveries
    WHERE event_id = $1 AND event_created_at = $2 AND subscription_id = $3
), added AS (
    INSERT INTO dispatcher.deliveries
        (subscription_id, event_id, event_created_at, environment_id, due_at)
    SELECT $3, $1, $2, $4, now()
    WHERE NOT EXISTS (SELECT 1 FROM queued)
    RETURNING id
)
SELECT id FROM queued UNION ALL SELECT id FROM added
"""

# Marks it; and what stats can no longer reach (older than their longest window) goes.
MARK_TEST = """
WITH old AS (
    DELETE FROM dispatcher.test_deliveries WHERE created_at < now() - interval '91 days'
)
INSERT INTO dispatcher.test_deliveries (delivery_id, subscription_id) VALUES ($1, $2)
"""


async def send_test(request: web.Request) -> web.Response:
    """Queue one test delivery: an example of an event the subscription wants (or the one
    asked for), signed and sent like any other, marked `test` and left out of the stats
    and the error-rate rule."""
    data = await body(request, empty_ok=True)
    asked = decoded(data, SendTest)
    row = await _one(request)
    if not row["active"]:
        raise ApiError(
            409, "inactive", "the subscription is deactivated: activate it to send a test"
        )
    event_name = event_name_for(row["events"]) if asked.event_name is UNSET else asked.event_name
    payload, example_id = example(event_name)
    entity_id: str | None = example_id
    if "payload" in data:
        payload = data["payload"]  # as sent: decode() turns 3.0 into 3
        entity_id = None
    if asked.entity_instance_id is not UNSET:
        entity_id = asked.entity_instance_id
    pool = state(request).pool
    async with pool.acquire() as conn, conn.transaction():
        event = await conn.fetchrow(
            TEST_EVENT, row["environment_id"], event_name, orjson.dumps(payload).decode(), entity_id
        )
        await conn.execute(TEST_ONLY_HERE, event["id"], event["created_at"], row["id"])
        delivery_id = await conn.fetchval(
            TEST_DELIVERY, event["id"], event["created_at"], row["id"], row["environment_id"]
        )
        await conn.execute(MARK_TEST, delivery_id, row["id"])
        await conn.execute(queries.NOTIFY_WORK)
        delivery = await api_deliveries.by_id(conn, scope(request), delivery_id)
    log.info(
        "subscription.test_queued",
        subscription_id=str(row["id"]),
        delivery_id=delivery_id,
        event_name=event_name,
    )
    return json_response(api_deliveries.public(delivery), 202)


def routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/subscriptions", create),
        web.get("/v1/subscriptions", list_),
        web.get("/v1/subscriptions/{id}", read),
        web.patch("/v1/subscriptions/{id}", update),
        web.delete("/v1/subscriptions/{id}", delete),
        web.post("/v1/subscriptions/{id}/activate", activate),
        web.post("/v1/subscriptions/{id}/deactivate", deactivate),
        web.get("/v1/subscriptions/{id}/stats", stats),
        web.post("/v1/subscriptions/{id}/rotate-secret", rotate_secret),
        web.post("/v1/subscriptions/{id}/test", send_test),
    ]
