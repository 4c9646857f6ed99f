"""Migrations are applied once, recorded, and never silently changed."""

from __future__ import annotations

import asyncpg
import pytest

from dispatcher import migrate


async def test_migrations_are_recorded_and_not_applied_twice(db: asyncpg.Connection) -> None:
    versions = [m.version for m in migrate.discover()]
    assert await migrate.apply(db) == []
    rows = await db.fetch("SELECT version FROM dispatcher.schema_migrations ORDER BY version")
    assert [r["version"] for r in rows] == versions


async def test_a_changed_migration_is_refused(db: asyncpg.Connection) -> None:
    [first, *_] = migrate.discover()
    changed = migrate.Migration(first.version, first.name, first.sql + "\n-- edited\n")
    with pytest.raises(migrate.MigrationError, match="was changed after it was applied"):
        await migrate.apply(db, [changed])


async def test_a_schema_newer_than_this_version_is_refused(db: asyncpg.Connection) -> None:
    await db.execute(
        "INSERT INTO dispatcher.schema_migrations (version, name, checksum) "
        "VALUES (9999, 'from_a_later_version', 'x')"
    )
    with pytest.raises(migrate.MigrationError, match="at version 9999, newer than this"):
        await migrate.apply(db)


async def test_partitions_exist_for_today_and_the_next_days(db: asyncpg.Connection) -> None:
    names = await db.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'attempts'"
    )
    assert len(names) >= 4  # default + yesterday..today+2


async def test_migration_15_stores_integral_max_in_flight_as_an_integer(
    db: asyncpg.Connection,
) -> None:
    """A row stored before the API normalised 4.0 (it failed every claim's `::int`)."""
    await db.execute(
        "INSERT INTO dispatcher.subscriptions (environment_id, url, events, secret, settings) "
        "VALUES ('env-1', 'https://example.com/a', '{products.*}', 'whsec_x', "
        """'{"max_in_flight": 4.0, "timeout": 2.5}'), """
        "('env-1', 'https://example.com/b', '{products.*}', 'whsec_y', "
        """'{"max_in_flight": 7}')"""
    )
    [fix] = [m for m in migrate.discover() if m.version == 15]
    await db.execute(fix.sql)
    rows = await db.fetch(
        "SELECT settings::text AS s, (settings->>'max_in_flight')::int AS n "
        "FROM dispatcher.subscriptions ORDER BY url"
    )
    assert [(r["s"], r["n"]) for r in rows] == [
        ('{"timeout": 2.5, "max_in_flight": 4}', 4),
        ('{"max_in_flight": 7}', 7),
    ]
