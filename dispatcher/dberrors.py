"""What asyncpg raises when the database is away or refuses a statement: the daemon's loops
log it, wait and go on, never die of it."""

from __future__ import annotations

import asyncpg

# InternalClientError is what asyncpg raises for a connection the server ended in the middle
# of an operation (MagicStack/asyncpg#1069): the database being away, not a bug of ours.
DB_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
