"""The `dispatcher` command."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg
import orjson
import structlog

from . import config, logs
from .app import StartupError, apply_migrations, open_database, serve
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
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, stop)


async def _migrate(settings: config.Settings) -> None:
    async with AsyncExitStack() as stack:
        dsn = await open_database(stack, settings)
        applied = await apply_migrations(dsn)
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
        finally:
            await conn.close()
        print(orjson.dumps({"event_id": str(event_id), "deliveries": deliveries}).decode())


async def _bench(settings: config.Settings, args: argparse.Namespace) -> None:
    from . import bench

    if args.deliveries < 1 or args.concurrency < 1:
        raise StartupError("--deliveries and --concurrency must be positive")
    report = await bench.run(
        settings,
        deliveries=args.deliveries,
        concurrency=args.concurrency,
        database_url=args.database_url,
    )
    bench.print_report(report, args.json)


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
    bench = sub.add_parser("bench", help="measure deliveries/s against a plain HTTP client")
    bench.add_argument("--deliveries", type=int, default=20_000)
    bench.add_argument("--concurrency", type=int, default=256)
    bench.add_argument("--database-url", help="use this PostgreSQL instead of an embedded one")
    bench.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        settings = config.load(_config_path(getattr(args, "sub_config", None) or args.config))
    except config.ConfigError as exc:
        sys.exit(f"dispatcher: {exc}")
    logs.configure(settings.log.format, settings.log.level)
    commands: dict[str, Callable[[], Awaitable[None]]] = {
        "run": lambda: _run(settings),
        "migrate": lambda: _migrate(settings),
        "publish": lambda: _publish(settings, args),
        "bench": lambda: _bench(settings, args),
    }
    try:
        _event_loop_run(commands[args.command]())
    except (StartupError, EmbeddedError, MigrationError) as exc:
        log.error("dispatcher.failed", error=str(exc))
        sys.exit(f"dispatcher: {exc}")


def _event_loop_run(coro: Awaitable[None]) -> None:
    import uvloop

    uvloop.run(coro)  # type: ignore[arg-type]
