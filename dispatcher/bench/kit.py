"""What the bench's scenarios share: the context, the cost meter, the receiver's counters,
and helpers to subscribe, publish, drain and measure.

Every statement the bench itself runs starts with `/*bench*/`, so pg_stat_statements can
count the daemon's statements alone.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from .. import config
from ..signing import new_secret
from .cpu import process_seconds, server_seconds

PAYLOAD = {"id": "p-1", "sku": "COFFEE-250G", "name": "Premium Coffee Beans", "price": 12.5}
PAYLOAD_TEXT = orjson.dumps(PAYLOAD).decode()
# The burn-down's (and the ceiling's) event: about 1 KB of JSON, the size of a product update
# a shop sends, so that per-byte costs (signing, WAL, the socket) weigh as they do for users.
# The other scenarios keep the small one: the memory scenario publishes a million.
BURN_PAYLOAD = {
    **PAYLOAD,
    "currency": "EUR",
    "stock": 148,
    "tags": ["coffee", "beans", "arabica", "fair-trade", "organic"],
    "description": (
        "Whole arabica beans from a single estate, roasted medium-dark in small batches "
        "and packed within a day of roasting. Notes of cocoa, hazelnut and a little citrus; "
        "made for espresso, good in a filter. Keep sealed, away from light and heat, and "
        "grind just before brewing for the best cup. "
    )
    * 2,
    "origin": {"country": "Ethiopia", "region": "Yirgacheffe", "altitude_m": 1900},
    "variants": [{"sku": f"COFFEE-250G-{g}", "grind": g, "price": 12.5} for g in ("whole", "fine")],
}
BURN_PAYLOAD_TEXT = orjson.dumps(BURN_PAYLOAD).decode()
TAG = "/*bench*/ "


# Progress ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Progress:
    """One updating line on stderr (people only; off under tests)."""

    enabled: bool
    _width: int = 0

    def show(self, text: str) -> None:
        if self.enabled:
            pad = max(self._width - len(text), 0)
            sys.stderr.write("\r" + text + " " * pad)
            sys.stderr.flush()
            self._width = len(text)

    def done(self) -> None:
        if self.enabled and self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
            self._width = 0


# Shared context and measurements -----------------------------------------------------------------


@dataclass(slots=True)
class Context:
    settings: config.Settings  # the daemon's, already pointed at the bench's database
    base_url: str  # http://127.0.0.1:PORT
    conn: asyncpg.Connection  # the bench's own connection
    concurrency: int
    progress: Progress
    statements: bool = True  # pg_stat_statements available
    receiver_pid: int | None = None
    postmaster: int | None = None  # the PostgreSQL server's main process, when it runs here

    def other_cpu(self) -> tuple[float | None, float | None]:
        """CPU seconds so far of the PostgreSQL server and of the receiver (None: unknown)."""
        server = None if self.postmaster is None else server_seconds(self.postmaster)
        receiver = None if self.receiver_pid is None else process_seconds(self.receiver_pid)
        return server, receiver


TABLES = ("deliveries", "deliveries_done", "attempts", "events")


@dataclass(frozen=True, slots=True)
class Costs:
    """What the database, the daemon, the receiver and the bench spent during a phase."""

    statements: int | None
    wal_bytes: int
    cpu_seconds: float  # the daemon's: this process's, or the `dispatcher run` process's
    postgres_cpu_seconds: float | None
    receiver_cpu_seconds: float | None
    peak_rss_mb: float
    tables_before_kb: dict[str, int]
    tables_after_kb: dict[str, int]
    # This process's own CPU when the daemon runs in another one (None in-process: then the
    # bench's few queries are inside cpu_seconds).
    bench_cpu_seconds: float | None = None
    # Of the totals, what was spent before Meter.mark() (the burn-down: its publish).
    postgres_cpu_seconds_before_mark: float | None = None
    wal_bytes_before_mark: int | None = None


async def table_sizes(conn: asyncpg.Connection) -> dict[str, int]:
    """Each table's size in kB, partitions and indexes included."""
    sizes: dict[str, int] = {}
    for name in TABLES:
        size = await conn.fetchval(
            TAG + "SELECT coalesce(sum(pg_total_relation_size(relid)), 0) "
            "FROM pg_partition_tree($1::regclass)",
            f"dispatcher.{name}",
        )
        sizes[name] = int(size) // 1024
    return sizes


async def statements_ready(conn: asyncpg.Connection, *, create: bool = True) -> bool:
    """Whether pg_stat_statements counts here (a stock server does not preload it)."""
    try:
        if create:
            await conn.execute(TAG + "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute(TAG + "SELECT pg_stat_statements_reset()")
    except asyncpg.PostgresError:
        return False
    return True


class Meter:
    """Opens a measured span: statements, WAL, CPU of the daemon (this process, or
    `daemon_pid`), of PostgreSQL and of the receiver, table sizes."""

    def __init__(self, ctx: Context, daemon_pid: int | None = None) -> None:
        self._ctx = ctx
        self._daemon_pid = daemon_pid
        self._lsn = ""
        self._cpu = 0.0
        self._daemon = 0.0
        self._others: tuple[float | None, float | None] = (None, None)
        self._tables: dict[str, int] = {}
        self._marked: tuple[float | None, int] | None = None

    async def start(self) -> None:
        conn = self._ctx.conn
        self._tables = await table_sizes(conn)
        if self._ctx.statements:
            await conn.execute(TAG + "SELECT pg_stat_statements_reset()")
        # The insert position: with synchronous_commit off, the write position can lag behind.
        self._lsn = await conn.fetchval(TAG + "SELECT pg_current_wal_insert_lsn()::text")
        self._cpu = time.process_time()
        self._daemon = self._daemon_seconds()
        self._others = self._ctx.other_cpu()

    async def mark(self) -> None:
        """Split the span here: PostgreSQL's CPU and the WAL so far are reported apart."""
        postgres, _ = _spent(self._others, self._ctx.other_cpu())
        wal = await self._ctx.conn.fetchval(
            TAG + "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::text::pg_lsn)", self._lsn
        )
        self._marked = (postgres, int(wal))

    def _daemon_seconds(self) -> float:
        if self._daemon_pid is None:
            return time.process_time()
        return process_seconds(self._daemon_pid) or 0.0

    async def stop(self) -> Costs:
        daemon = self._daemon_seconds() - self._daemon
        cpu = time.process_time() - self._cpu
        postgres, receiver = _spent(self._others, self._ctx.other_cpu())
        conn = self._ctx.conn
        wal = await conn.fetchval(
            TAG + "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::text::pg_lsn)", self._lsn
        )
        statements = None
        if self._ctx.statements:
            statements = await conn.fetchval(
                TAG + "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND query NOT LIKE '/*bench*/%'"
            )
        return Costs(
            statements=statements,
            wal_bytes=int(wal),
            cpu_seconds=daemon,
            postgres_cpu_seconds=postgres,
            receiver_cpu_seconds=receiver,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            tables_before_kb=self._tables,
            tables_after_kb=await table_sizes(conn),
            bench_cpu_seconds=None if self._daemon_pid is None else cpu,
            postgres_cpu_seconds_before_mark=None if self._marked is None else self._marked[0],
            wal_bytes_before_mark=None if self._marked is None else self._marked[1],
        )


def _spent(
    before: tuple[float | None, float | None], after: tuple[float | None, float | None]
) -> tuple[float | None, float | None]:
    return (
        None if before[0] is None or after[0] is None else after[0] - before[0],
        None if before[1] is None or after[1] is None else after[1] - before[1],
    )


def per(total: float | None, count: int) -> float | None:
    """Microseconds per item."""
    return None if total is None or count <= 0 else round(total / count * 1e6, 1)


def daemon_settings(ctx: Context, *, in_flight: int, per_endpoint: int) -> config.Settings:
    s = ctx.settings
    return replace(
        s, delivery=replace(s.delivery, max_in_flight=in_flight, max_per_endpoint=per_endpoint)
    )


async def subscribe(
    ctx: Context, environment: str, path: str, settings: dict[str, Any] | None = None
) -> None:
    await ctx.conn.execute(
        TAG
        + "INSERT INTO dispatcher.subscriptions (environment_id, url, events, secret, settings) "
        "VALUES ($1, $2, '{products.*}', $3, $4::text::jsonb)",
        environment,
        f"{ctx.base_url}{path}",
        new_secret(),
        orjson.dumps(settings or {}).decode(),
    )


async def publish(ctx: Context, environments: list[str], count: int) -> None:
    """`count` events, spread round-robin over `environments`, in one transaction."""
    await ctx.conn.execute(
        TAG + "INSERT INTO dispatcher.events (environment_id, event_name, payload) "
        "SELECT ($1::text[])[1 + g % cardinality($1::text[])], 'products.update.v0', "
        "$2::text::jsonb FROM generate_series(1, $3) g",
        environments,
        PAYLOAD_TEXT,
        count,
    )


async def publish_calls(ctx: Context, environment: str, count: int, payload: str) -> float:
    """`count` events published the way a service does, `dispatcher.publish(...)` per event,
    all in one `SELECT ... FROM generate_series(...)` (one transaction); returns the
    monotonic time when the bench got the commit's answer. The daemon sees the commit as soon
    as the server makes it, so on a loaded host its first request can precede this by the
    few ms the answer took to reach the bench (a negative time to first delivery)."""
    await ctx.conn.execute(
        TAG + "SELECT dispatcher.publish($1, 'products.update.v0', $2::text::jsonb) "
        "FROM generate_series(1, $3)",
        environment,
        payload,
        count,
    )
    return time.monotonic()


async def pending(ctx: Context, environments: list[str]) -> int:
    n: int = await ctx.conn.fetchval(
        TAG + "SELECT count(*) FROM dispatcher.deliveries "
        "WHERE environment_id = ANY($1::text[]) AND NOT paused",
        environments,
    )
    return n


async def drain(
    ctx: Context, label: str, environments: list[str], total: int, timeout: float
) -> float:
    """Wait until the environments have no live delivery; the wall time it took."""
    begun = time.perf_counter()
    deadline = begun + timeout
    while True:
        left = await pending(ctx, environments)
        elapsed = time.perf_counter() - begun
        done = total - left
        ctx.progress.show(f"[{label}] {done:,}/{total:,} sent, {done / max(elapsed, 1e-9):,.0f}/s")
        if left == 0:
            return time.perf_counter() - begun
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{label}: {left} deliveries still pending after {timeout:.0f} s")
        # The count scans the queue: asked 20 times a second, it alone took a tenth of a core
        # from the Postgres being measured. Ask about four times before the expected end.
        if done == 0:
            await asyncio.sleep(0.05)  # no rate to go by yet
            continue
        rate = done / max(elapsed, 1e-9)
        await asyncio.sleep(min(1.0, max(0.05, left / rate / 4)))


async def forget(ctx: Context, environments: list[str]) -> None:
    """Drop the scenario's subscriptions (and what is left of their queue)."""
    await ctx.conn.execute(
        TAG + "DELETE FROM dispatcher.subscriptions WHERE environment_id = ANY($1::text[])",
        environments,
    )


def percentiles(values: list[float], *qs: float) -> list[float | None]:
    if not values:
        return [None for _ in qs]
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in qs]


async def first_attempt_lags(ctx: Context, environments: list[str]) -> list[float]:
    """Seconds from each delivery's due time (its creation) to its first attempt's start."""
    rows = await ctx.conn.fetch(
        TAG + "SELECT extract(epoch FROM a.started_at - d.created_at)::float8 AS lag "
        "FROM dispatcher.deliveries_done d JOIN dispatcher.attempts a ON a.delivery_id = d.id "
        "WHERE d.environment_id = ANY($1::text[]) AND a.attempt = 1",
        environments,
    )
    return [r["lag"] for r in rows]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


# The receiver's counters ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answered:
    """The receiver's 2xx answers since its last reset (monotonic times, see receiver.py)."""

    answered: int
    first_at: float | None  # the first request's arrival
    last_at: float | None  # the last answer
    bucket_seconds: float
    buckets: list[tuple[int, int]]  # (monotonic bucket number, answers in it)


async def _receiver_call(ctx: Context, method: str, path: str) -> bytes:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, ctx.base_url + path) as response,
    ):
        response.raise_for_status()
        return await response.read()


async def receiver_reset(ctx: Context) -> None:
    await _receiver_call(ctx, "POST", "/_reset")


async def receiver_answered(ctx: Context) -> Answered:
    data = orjson.loads(await _receiver_call(ctx, "GET", "/_stats"))
    return Answered(
        answered=int(data["answered"]),
        first_at=data["first_at"],
        last_at=data["last_at"],
        bucket_seconds=float(data["bucket_seconds"]),
        buckets=[(int(b), int(n)) for b, n in data["buckets"]],
    )


@dataclass(frozen=True, slots=True)
class Ramp:
    """How the delivery rate rose after the publish's commit."""

    first_delivery_s: float | None  # commit to the receiver's first request
    ramp_s: float | None  # commit to the end of the first window within 10% of the peak
    peak_per_s: float | None  # the highest rate over a SMOOTH-bucket window
    series_per_s: list[float]  # answers/s in each 100 ms from the commit


SMOOTH = 5  # buckets (500 ms): one 100 ms bucket's peak is noise on a shared 2-core VM


def ramp(answered: Answered, since: float) -> Ramp:
    """The rate series from `since` (the commit), its smoothed peak, and how long it took to
    come within 10% of that peak. Each point of the smoothed series is the mean of the
    buckets from SMOOTH-1 before it to it (fewer at the start, so that a rate at its peak
    from the first bucket on has a ramp of one bucket)."""
    step = answered.bucket_seconds
    first = None if answered.first_at is None else round(answered.first_at - since, 4)
    if not answered.buckets:
        return Ramp(first, None, None, [])
    start = int(since / step)
    counts: dict[int, int] = {}
    for bucket, n in answered.buckets:
        counts[max(bucket - start, 0)] = counts.get(max(bucket - start, 0), 0) + n
    last = max(counts)
    # The last bucket is cut short by the end of the backlog: not a rate, unless no bucket
    # before it had an answer (a backlog answered within one bucket after the commit's).
    series = [counts.get(i, 0) / step for i in range(last + 1)]
    full = series[:-1] if any(series[:-1]) else series
    smooth = [
        sum(full[max(0, i - SMOOTH + 1) : i + 1]) / len(full[max(0, i - SMOOTH + 1) : i + 1])
        for i in range(len(full))
    ]
    peak = max(smooth)
    reached = next(i for i, v in enumerate(smooth) if v >= 0.9 * peak)
    return Ramp(first, round((reached + 1) * step, 2), round(peak, 1), [round(v) for v in series])


async def wait_answered(ctx: Context, label: str, count: int, timeout: float) -> Answered:
    """Poll the receiver (cheap: no database) until it has answered `count` requests."""
    begun = time.perf_counter()
    while True:
        seen = await receiver_answered(ctx)
        elapsed = time.perf_counter() - begun
        ctx.progress.show(
            f"[{label}] {seen.answered:,}/{count:,} answered, "
            f"{seen.answered / max(elapsed, 1e-9):,.0f}/s"
        )
        if seen.answered >= count:
            return seen
        if elapsed > timeout:
            raise TimeoutError(f"{label}: {seen.answered}/{count} answered after {timeout:.0f} s")
        await asyncio.sleep(0.1)


# The ceiling ------------------------------------------------------------------------------------


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
