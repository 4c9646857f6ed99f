"""The `dispatcher` command."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg
import orjson
import structlog

from . import config, embedded, logs, sdnotify, tokens
from .app import (
    EMBEDDED_DATABASE,
    Running,
    StartupError,
    apply_migrations,
    open_database,
    serve,
)
from .embedded import EmbeddedError
from .migrate import MigrationError

log = structlog.get_logger(__name__)


def _config_path(arg: str | None) -> Path | None:
    """--config, else $DISPATCHER_CONFIG, else ./config.toml when present."""
    if arg:
        return Path(arg)
    if os.environ.get("DISPATCHER_CONFIG"):
        return Path(os.environ["DISPATCHER_CONFIG"])
    local = Path("config.toml")
    return local if local.is_file() else None


async def _run(settings: config.Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def request_stop() -> None:
        # STOPPING=1 before the drain: systemd shows "deactivating" instead of a hang while
        # in-flight requests finish within the grace period.
        sdnotify.stopping()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop)

    def ready(running: Running) -> None:
        # Type=notify: systemd reports the unit started once migrations ran and the admin
        # port listens.
        sdnotify.ready(f"admin on {running.admin_url}")

    await serve(settings, stop, on_ready=ready)


async def _status(settings: config.Settings) -> None:
    from . import status

    async with AsyncExitStack() as stack:
        dsn = await open_database(stack, settings)
        await apply_migrations(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            print(status.render(await status.collect(conn)), end="")
        finally:
            await conn.close()


async def _migrate(settings: config.Settings) -> None:
    async with AsyncExitStack() as stack:
        dsn = await open_database(stack, settings)
        # Also the limits PostgreSQL enforces for publishers: a database migrated by a deploy
        # step enforces the configured max_payload_bytes before any daemon starts.
        applied = await apply_migrations(dsn, settings)
        print(f"applied: {applied}" if applied else "up to date")


async def _publish(settings: config.Settings, args: argparse.Namespace) -> None:
    try:
        payload = orjson.loads(args.payload)
    except orjson.JSONDecodeError as exc:
        raise StartupError(f"--payload is not valid JSON: {exc}") from None
    async with AsyncExitStack() as stack:
        dsn = await open_database(stack, settings)
        await apply_migrations(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            event_id = await conn.fetchval(
                "SELECT dispatcher.publish($1, $2, $3::text::jsonb, $4, $5)",
                args.environment,
                args.event,
                orjson.dumps(payload).decode(),
                args.entity_instance_id,
                args.idempotency_key,
            )
            deliveries = await conn.fetchval(
                "SELECT count(*) FROM dispatcher.deliveries WHERE event_id = $1", event_id
            )
        except asyncpg.CheckViolationError as exc:
            raise StartupError(
                f"rejected: {exc.constraint_name}: event names look like "
                "entity.action.v0 and the environment may not be empty"
            ) from None
        except asyncpg.InvalidParameterValueError as exc:
            # The reserved entity `dispatcher` (sql/0008) says why in its message.
            raise StartupError(f"rejected: {exc}") from None
        finally:
            await conn.close()
        print(orjson.dumps({"event_id": str(event_id), "deliveries": deliveries}).decode())


async def _db_url(settings: config.Settings) -> None:
    """Print the database URL; starts nothing (the embedded server runs while a daemon does)."""
    if settings.database.url:
        print(settings.database.url)
        return
    base = Path(settings.embedded.data_dir)
    print(embedded.dsn_of(base, EMBEDDED_DATABASE))
    if embedded.running_pid(base) is None:
        print(
            f"dispatcher: the embedded server under {base} is not running: start "
            "`dispatcher run`, or use `dispatcher psql`, which starts it for the session",
            file=sys.stderr,
        )


async def _psql(settings: config.Settings, args: list[str]) -> None:
    """psql on the daemon's database (migrated); the embedded server stays up meanwhile."""
    async with AsyncExitStack() as stack:
        dsn = await open_database(stack, settings)
        await apply_migrations(dsn)
        loop = asyncio.get_running_loop()
        # Ctrl-C belongs to psql (it cancels a query there), not to us.
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        try:
            proc = await asyncio.create_subprocess_exec(str(embedded.psql_path()), dsn, *args)
            code = await proc.wait()
        finally:
            loop.remove_signal_handler(signal.SIGINT)
    if code:
        raise SystemExit(code)


async def _bench(settings: config.Settings, args: argparse.Namespace) -> None:
    from . import bench

    # A measurement: the daemon's info lines would cost CPU on the hot path and bury the table.
    logs.configure(settings.log.format, "warning")
    scenarios = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    unknown = sorted(set(scenarios) - set(bench.SCENARIOS))
    if unknown or not scenarios:
        raise StartupError(f"--scenarios: choose from {','.join(bench.SCENARIOS)}")
    sizes = (
        args.deliveries,
        args.concurrency,
        args.faulty_deliveries,
        args.retry_deliveries,
        args.memory_pending,
        args.memory_in_flight,
        args.ordered_deliveries,
    )
    if min(sizes) < 1 or args.steady_seconds <= 0:
        raise StartupError("bench sizes must be positive")
    plan = bench.Plan(
        scenarios=scenarios,
        deliveries=args.deliveries,
        concurrency=args.concurrency,
        steady_seconds=args.steady_seconds,
        faulty_deliveries=args.faulty_deliveries,
        retry_deliveries=args.retry_deliveries,
        memory_pending=args.memory_pending,
        memory_in_flight=args.memory_in_flight,
        ordered_deliveries=args.ordered_deliveries,
        daemon=args.daemon,
    )
    try:
        report = await bench.run(
            settings, plan, database_url=args.database_url, progress=sys.stderr.isatty()
        )
    except bench.BenchError as exc:
        raise StartupError(str(exc)) from None
    bench.print_report(report, args.json)


async def _token_create(settings: config.Settings, args: argparse.Namespace) -> None:
    if not args.environment.strip():
        raise StartupError("--environment must not be empty")
    async with AsyncExitStack() as stack:
        dsn = await open_database(stack, settings)
        await apply_migrations(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            token = await tokens.create(conn, args.environment, args.name)
        finally:
            await conn.close()
    # Shown once: only its hash is stored.
    print(token)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dispatcher", description=__doc__)
    parser.add_argument(
        "--config", help="config file (default: $DISPATCHER_CONFIG or ./config.toml)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)
    sub.add_parser("migrate", help="apply database migrations and exit")
    pub = sub.add_parser("publish", help="publish one event")
    pub.add_argument("event", help="event name, e.g. products.create.v0")
    pub.add_argument("--environment", required=True)
    pub.add_argument("--payload", required=True, help="the event's JSON payload")
    pub.add_argument("--entity-instance-id")
    pub.add_argument("--idempotency-key")
    sub.add_parser("status", help="queue, last hour's outcomes, failing subscriptions")
    sub.add_parser("db-url", help="print the database URL (the embedded server's when embedded)")
    sub.add_parser(
        "psql", help="open psql on the database; arguments after it go to psql (e.g. -c SQL)"
    )
    token = sub.add_parser("token", help="manage API tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="create a token for one environment")
    create.add_argument("--environment", required=True)
    create.add_argument("--name", help="what the token is for")
    bench = sub.add_parser(
        "bench",
        help="measure deliveries/s against a plain HTTP client, and the targets",
        description="Scenarios: burn (a backlog burnt down, against the ceiling of a plain "
        "aiohttp client), steady (half the ceiling's rate: lag), faulty (10% of endpoints "
        "answer 500, 1% hang), retries (retries due in bulk: how late), memory (optional, "
        "longer: RSS with 1M pending and 1,000 in flight), ordered (optional: an entity-ordered "
        "burn-down over 1,000 entities against unordered ones), large (optional: the daemon's "
        "peak RSS sending 100 payloads of 10 MB published in one statement). Loopback only.",
    )
    bench.add_argument(
        "--scenarios",
        default="burn,steady,faulty,retries",
        help="comma-separated, of burn,steady,faulty,retries,memory,ordered,large "
        "(default: all but memory, ordered and large)",
    )
    bench.add_argument("--deliveries", type=int, default=50_000, help="burn-down backlog")
    bench.add_argument("--concurrency", type=int, default=256)
    bench.add_argument("--steady-seconds", type=float, default=10.0)
    bench.add_argument("--faulty-deliveries", type=int, default=12_000, help="per run (five runs)")
    bench.add_argument("--retry-deliveries", type=int, default=2_000)
    bench.add_argument(
        "--ordered-deliveries", type=int, default=50_000, help="per ordered-scenario run"
    )
    bench.add_argument("--memory-pending", type=int, default=1_000_000)
    bench.add_argument("--memory-in-flight", type=int, default=1_000)
    bench.add_argument(
        "--database-url",
        help="run against this PostgreSQL instead of an embedded one: the bench creates a "
        "scratch database there and drops it after (without CREATEDB: the dispatcher schema "
        "in the given database, only if it has none)",
    )
    bench.add_argument(
        "--daemon",
        choices=("inprocess", "process"),
        default="inprocess",
        help="burn-down: the daemon in the bench's process with its concurrency set to "
        "--concurrency (default), or a separate `dispatcher run` with default settings",
    )
    bench.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "psql":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    path = _config_path(getattr(args, "sub_config", None) or args.config)
    try:
        settings = config.load(path)
    except config.ConfigError as exc:
        sys.exit(f"dispatcher: {exc}")
    if not settings.database.url and not settings.embedded.data_dir:
        # Resolved here, once, so that the daemon and every command agree on it.
        data_dir = str(embedded.default_data_dir(embedded.anchor_of(path)))
        settings = dataclasses.replace(
            settings, embedded=dataclasses.replace(settings.embedded, data_dir=data_dir)
        )
    logs.configure(settings.log.format, settings.log.level)
    commands: dict[str, Callable[[], Awaitable[None]]] = {
        "run": lambda: _run(settings),
        "migrate": lambda: _migrate(settings),
        "publish": lambda: _publish(settings, args),
        "bench": lambda: _bench(settings, args),
        "token": lambda: _token_create(settings, args),
        "status": lambda: _status(settings),
        "db-url": lambda: _db_url(settings),
        "psql": lambda: _psql(settings, extra),
    }
    try:
        _event_loop_run(commands[args.command]())
    except (StartupError, EmbeddedError, MigrationError) as exc:
        log.error("dispatcher.failed", error=str(exc))
        sys.exit(f"dispatcher: {exc}")


def _event_loop_run(coro: Awaitable[None]) -> None:
    import uvloop

    uvloop.run(coro)  # type: ignore[arg-type]
