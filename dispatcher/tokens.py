"""API tokens: created for one environment, shown once, stored as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

import asyncpg

PREFIX = "dsp_"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: one environment, or (environment_id None) the bootstrap admin."""

    environment_id: str | None
    # The token's id: Tilby's SUBSCRIBED test names it as client_id.
    client_id: str = "admin"

    @property
    def is_admin(self) -> bool:
        return self.environment_id is None


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def create(conn: asyncpg.Connection, environment_id: str, name: str | None = None) -> str:
    """A new token for `environment_id`; the plain token exists only in the return value."""
    token = PREFIX + secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO dispatcher.tokens (environment_id, token_hash, name) VALUES ($1, $2, $3)",
        environment_id,
        _hash(token),
        name,
    )
    return token


async def authenticate(pool: asyncpg.Pool, token: str, admin_token: str) -> Principal | None:
    """The principal a bearer token stands for, or None.

    The admin token is compared in constant time; other tokens are found by their hash, so
    the lookup never compares the secret itself.
    """
    if admin_token and hmac.compare_digest(token.encode(), admin_token.encode()):
        return Principal(None)
    if not token.startswith(PREFIX):
        return None
    row = await pool.fetchrow(
        "SELECT id, environment_id FROM dispatcher.tokens WHERE token_hash = $1", _hash(token)
    )
    return None if row is None else Principal(row["environment_id"], str(row["id"]))
