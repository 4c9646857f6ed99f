"""`dispatcher bench`: the daemon's delivery rate against a plain HTTP client's, in one run.

Both phases post the same bodies to the same loopback receiver (its own process) with the
same concurrency. The ceiling is an aiohttp client and nothing else; the dispatcher phase
publishes a backlog in SQL and lets the real daemon code claim, sign, send and record it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import shutil
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any
from uuid import uuid4

import aiohttp
import asyncpg
import orjson
from aiohttp import web

from . import config
from .app import EMBEDDED_DATABASE, started
from .embedded import EmbeddedPostgres
from .envelope import Message, render
from .signing import new_secret

PAYLOAD = {"id": "p-1", "sku": "COFFEE-250G", "name": "Premium Coffee Beans", "price": 12.5}


@dataclass(frozen=True, slots=True)
class Report:
    deliveries: int
    concurrency: int
    ceiling_per_s: float
    dispatcher_per_s: float
    ratio: float
    publish_seconds: float
    statements_per_delivery: float | None
    cpu_seconds_per_delivery: float
    ceiling_cpu_seconds_per_post: float
    peak_rss_mb: float


def _receiver_main(ports: Queue[int]) -> None:
    import uvloop

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="ok")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", ok)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=1024).start()
        ports.put(runner.addresses[0][1])
        await asyncio.Event().wait()

    uvloop.run(main())


async def _ceiling(url: str, body: bytes, count: int, concurrency: int) -> tuple[float, float]:
    remaining = count
    headers = {"Content-Type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        cpu0 = time.process_time()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return count / (time.perf_counter() - started), time.process_time() - cpu0


async def _dispatcher(
    settings: config.Settings, url: str, count: int
) -> tuple[float, float, float | None, float]:
    dsn = settings.database.url
    conn = await asyncpg.connect(dsn)
    try:
        async with started(settings):
            await conn.execute(
                "INSERT INTO dispatcher.subscriptions (environment_id, url, events, secret) "
                "VALUES ('bench', $1, '{products.*}', $2)",
                url,
                new_secret(),
            )
            stats = await _statements_ready(conn)
            cpu0 = time.process_time()
            published = time.perf_counter()
            await conn.execute(
                "INSERT INTO dispatcher.events (environment_id, event_name, payload) "
                "SELECT 'bench', 'products.update.v0', $1::text::jsonb "
                "FROM generate_series(1, $2)",
                orjson.dumps(PAYLOAD).decode(),
                count,
            )
            begun = time.perf_counter()
            # Polled: the queue lives in Postgres, not in this process.
            while await conn.fetchval(  # noqa: ASYNC110
                "SELECT EXISTS (SELECT 1 FROM dispatcher.deliveries)"
            ):
                await asyncio.sleep(0.02)
            elapsed = time.perf_counter() - begun
            cpu = time.process_time() - cpu0
            statements = await _statements(conn) if stats else None
        return count / elapsed, begun - published, statements, cpu
    finally:
        await conn.close()


async def _statements_ready(conn: asyncpg.Connection) -> bool:
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute("SELECT pg_stat_statements_reset()")
    except asyncpg.PostgresError:
        return False
    return True


async def _statements(conn: asyncpg.Connection) -> float:
    """Statements the daemon ran (the bench's own publish and progress checks left out)."""
    calls = await conn.fetchval(
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
        "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND query NOT LIKE '%pg_stat_statements%' "
        "AND query NOT LIKE 'SELECT EXISTS (SELECT 1 FROM dispatcher.deliveries)%' "
        "AND query NOT LIKE 'INSERT INTO dispatcher.events%'"
    )
    return float(calls)


async def run(
    base_settings: config.Settings,
    *,
    deliveries: int,
    concurrency: int,
    database_url: str | None,
) -> Report:
    """Run both phases; the daemon uses `base_settings` (the config) but for where it
    connects, listens and may send, and its concurrency."""
    async with AsyncExitStack() as stack:
        if database_url:
            dsn = database_url
        else:
            base = Path(tempfile.mkdtemp(prefix="dispatcher-bench-"))
            stack.callback(shutil.rmtree, base, True)
            server = EmbeddedPostgres(base)
            admin = await asyncio.to_thread(server.start)
            stack.callback(server.stop)
            conn = await asyncpg.connect(admin)
            await conn.execute(f'CREATE DATABASE "{EMBEDDED_DATABASE}"')
            await conn.close()
            dsn = server.dsn(EMBEDDED_DATABASE)

        ctx = multiprocessing.get_context("spawn")
        ports: Queue[int] = ctx.Queue()
        receiver = ctx.Process(target=_receiver_main, args=(ports,), daemon=True)
        receiver.start()
        stack.callback(receiver.join, 10)
        stack.callback(receiver.terminate)
        port = await asyncio.to_thread(ports.get, True, 30)
        url = f"http://127.0.0.1:{port}/hook"

        settings = replace(
            base_settings,
            database=replace(base_settings.database, url=dsn),
            admin=replace(base_settings.admin, listen="127.0.0.1:0"),
            security=config.SecuritySettings(allow_private_networks=True, allow_http=True),
            delivery=replace(
                base_settings.delivery, max_in_flight=concurrency, max_per_endpoint=concurrency
            ),
            log=config.LogSettings(format="json", level="warning"),
        )
        body = render(
            "standard",
            Message(
                0,
                uuid4(),
                uuid4(),
                "products.update.v0",
                "bench",
                None,
                datetime.now(UTC),
                orjson.dumps(PAYLOAD).decode(),
            ),
            time.time_ns(),
        )
        ceiling, ceiling_cpu = await _ceiling(url, body, deliveries, concurrency)
        rate, publish_s, statements, cpu = await _dispatcher(settings, url, deliveries)
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return Report(
            deliveries=deliveries,
            concurrency=concurrency,
            ceiling_per_s=round(ceiling, 1),
            dispatcher_per_s=round(rate, 1),
            ratio=round(rate / ceiling, 3),
            publish_seconds=round(publish_s, 3),
            statements_per_delivery=(
                None if statements is None else round(statements / deliveries, 4)
            ),
            cpu_seconds_per_delivery=round(cpu / deliveries, 6),
            ceiling_cpu_seconds_per_post=round(ceiling_cpu / deliveries, 6),
            peak_rss_mb=round(rss_mb, 1),
        )


def print_report(report: Report, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(asdict(report)).decode() + "\n")
        return
    rows: list[tuple[str, Any]] = [
        ("deliveries", report.deliveries),
        ("concurrency", report.concurrency),
        ("ceiling (plain aiohttp client), POST/s", report.ceiling_per_s),
        ("dispatcher, deliveries/s", report.dispatcher_per_s),
        ("ratio dispatcher / ceiling", report.ratio),
        ("publish + fan-out of the backlog, s", report.publish_seconds),
        ("SQL statements per delivery", report.statements_per_delivery),
        ("dispatcher CPU seconds per delivery", report.cpu_seconds_per_delivery),
        ("ceiling client CPU seconds per POST", report.ceiling_cpu_seconds_per_post),
        ("peak RSS of the bench process, MB", report.peak_rss_mb),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
