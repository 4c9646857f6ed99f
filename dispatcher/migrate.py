"""Versioned migrations: sql/NNNN_name.sql, each applied once in its own transaction."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog

log = structlog.get_logger(__name__)

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Any constant works; it only has to be the same for every instance racing to migrate.
_LOCK_KEY = 7_270_514_001

_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS dispatcher;
CREATE TABLE IF NOT EXISTS dispatcher.schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(RuntimeError):
    """The database holds a migration that differs from the file of the same version, or
    one this version does not know."""


def sql_dir() -> Path:
    """sql/ inside the installed package, or beside it in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "sql", here.parent / "sql"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("the sql/ migrations folder is missing from this installation")


def discover(directory: Path | None = None) -> list[Migration]:
    found = []
    for path in sorted((directory or sql_dir()).iterdir()):
        match = _FILE.match(path.name)
        if match:
            found.append(Migration(int(match[1]), match[2], path.read_text()))
    return found


async def apply(conn: asyncpg.Connection, migrations: list[Migration] | None = None) -> list[int]:
    """Apply what is missing; returns the versions applied now."""
    pending = discover() if migrations is None else migrations
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(_BOOTSTRAP)
        rows = await conn.fetch("SELECT version, checksum FROM dispatcher.schema_migrations")
        done = {r["version"]: r["checksum"] for r in rows}
        for migration in pending:
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} was changed after "
                        "it was applied; add a new migration instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO dispatcher.schema_migrations (version, name, checksum) "
                    "VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            log.info("migration.applied", version=migration.version, name=migration.name)
            applied_now.append(migration.version)
        # An older daemon on a newer schema runs statements the schema has moved past: since
        # 0013 it would take rows a newer instance holds under its lease, and send them twice.
        newest, known = max(done, default=0), max((m.version for m in pending), default=0)
        if newest > known:
            raise MigrationError(
                f"the database's schema is at version {newest:04d}, newer than this "
                f"dispatcher knows ({known:04d}): run the newer version"
            )
        await conn.execute("SELECT dispatcher.ensure_partitions(current_date - 1, 4)")
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now
