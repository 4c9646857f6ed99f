"""The composition root: database, migrations, pool, HTTP client, listener, worker, upkeep,
admin port.

Everything is opened in one AsyncExitStack, so the order of opening is the reverse of the
order of closing. Signals only set the stop event.
"""

from __future__ import annotations

import asyncio
import gc
import re
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from . import clocksync, egress, migrate
from .admin import AdminState, build
from .config import Settings, parse_listen
from .dberrors import DB_ERRORS, Outage
from .embedded import EmbeddedPostgres, default_data_dir
from .listen import Listener
from .mailer import Mailer
from .metrics import Metrics
from .schedule import Clock
from .send import Sender, http_client
from .upkeep import Upkeep
from .worker import Worker

log = structlog.get_logger(__name__)

EMBEDDED_DATABASE = "dispatcher"
SERVER_SETTINGS = {
    "application_name": "dispatcher",
    # A claim or a flush never spans an HTTP request; anything idle in a transaction is a bug
    # that would hold back vacuum, so Postgres ends it.
    "idle_in_transaction_session_timeout": "60000",
}
# The limits PostgreSQL enforces for every publisher (sql/0012), written at each start.
SET_LIMITS = """
UPDATE dispatcher.limits SET max_payload_bytes = $1 WHERE max_payload_bytes IS DISTINCT FROM $1
"""
# The worker's queue swings from empty to millions of rows within a second. A generic plan
# cached while it was empty (Postgres picks one after five calls) goes on scanning and sorting
# the whole table until autovacuum analyzes it: a claim took 32 s in a test with 100k rows.
# A custom plan sizes the table from its current pages on every call. (~1 ms of planning a
# claim of up to a few hundred rows.)
WORKER_SERVER_SETTINGS = {**SERVER_SETTINGS, "plan_cache_mode": "force_custom_plan"}
# The worker has at most a claim and a flush under way, and now and then a lookup or upkeep.
WORKER_POOL_SIZE = 4
# Allocations between two collections of the youngest generation (CPython: 700). Every
# delivery allocates a few dozen tracked objects and most die within milliseconds; at 700
# the collector ran every 15-20 deliveries over what was still in flight.
_GC_YOUNG = 10_000


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release hook that skips asyncpg's reset (CLOSE ALL; RESET ALL; UNLISTEN *; ...).

    That reset is a round trip per statement on the hot path; no pooled connection here
    sets session state (LISTEN and advisory locks use connections of their own).
    """


class StartupError(RuntimeError):
    """The daemon cannot start; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class Running:
    """What a started daemon tells whoever started it (tests, the systemd notifier)."""

    worker: Worker
    admin_url: str
    metrics: Metrics


def redacted(url: str) -> str:
    """A database URL fit for a log line: its password replaced."""
    return re.sub(r"(://[^:/@,]*:)[^@]*@", r"\1***@", url)


async def open_database(stack: AsyncExitStack, settings: Settings) -> str:
    """The configured database URL, or an embedded server started for this process; one log
    line says which."""
    if settings.database.url:
        log.info("database.external", url=redacted(settings.database.url))
        return settings.database.url
    base = Path(settings.embedded.data_dir) if settings.embedded.data_dir else default_data_dir()
    server = EmbeddedPostgres(base)
    admin_dsn = await asyncio.to_thread(server.start)
    stack.callback(server.stop)
    conn = await asyncpg.connect(admin_dsn)
    try:
        exists = await conn.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", EMBEDDED_DATABASE
        )
        if not exists:
            await conn.execute(f'CREATE DATABASE "{EMBEDDED_DATABASE}"')
    except asyncpg.DuplicateDatabaseError:
        pass  # another instance created it between our check and our CREATE
    finally:
        await conn.close()
    dsn = server.dsn(EMBEDDED_DATABASE)
    log.info("database.embedded", data_dir=str(server.base_dir), url=dsn)
    return dsn


async def apply_migrations(dsn: str, settings: Settings | None = None) -> list[int]:
    """Migrate, and write the limits the database enforces ([delivery] max_payload_bytes)."""
    try:
        conn = await asyncpg.connect(dsn, server_settings=SERVER_SETTINGS)
    except (OSError, asyncpg.PostgresError) as exc:
        raise StartupError(f"cannot connect to the database: {exc}") from None
    try:
        applied = await migrate.apply(conn)
        if settings is not None:
            await conn.execute(SET_LIMITS, settings.delivery.max_payload_bytes)
        return applied
    finally:
        await conn.close()


async def serve(
    settings: Settings,
    stop: asyncio.Event,
    *,
    clock: Clock | None = None,
    on_ready: Callable[[Running], None] | None = None,
) -> None:
    """Run the daemon until `stop` is set, or until one of its tasks dies."""
    clock = clock or Clock()
    async with AsyncExitStack() as stack:
        dsn = await open_database(stack, settings)
        await apply_migrations(dsn, settings)
        pool = await asyncpg.create_pool(
            dsn,
            min_size=settings.database.pool_min,
            max_size=settings.database.pool_max,
            server_settings=SERVER_SETTINGS,
            reset=_keep_session,
        )
        stack.push_async_callback(pool.close)
        worker_pool = await asyncpg.create_pool(
            dsn,
            min_size=2,
            max_size=WORKER_POOL_SIZE,
            server_settings=WORKER_SERVER_SETTINGS,
            reset=_keep_session,
        )
        stack.push_async_callback(worker_pool.close)
        outage = Outage()
        try:
            # Before anything is claimed: leases and due times are on the database's clock.
            await clocksync.sync(pool, clock)
        except DB_ERRORS as exc:
            raise StartupError(f"cannot read the database's clock: {exc}") from None
        try:
            default_egress = egress.from_config(settings.egress.proxy, settings.egress.ca_file)
            client = await stack.enter_async_context(
                http_client(
                    settings.security.allow_private_networks,
                    allow_loopback=settings.security.allow_loopback,
                    ca_file=settings.egress.ca_file,
                )
            )
        except (egress.EgressError, ssl.SSLError, OSError) as exc:
            raise StartupError(f"[egress]: {exc}") from None
        metrics = Metrics()
        sender = Sender(
            client,
            settings.delivery.response_capture_bytes,
            clock,
            allow_http=settings.security.allow_http,
            allow_private=settings.security.allow_private_networks,
            allow_loopback=settings.security.allow_loopback,
            egress=default_egress,
        )
        log.info(
            "egress.route",
            http_proxy=str(default_egress.http_proxy or "direct"),
            https_proxy=str(default_egress.https_proxy or "direct"),
            ca_file=settings.egress.ca_file or None,
        )
        worker = Worker(
            worker_pool,
            sender,
            settings.delivery,
            settings.security,
            metrics,
            clock=clock,
            outage=outage,
            egress=default_egress,
        )
        upkeep = Upkeep(
            worker_pool,
            worker,
            metrics,
            interval=settings.delivery.poll_interval,
            retention_days=settings.retention.days,
            outage=outage,
            clock=clock,
            streaks=worker.recorder.streaks,
        )
        mailer = Mailer(pool, settings.email, clock, outage=outage)

        def work_published() -> None:
            worker.notify()
            upkeep.nudge()

        listener = Listener(
            dsn, work_published, also={"dispatcher_email": mailer.notify}, outage=outage
        )

        runner = web.AppRunner(
            build(AdminState(pool, listener, metrics, settings, sender)), access_log=None
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        host, port = parse_listen(settings.admin.listen)
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {settings.admin.listen}: {exc}") from None
        bound_host, bound_port = runner.addresses[0][:2]
        admin_url = f"http://{bound_host}:{bound_port}"

        # Before the first claim: pauses other instances were asked for, the earliest due time.
        try:
            await upkeep.poll()
        except Exception as exc:  # as if its task had died at once (see below)
            log.error("dispatcher.task_died", task="upkeep", error=repr(exc))
            raise StartupError("task upkeep died; see the log") from exc
        side = [
            asyncio.create_task(mailer.run(), name="mailer"),
            asyncio.create_task(listener.run(), name="listener"),
            asyncio.create_task(worker.recorder.run(), name="recorder"),
            asyncio.create_task(clocksync.keep(pool, clock, outage), name="clock"),
            asyncio.create_task(upkeep.run(), name="upkeep"),
        ]
        work = asyncio.create_task(worker.run(), name="worker")
        stopping = asyncio.create_task(stop.wait(), name="stop")
        # What startup built (modules, pools, the app) lives as long as the process: out of
        # the collector's full passes, which scanned it all and paused the loop 35-70 ms
        # each, a dozen times in a bench burn-down (2-7 ms each now).
        gc.collect()
        gc.freeze()
        thresholds = gc.get_threshold()
        gc.set_threshold(_GC_YOUNG, *thresholds[1:])
        log.info("dispatcher.started", admin=admin_url, owner=str(worker.owner))
        if on_ready is not None:
            on_ready(Running(worker, admin_url, metrics))
        try:
            done, _ = await asyncio.wait(
                [stopping, work, *side], return_when=asyncio.FIRST_COMPLETED
            )
            crashed = [t for t in done if t is not stopping]
            for task in crashed:
                log.error(
                    "dispatcher.task_died",
                    task=task.get_name(),
                    error=repr(task.exception()) if not task.cancelled() else "cancelled",
                )
            log.info("dispatcher.stopping", in_flight=worker.in_flight)
            worker.stop()
            await asyncio.wait([work])
        finally:
            for task in (stopping, work, *side):
                task.cancel()
            await asyncio.gather(stopping, work, *side, return_exceptions=True)
            gc.set_threshold(*thresholds)
            gc.unfreeze()
        if crashed:
            raise StartupError(f"task {crashed[0].get_name()} died; see the log")
        log.info("dispatcher.stopped")


@asynccontextmanager
async def started(settings: Settings, *, clock: Clock | None = None) -> AsyncIterator[Running]:
    """Run the daemon in this event loop for the duration of the block (bench, tests)."""
    stop = asyncio.Event()
    ready: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, stop, clock=clock, on_ready=ready.set_result))
    try:
        waiters: list[asyncio.Future[Any]] = [ready, task]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        yield ready.result()
    finally:
        stop.set()
        await task
