"""/v1/subscriptions: create, list, read, update, delete, (de)activate, stats."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import msgspec
import orjson
from aiohttp import web
from msgspec import UNSET

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
from .models import (
    SETTING_KEYS,
    AuthNone,
    RotateSecret,
    SubscriptionCreate,
    SubscriptionCursor,
    SubscriptionUpdate,
)
from .netguard import URLRejectedError, check_url
from .profiles import PROFILES, EndpointSettings, SettingsError, resolve
from .signing import ASYMMETRIC, SIGNERS, auth_headers, new_secret, new_signing_key, public_key

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
    FROM dispatcher.attempts
    WHERE subscription_id = $1 AND started_at >= now() - make_interval(secs => $2)
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
SELECT status, count(*) AS n FROM dispatcher.deliveries_done
WHERE subscription_id = $1 AND finished_at >= now() - make_interval(secs => $2)
GROUP BY status
"""

PENDING = "SELECT count(*) FROM dispatcher.deliveries WHERE subscription_id = $1"


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
    return overrides


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


async def stats(request: web.Request) -> web.Response:
    window = query_int(request, "window", 86_400, 60, 90 * 86_400)
    row = await _one(request)
    pool = state(request).pool
    numbers = await pool.fetchrow(STATS, row["id"], float(window))
    outcomes = {r["status"]: r["n"] for r in await pool.fetch(OUTCOMES, row["id"], float(window))}
    attempts = numbers["attempts"]
    deliveries = numbers["deliveries"]
    return json_response(
        {
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
    ]
