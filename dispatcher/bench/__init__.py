"""`dispatcher bench`: the daemon against a plain HTTP client, and its targets, in one run.

It starts an embedded PostgreSQL with durable settings (or, given `--database-url`, creates
a scratch database on that server and drops it after) and a raw-protocol receiver on
127.0.0.1 in its own process, whose own cost per request is a few microseconds. The ceiling
posts the same body with a plain aiohttp client and nothing else; each scenario (a module of
this package) publishes in SQL and lets the real daemon code claim, sign, send and record:
in this process, or for the burn-down optionally as a separate `dispatcher run` with default
settings (`--daemon process`). Loopback only; the default run stays under two minutes on a
2-core machine.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from itertools import zip_longest
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import asyncpg
import orjson

from .. import config
from ..app import EMBEDDED_DATABASE, apply_migrations
from ..embedded import EmbeddedPostgres
from ..envelope import Message, render
from . import burn, ceiling, faulty, kit, large, memory, ordered, receiver, retries, steady
from .cpu import postmaster_of

SCENARIOS = ("burn", "steady", "faulty", "retries", "memory", "ordered", "large")
DEFAULT_SCENARIOS = ("burn", "steady", "faulty", "retries")
DAEMON_MODES = burn.DAEMON_MODES


class BenchError(RuntimeError):
    """The bench cannot run as asked (the message says why); nothing was changed."""


@dataclass(frozen=True, slots=True)
class Plan:
    """Sizes of one run; the defaults keep it under two minutes on 2 cores."""

    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    deliveries: int = 50_000  # the burn-down's backlog (and the ceiling's POSTs)
    concurrency: int = 256
    steady_seconds: float = 10.0
    faulty_deliveries: int = 12_000  # per run (five runs)
    faulty_endpoints: int = 100
    retry_deliveries: int = 2_000
    memory_pending: int = 1_000_000
    memory_in_flight: int = 1_000
    memory_seconds: float = 10.0
    ordered_deliveries: int = 50_000  # per run (three runs: unordered, ordered, unordered)
    ordered_entities: int = 1_000
    large_events: int = 100  # published in one statement
    large_payload_bytes: int = 10_000_000
    # How the burn-down runs the daemon: in this process, or as `dispatcher run` (defaults).
    daemon: str = "inprocess"


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    value: float | None
    limit: str
    met: bool | None  # None: not measured in this run


@dataclass(frozen=True, slots=True)
class Report:
    machine: dict[str, Any]
    plan: dict[str, Any]
    wall_seconds: float
    ceiling: ceiling.Ceiling | None = None
    burn: burn.Burn | None = None
    steady: steady.Steady | None = None
    faulty: faulty.Faulty | None = None
    retries: retries.Retries | None = None
    memory: memory.Memory | None = None
    ordered: ordered.Ordered | None = None
    large: large.Large | None = None
    targets: list[Target] = field(default_factory=list)
    # The server measured: where it runs, its version and durability settings, and the
    # scratch database (or schema) the run used.
    database: dict[str, Any] = field(default_factory=dict)


def _machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


async def run(
    base_settings: config.Settings,
    plan: Plan,
    *,
    database_url: str | None = None,
    progress: bool = False,
) -> Report:
    """Run the plan's scenarios; the daemon uses `base_settings` (the config) but for where
    it connects, listens and may send, and its concurrency."""
    unknown = set(plan.scenarios) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenarios: {sorted(unknown)}; choose from {SCENARIOS}")
    if plan.daemon not in DAEMON_MODES:
        raise ValueError(f"unknown daemon mode: {plan.daemon}; choose from {DAEMON_MODES}")
    wall = time.perf_counter()
    async with AsyncExitStack() as stack:
        if database_url:
            if progress:
                sys.stderr.write("creating a scratch database...\r")
            dsn, scratch = await _scratch(stack, database_url)
            where = "external"
        else:
            base = Path(tempfile.mkdtemp(prefix="dispatcher-bench-"))
            stack.callback(shutil.rmtree, base, True)
            # Durable, as a user's server runs: fsync, synchronous_commit and
            # full_page_writes stay on (fast_unsafe is for the test suite's clusters).
            server = EmbeddedPostgres(base, fast_unsafe=False)
            if progress:
                sys.stderr.write("starting an embedded PostgreSQL...\r")
            admin = await asyncio.to_thread(server.start)
            stack.callback(server.stop)
            conn = await asyncpg.connect(admin)
            await conn.execute(f'CREATE DATABASE "{EMBEDDED_DATABASE}"')
            await conn.close()
            dsn = server.dsn(EMBEDDED_DATABASE)
            scratch = {"scratch": f"a throwaway embedded cluster, database {EMBEDDED_DATABASE}"}
            where = "embedded"

        mp = multiprocessing.get_context("spawn")
        ports: Queue[int] = mp.Queue()
        listener = mp.Process(target=receiver_main, args=(ports,), daemon=True)
        listener.start()
        stack.callback(listener.join, 10)
        stack.callback(listener.terminate)
        port = await asyncio.to_thread(ports.get, True, 30)

        settings = replace(
            base_settings,
            database=replace(base_settings.database, url=dsn),
            admin=replace(base_settings.admin, listen="127.0.0.1:0"),
            security=config.SecuritySettings(allow_private_networks=True, allow_http=True),
            # Hanging endpoints time out within seconds; a stop never waits long for them.
            delivery=replace(base_settings.delivery, grace_period=3.0),
            log=config.LogSettings(format="json", level="warning"),
        )
        # Migrations first, so the bench's connection sees the schema.
        await apply_migrations(dsn)
        conn = await asyncpg.connect(dsn)
        stack.push_async_callback(conn.close)
        ctx = kit.Context(
            settings,
            f"http://127.0.0.1:{port}",
            conn,
            plan.concurrency,
            kit.Progress(progress),
        )
        # In a scratch schema of someone's database, create no extension there.
        ctx.statements = await kit.statements_ready(conn, create="schema" not in scratch["scratch"])
        ctx.receiver_pid = listener.pid
        ctx.postmaster = await postmaster_of(conn)
        database = {"server": where, **scratch, **await _server_settings(conn)}
        database["pg_stat_statements"] = ctx.statements
        results: dict[str, Any] = {}
        chosen = set(plan.scenarios)
        if "burn" in chosen:
            half = max(1, plan.deliveries // 2)
            before = await ceiling.ceiling(ctx, _body(), half)
            burned = await burn.burn(ctx, plan.deliveries, plan.daemon)
            after = await ceiling.ceiling(ctx, _body(), max(1, plan.deliveries - half))
            results["ceiling"] = ceiling.both_sides(before, after)
            results["burn"] = replace(
                burned, ratio_to_ceiling=round(burned.per_s / results["ceiling"].per_s, 3)
            )
        elif "steady" in chosen:
            results["ceiling"] = await ceiling.ceiling(ctx, _body(), plan.deliveries)
        if "steady" in chosen:
            rate = results["ceiling"].per_s / 2
            results["steady"] = await steady.steady(ctx, rate, plan.steady_seconds)
        if "faulty" in chosen:
            results["faulty"] = await faulty.faulty(
                ctx, plan.faulty_deliveries, endpoints=plan.faulty_endpoints
            )
        if "retries" in chosen:
            results["retries"] = await retries.retries(ctx, plan.retry_deliveries)
        if "memory" in chosen:
            results["memory"] = await memory.memory(
                ctx, plan.memory_pending, plan.memory_in_flight, plan.memory_seconds
            )
        if "ordered" in chosen:
            results["ordered"] = await ordered.ordered(
                ctx, plan.ordered_deliveries, plan.ordered_entities
            )
        if "large" in chosen:
            results["large"] = await large.large(ctx, plan.large_events, plan.large_payload_bytes)
    report = Report(
        machine=_machine(),
        plan=asdict(plan),
        wall_seconds=round(time.perf_counter() - wall, 1),
        database=database,
        **results,
    )
    return replace(report, targets=targets(report))


receiver_main = receiver.serve


async def _scratch(stack: AsyncExitStack, url: str) -> tuple[str, dict[str, str]]:
    """A scratch database on the server at `url`, dropped when the stack closes; the bench
    writes nowhere else. A role that may not create databases gets the `dispatcher` schema
    in the given database instead, dropped after, but only where there is none yet: a
    database that already holds one is someone's, and the bench refuses to touch it."""
    parts = urlsplit(url)
    if "://" not in url or not parts.scheme.startswith("postgres"):
        raise BenchError("--database-url must be a postgresql://user@host:port/database URL")
    name = f"dispatcher_bench_{uuid4().hex[:12]}"
    try:
        conn = await asyncpg.connect(url)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
        raise BenchError(f"--database-url: cannot connect to {where}: {exc}") from None
    try:
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        except asyncpg.InsufficientPrivilegeError:
            if await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = 'dispatcher'"):
                raise BenchError(
                    "--database-url: this role may not create databases and the database "
                    "already has a dispatcher schema; the bench will not touch it (grant "
                    "CREATEDB, or give an empty database)"
                ) from None
            stack.push_async_callback(_drop_schema, url)
            return url, {"scratch": "schema dispatcher in the given database (no CREATEDB)"}
    finally:
        await conn.close()
    stack.push_async_callback(_drop_database, url, name)
    return urlunsplit(parts._replace(path=f"/{name}")), {"scratch": f"database {name}"}


async def _drop_database(url: str, name: str) -> None:
    """Drop the scratch database, whoever is still connected to it.

    FORCE ends a daemon connection still closing. But it refuses outright when one of the
    database's backends belongs to a role this one may not signal, and an autovacuum worker
    is such a backend to a role that is not a superuser (seen on Debian's PostgreSQL 15
    after a burn-down: the scratch database stayed behind). A plain DROP stops autovacuum
    workers itself and waits up to 5 s for other sessions to leave."""
    conn = await asyncpg.connect(url)
    try:
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except asyncpg.InsufficientPrivilegeError:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await conn.close()


async def _drop_schema(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DROP SCHEMA IF EXISTS dispatcher CASCADE")
    finally:
        await conn.close()


_SHOWN = ("fsync", "synchronous_commit", "full_page_writes", "wal_level", "shared_buffers")


async def _server_settings(conn: asyncpg.Connection) -> dict[str, Any]:
    """The server's version and the settings that decide what a commit costs."""
    found: dict[str, Any] = {"version": await conn.fetchval("/*bench*/ SHOW server_version")}
    for name in _SHOWN:
        found[name] = await conn.fetchval(f"/*bench*/ SHOW {name}")
    return found


def _body() -> bytes:
    """What the daemon sends for one bench event (the standard envelope)."""
    return render(
        "standard",
        Message(
            0,
            uuid4(),
            uuid4(),
            "products.update.v0",
            "bench",
            None,
            datetime.now(UTC),
            kit.BURN_PAYLOAD_TEXT,
        ),
        time.time_ns(),
    )


def targets(r: Report) -> list[Target]:
    """The issue's targets, each met, not met, or not measured (None) in this run."""

    def at_least(name: str, value: float | None, limit: float, shown: str) -> Target:
        return Target(name, value, shown, None if value is None else value >= limit)

    def at_most(name: str, value: float | None, limit: float, shown: str) -> Target:
        return Target(name, value, shown, None if value is None else value <= limit)

    stmts = r.burn.statements_per_delivery if r.burn else None
    return [
        at_least(
            "burn: dispatcher / ceiling deliveries/s",
            r.burn.ratio_to_ceiling if r.burn else None,
            0.9,
            ">= 0.9",
        ),
        at_least(
            "burn: dispatcher / ceiling, durable PostgreSQL (issue 17)",
            r.burn.ratio_to_ceiling if r.burn else None,
            1.2,
            ">= 1.2",
        ),
        at_most(
            "burn: daemon CPU us per delivery",
            r.burn.daemon_cpu_us_per_delivery if r.burn else None,
            60,
            "<= 60",
        ),
        at_most(
            "burn: PostgreSQL CPU us per delivery, burn-down (publish apart)",
            r.burn.postgres_burn_cpu_us_per_delivery if r.burn else None,
            40,
            "<= 40",
        ),
        at_most("burn: SQL statements per delivery", stmts, 0.02, "<= 0.02"),
        Target(
            "steady at half load: p99 due-to-send lag, ms",
            r.steady.lag_p99_ms if r.steady else None,
            "< 100",
            None if r.steady is None or r.steady.lag_p99_ms is None else r.steady.lag_p99_ms < 100,
        ),
        at_most(
            "retries in bulk: p99 ms late after due",
            r.retries.late_p99_ms if r.retries else None,
            50,
            "<= 50",
        ),
        at_least(
            "faulty: healthy deliveries/s vs all-healthy run",
            r.faulty.ratio if r.faulty else None,
            0.9,
            ">= 0.9",
        ),
        # Retention drops whole days (keep_days >= 1): not observable within a bench run.
        Target("tables stop growing once retention applies", None, "see test_retention", None),
        Target(
            "memory: RSS MB with 1M pending, 1,000 in flight",
            r.memory.rss_peak_mb if r.memory else None,
            "< 250",
            None if r.memory is None else r.memory.rss_peak_mb < 250,
        ),
        at_least(
            "ordered: entity-ordered / unordered deliveries/s",
            r.ordered.ratio if r.ordered else None,
            0.8,
            ">= 0.8",
        ),
        at_most(
            "large: daemon peak RSS MB, 100 payloads of 10 MB in one statement",
            r.large.rss_peak_mb if r.large else None,
            300,
            "<= 300",
        ),
    ]


def _split(*values: float | None) -> str:
    """'a / b / c = total', '-' for what was not measured."""
    shown = ["-" if v is None else f"{v:g}" for v in values]
    return " / ".join(shown[:-1]) + " = " + shown[-1]


def _daemon(b: burn.Burn) -> str:
    s = b.daemon_settings
    how = "`dispatcher run`, defaults" if b.daemon == "process" else "in the bench's process"
    extra = ""
    if b.bench_cpu_us_per_delivery is not None:
        extra = f", bench polling {b.bench_cpu_us_per_delivery:g} us/delivery"
    return (
        f"{how} (max_in_flight {s.get('max_in_flight')}, "
        f"max_per_endpoint {s.get('max_per_endpoint')}{extra})"
    )


def _server(d: dict[str, Any]) -> str:
    if not d:
        return "-"
    return (
        f"{d.get('server')} PostgreSQL {d.get('version')}, fsync {d.get('fsync')}, "
        f"synchronous_commit {d.get('synchronous_commit')}, "
        f"full_page_writes {d.get('full_page_writes')}"
    )


def _rows(r: Report) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("PostgreSQL", _server(r.database)),
        ("concurrency", r.plan["concurrency"]),
    ]
    if r.ceiling:
        rows += [
            ("ceiling: plain aiohttp client, POST/s", r.ceiling.per_s),
            (
                "ceiling: before / after the burn-down, POST/s",
                " / ".join(f"{v:g}" for v in r.ceiling.halves_per_s) or "-",
            ),
            ("ceiling: client CPU s per POST", r.ceiling.cpu_seconds_per_post),
            ("ceiling: receiver CPU us per POST", r.ceiling.receiver_cpu_us_per_post),
            (
                "ceiling: CPU us per POST, client / PostgreSQL / receiver = total",
                _split(
                    r.ceiling.client_cpu_us_per_post,
                    r.ceiling.postgres_cpu_us_per_post,
                    r.ceiling.receiver_cpu_us_per_post,
                    r.ceiling.total_cpu_us_per_post,
                ),
            ),
        ]
    if b := r.burn:
        rows += [
            ("burn: daemon", _daemon(b)),
            ("burn: deliveries", f"{b.deliveries} (payload {b.payload_bytes} B)"),
            ("burn: publish + fan-out, s", b.publish_seconds),
            ("burn: dispatcher deliveries/s", b.per_s),
            ("burn: ratio to ceiling", b.ratio_to_ceiling),
            ("burn: commit to last delivery, s", b.commit_to_last_s),
            ("burn: commit to first delivery, ms", b.first_delivery_ms),
            (
                "burn: ramp, commit to within 10% of peak rate, s (peak/s)",
                f"{b.ramp_s} ({b.peak_per_s})",
            ),
            ("burn: commit to every outcome recorded, s", b.drain_seconds),
            ("burn: due-to-send lag p50 / p99, ms", f"{b.lag_p50_ms} / {b.lag_p99_ms}"),
            ("burn: SQL statements per delivery", b.statements_per_delivery),
            ("burn: WAL bytes per delivery (incl. publish)", b.wal_bytes_per_delivery),
            (
                "burn: WAL bytes per delivery, publish + burn-down",
                f"{b.wal_publish_bytes_per_delivery} + {b.wal_burn_bytes_per_delivery}",
            ),
            ("burn: dispatcher CPU s per delivery", b.cpu_seconds_per_delivery),
            (
                "burn: PostgreSQL / receiver CPU us per delivery",
                f"{b.postgres_cpu_us_per_delivery} / {b.receiver_cpu_us_per_delivery}",
            ),
            (
                "burn: PostgreSQL CPU us per delivery, publish + burn-down",
                f"{b.postgres_publish_cpu_us_per_delivery} + {b.postgres_burn_cpu_us_per_delivery}",
            ),
            (
                "burn: CPU us per delivery, daemon / PostgreSQL / receiver = total",
                _split(
                    b.daemon_cpu_us_per_delivery,
                    b.postgres_cpu_us_per_delivery,
                    b.receiver_cpu_us_per_delivery,
                    b.total_cpu_us_per_delivery,
                ),
            ),
            ("burn: mean claim / record statement, ms", f"{b.claim_mean_ms} / {b.record_mean_ms}"),
            (f"burn: mean requests in flight (of {r.plan['concurrency']})", b.mean_in_flight),
            ("burn: peak RSS, MB", b.peak_rss_mb),
            (
                "burn: RSS idle before / after the burn-down, MB",
                f"{b.rss_idle_mb} / {b.rss_after_mb}",
            ),
        ]
        for table in kit.TABLES:
            rows.append(
                (
                    f"burn: {table} kB before -> after",
                    f"{b.tables_before_kb[table]:,} -> {b.tables_after_kb[table]:,}",
                )
            )
    if s := r.steady:
        rows += [
            ("steady: target / achieved deliveries/s", f"{s.target_per_s} / {s.achieved_per_s}"),
            (
                "steady: lag p50 / p99 / max, ms",
                f"{s.lag_p50_ms} / {s.lag_p99_ms} / {s.lag_max_ms}",
            ),
            ("steady: SQL statements per delivery", s.statements_per_delivery),
            ("steady: dispatcher CPU s per delivery", s.cpu_seconds_per_delivery),
        ]
    if f := r.faulty:
        rows += [
            (
                "faulty: endpoints (failing / hanging)",
                f"{f.endpoints} ({f.failing_endpoints} / {f.hanging_endpoints})",
            ),
            (
                "faulty: endpoints healthy in every run, deliveries/s (healthy runs' mean)",
                f.healthy_run_per_s,
            ),
            (
                "faulty: each run, healthy / faulty / ..., deliveries/s",
                " / ".join(
                    str(x)
                    for pair in zip_longest(f.healthy_runs_per_s, f.faulty_runs_per_s)
                    for x in pair
                    if x is not None
                ),
            ),
            (
                "faulty: endpoints healthy in every run, deliveries/s (faulty runs' mean)",
                f.faulty_run_healthy_per_s,
            ),
            ("faulty: ratio", f.ratio),
            (
                "faulty: answered 500 / timed out (both faulty runs)",
                f"{f.answered_500} / {f.timed_out}",
            ),
        ]
    if t := r.retries:
        rows += [
            ("retries: retried (delay s)", f"{t.retried} ({t.delay_s})"),
            (
                "retries: late after due p50 / p99 / max, ms",
                f"{t.late_p50_ms} / {t.late_p99_ms} / {t.late_max_ms}",
            ),
            ("retries: fired early", t.early),
        ]
    if m := r.memory:
        rows += [
            ("memory: pending / in flight (seen)", f"{m.pending:,} / {m.max_in_flight_seen}"),
            ("memory: RSS before / peak, MB", f"{m.rss_before_mb} / {m.rss_peak_mb}"),
        ]
    if g := r.large:
        rows += [
            (
                "large: events x MB (claim_bytes), seconds",
                f"{g.events} x {g.payload_mb} ({g.claim_bytes:,}), {g.seconds}",
            ),
            ("large: daemon peak RSS, MB", g.rss_peak_mb),
        ]
    if o := r.ordered:
        rows += [
            ("ordered: deliveries per run (entities)", f"{o.deliveries:,} ({o.entities:,})"),
            (
                "ordered: unordered / ordered / unordered deliveries/s",
                " / ".join(f"{p.per_s:g}" for p in o.runs),
            ),
            ("ordered: ratio to unordered", o.ratio),
            (
                "ordered: mean claim / record / record-and-release statement, ms (each run)",
                " | ".join(
                    f"{p.claim_mean_ms} / {p.record_mean_ms} / {p.record_heads_mean_ms}"
                    for p in o.runs
                ),
            ),
        ]
    rows.append(("wall time, s", r.wall_seconds))
    return rows


def print_report(report: Report, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(asdict(report)).decode() + "\n")
        return
    rows = _rows(report)
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}}  value")
    print(f"{'-' * width}  {'-' * 20}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print()
    marks = {True: "met", False: "NOT MET", None: "not measured"}
    width = max(len(t.name) for t in report.targets)
    print(f"{'target':<{width}}  {'value':>10}  {'goal':<18}  result")
    for t in report.targets:
        value = "-" if t.value is None else f"{t.value:g}"
        print(f"{t.name:<{width}}  {value:>10}  {t.limit:<18}  {marks[t.met]}")
