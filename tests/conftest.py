"""Shared test parts: one PostgreSQL per session, a database per test, real HTTP receivers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from dispatcher import logs, migrate
from dispatcher.embedded import EmbeddedPostgres

from .helpers import Receiver

logs.configure("console", "warning")


@dataclass(frozen=True, slots=True)
class PgServer:
    admin_dsn: str
    template: str

    def dsn(self, database: str) -> str:
        parts = urlsplit(self.admin_dsn)
        return urlunsplit(parts._replace(path=f"/{database}"))


async def _make_template(admin_dsn: str, template: str, dsn: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{template}"')
    finally:
        await conn.close()
    conn = await asyncpg.connect(dsn)
    try:
        await migrate.apply(conn)
    finally:
        await conn.close()


async def _drop(admin_dsn: str, database: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """DISPATCHER_TEST_DATABASE_URL's server, or an embedded one for the session."""
    external = os.environ.get("DISPATCHER_TEST_DATABASE_URL")
    server: EmbeddedPostgres | None = None
    base: str | None = None
    if external:
        admin_dsn = external
    else:
        base = tempfile.mkdtemp(prefix="dispatcher-test-pg-")
        server = EmbeddedPostgres(Path(base), fast_unsafe=True)
        admin_dsn = server.start()
    try:
        with templated(admin_dsn) as info:
            yield info
    finally:
        if server is not None:
            server.stop()
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def templated(admin_dsn: str) -> Iterator[PgServer]:
    """A migrated template database on the server of `admin_dsn`, dropped afterwards."""
    template = f"dispatcher_template_{os.getpid()}"
    info = PgServer(admin_dsn, template)
    try:
        asyncio.run(_make_template(admin_dsn, template, info.dsn(template)))
        yield info
    finally:
        asyncio.run(_drop(admin_dsn, template))


@contextlib.asynccontextmanager
async def fresh_database(server: PgServer) -> AsyncIterator[str]:
    """A fresh, migrated database (cloned from the server's template), dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(server.admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{server.template}"')
    finally:
        await conn.close()
    try:
        yield server.dsn(name)
    finally:
        await _drop(server.admin_dsn, name)


@pytest.fixture
async def database(pg_server: PgServer) -> AsyncIterator[str]:
    """A fresh, migrated database for one test (cloned from the session's template)."""
    async with fresh_database(pg_server) as dsn:
        yield dsn


@pytest.fixture
async def db(database: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r
