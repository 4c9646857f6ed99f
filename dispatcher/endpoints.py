"""What the worker knows of a subscription version: an Endpoint, built once and cached by
(id, updated_at), so a claim reads only the versions it has not seen."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson
import structlog

from . import queries
from .config import DeliverySettings, SecuritySettings
from .dberrors import DB_ERRORS, Outage
from .egress import DIRECT_EGRESS, Egress, EgressError
from .metrics import Metrics
from .netguard import URLRejectedError, check_url
from .profiles import DEFAULT_USER_AGENT, EndpointSettings, SettingsError, resolve
from .signing import ASYMMETRIC, auth_headers, new_signing_key

log = structlog.get_logger(__name__)

# Past this many versions the cache starts over (subscriptions that changed or went away).
_MAX_CACHED = 10_000


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What is the same for every request to one subscription version, worked out once:
    where it goes, its secrets, its settings, its constant headers (content type, user
    agent, receiver auth) and whether its URL is refused."""

    url: str
    secret: str
    # The secret before a rotation signs too until `previous_until` (unix seconds).
    previous_secret: str | None
    previous_until: float | None
    settings: EndpointSettings | SettingsError
    headers: dict[str, str]
    blocked: str | None
    # Its own max_in_flight, else the daemon's max_per_endpoint.
    cap: int
    # Whether failure mails have a recipient (the subscription's email): without one none
    # is queued, and a batch of failures writes no more than its outcomes.
    mails: bool
    # How its requests leave: the daemon's [egress], or the subscription's proxy and TLS.
    egress: Egress = DIRECT_EGRESS

    def secrets(self, now: float) -> list[str]:
        """The current signing secret first, then the previous one while it is valid."""
        previous = self.previous_secret
        if previous and self.previous_until is not None and self.previous_until > now:
            return [self.secret, previous]
        return [self.secret]


def build(
    row: Mapping[str, Any],
    delivery: DeliverySettings,
    security: SecuritySettings,
    default_egress: Egress = DIRECT_EGRESS,
) -> Endpoint:
    """The Endpoint of a queries.SUBSCRIPTIONS row: its settings resolved against the
    daemon's timeouts, its headers, the SSRF guard's verdict on its URL, and its egress
    (built once a version: its TLS context is cached by the client from then on)."""
    settings = _resolve(row["profile"], row["settings"], delivery)
    egress = default_egress
    if isinstance(settings, EndpointSettings) and (settings.proxy or settings.tls):
        try:
            egress = default_egress.override(settings.proxy, settings.tls)
        except EgressError as exc:  # stored by hand past the API's check
            settings = SettingsError("tls" if settings.tls else "proxy", str(exc))
    user_agent = (
        settings.user_agent if isinstance(settings, EndpointSettings) else DEFAULT_USER_AGENT
    )
    headers = {
        "Content-Type": "application/json",
        "User-Agent": user_agent,
        **auth_headers(orjson.loads(row["auth"])),
    }
    blocked = None
    try:
        check_url(
            row["url"],
            allow_http=security.allow_http,
            allow_private=security.allow_private_networks,
            allow_loopback=security.allow_loopback,
        )
    except URLRejectedError as exc:
        blocked = str(exc)
    cap = delivery.max_per_endpoint
    if isinstance(settings, EndpointSettings) and settings.max_in_flight is not None:
        cap = settings.max_in_flight
    # An Ed25519 signer signs with the key pair, rotated like the secret (sql/0008).
    keys = ("signing_key", "previous_signing_key", "previous_key_until")
    if not (isinstance(settings, EndpointSettings) and settings.signature in ASYMMETRIC):
        keys = ("secret", "previous_secret", "previous_until")
    elif row["signing_key"] is None:
        settings = SettingsError("signature", "standard_v1a: the subscription has no signing key")
    return Endpoint(
        url=row["url"],
        secret=row[keys[0]] or "",
        previous_secret=row[keys[1]],
        previous_until=row[keys[2]],
        settings=settings,
        headers=headers,
        blocked=blocked,
        cap=cap,
        mails=row["mails"],
        egress=egress,
    )


def _resolve(
    profile: str, settings: str, delivery: DeliverySettings
) -> EndpointSettings | SettingsError:
    try:
        overrides: Any = orjson.loads(settings)
        return resolve(
            profile,
            overrides,
            timeout=delivery.timeout,
            connect_timeout=delivery.connect_timeout,
        )
    except SettingsError as exc:
        return exc


class Endpoints:
    """The cache of Endpoints by subscription version."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        delivery: DeliverySettings,
        security: SecuritySettings,
        metrics: Metrics,
        outage: Outage | None = None,
        egress: Egress = DIRECT_EGRESS,
    ) -> None:
        self._pool = pool
        self._outage = outage or Outage()
        self._egress = egress
        self._delivery = delivery
        self._security = security
        self._metrics = metrics
        self._cache: dict[tuple[UUID, datetime], Endpoint] = {}

    async def of(self, rows: Iterable[Mapping[str, Any]]) -> dict[UUID, Endpoint]:
        """Each claimed subscription's Endpoint: from the cache, and the versions it does not
        hold yet read in one statement. A subscription missing from the answer was deleted,
        or could not be read (its rows keep their lease and come back when it ends)."""
        found: dict[UUID, Endpoint] = {}
        missing: set[UUID] = set()
        for row in rows:
            sid = row["subscription_id"]
            if sid in found or sid in missing:
                continue
            endpoint = self._cache.get((sid, row["updated_at"]))
            if endpoint is None:
                missing.add(sid)
            else:
                found[sid] = endpoint
        if not missing:
            return found
        try:
            subscriptions = await self._pool.fetch(queries.SUBSCRIPTIONS, list(missing))
        except DB_ERRORS as exc:
            self._metrics.db_errors.labels("subscriptions").inc()
            self._outage.failed("subscriptions", exc)
            return found
        self._outage.succeeded()
        subscriptions = await self._give_keys(subscriptions)
        if len(self._cache) > _MAX_CACHED:
            self._cache.clear()
        for sub in subscriptions:
            endpoint = build(sub, self._delivery, self._security, self._egress)
            self._cache[sub["id"], sub["updated_at"]] = endpoint
            found[sub["id"]] = endpoint
        return found

    async def _give_keys(self, rows: list[asyncpg.Record]) -> list[asyncpg.Record]:
        """The rows, those signing with Ed25519 but made without a key pair (in SQL) given
        one first. Rare; when it fails, build() makes their deliveries fail as settings
        errors rather than go out unsigned."""
        keyless = [
            r["id"]
            for r in rows
            if r["signing_key"] is None
            and isinstance(
                s := _resolve(r["profile"], r["settings"], self._delivery), EndpointSettings
            )
            and s.signature in ASYMMETRIC
        ]
        if not keyless:
            return rows
        try:
            given = await self._pool.fetch(
                queries.GIVE_SIGNING_KEYS, keyless, [new_signing_key() for _ in keyless]
            )
        except DB_ERRORS as exc:
            self._metrics.db_errors.labels("subscriptions").inc()
            self._outage.failed("subscriptions", exc)
            return rows
        log.info("subscription.signing_key_made", subscriptions=[str(r["id"]) for r in given])
        fresh = {r["id"]: r for r in given}
        return [fresh.get(r["id"], r) for r in rows]
