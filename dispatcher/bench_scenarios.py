"""The workloads of `dispatcher bench`: a loopback receiver, the plain-client ceiling, and
the scenarios run through the real daemon (burn-down, steady rate, faulty endpoints, retries
in bulk, and the optional memory check with a large backlog).

Every statement the bench itself runs starts with `/*bench*/`, so pg_stat_statements can
count the daemon's statements alone.
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp import web

from . import config
from .app import started
from .bench_cpu import process_seconds, server_seconds
from .signing import new_secret

PAYLOAD = {"id": "p-1", "sku": "COFFEE-250G", "name": "Premium Coffee Beans", "price": 12.5}
PAYLOAD_TEXT = orjson.dumps(PAYLOAD).decode()
TAG = "/*bench*/ "
HANG_SECONDS = 30.0  # a hanging endpoint answers after this (the subscription times out first)


# The receiver ------------------------------------------------------------------------------


def receiver_main(ports: Queue[int]) -> None:
    """A cheap receiver in its own process. The first path segment picks the behaviour:
    /ok 200, /fail 500, /hang never answers in time, /slow answers after 2 s, /flaky answers
    500 to the first attempt of each message (by webhook-id) and 200 to the next."""
    import uvloop

    seen: set[str] = set()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        kind = request.match_info["kind"]
        if kind == "fail":
            return web.Response(status=500, text="no")
        if kind == "hang":
            await asyncio.sleep(HANG_SECONDS)
        elif kind == "slow":
            await asyncio.sleep(2.0)
        elif kind == "flaky":
            msg = request.headers.get("webhook-id", "")
            if msg not in seen:
                seen.add(msg)
                return web.Response(status=500, text="not yet")
            seen.discard(msg)
        return web.Response(text="ok")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/{kind}/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=4096).start()
        ports.put(runner.addresses[0][1])
        await asyncio.Event().wait()

    uvloop.run(main())


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
    """What the database and the bench process spent during a dispatcher phase."""

    statements: int | None
    wal_bytes: int
    cpu_seconds: float
    postgres_cpu_seconds: float | None
    receiver_cpu_seconds: float | None
    peak_rss_mb: float
    tables_before_kb: dict[str, int]
    tables_after_kb: dict[str, int]


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


async def statements_ready(conn: asyncpg.Connection) -> bool:
    try:
        await conn.execute(TAG + "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute(TAG + "SELECT pg_stat_statements_reset()")
    except asyncpg.PostgresError:
        return False
    return True


class Meter:
    """Opens a measured span: statements, WAL, CPU of this process, table sizes."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._lsn = ""
        self._cpu = 0.0
        self._others: tuple[float | None, float | None] = (None, None)
        self._tables: dict[str, int] = {}

    async def start(self) -> None:
        conn = self._ctx.conn
        self._tables = await table_sizes(conn)
        if self._ctx.statements:
            await conn.execute(TAG + "SELECT pg_stat_statements_reset()")
        # The insert position: with synchronous_commit off, the write position can lag behind.
        self._lsn = await conn.fetchval(TAG + "SELECT pg_current_wal_insert_lsn()::text")
        self._cpu = time.process_time()
        self._others = self._ctx.other_cpu()

    async def stop(self) -> Costs:
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
            cpu_seconds=cpu,
            postgres_cpu_seconds=postgres,
            receiver_cpu_seconds=receiver,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            tables_before_kb=self._tables,
            tables_after_kb=await table_sizes(conn),
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


# The ceiling ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ceiling:
    deliveries: int
    per_s: float
    cpu_seconds_per_post: float
    receiver_cpu_us_per_post: float | None
    seconds: float
    # Posted in two halves, right before and right after the burn-down: a machine whose
    # speed drifts during the run (shared cores) moves both sides of the ratio alike.
    halves_per_s: tuple[float, ...] = ()


def both_sides(before: Ceiling, after: Ceiling) -> Ceiling:
    """One ceiling from the halves measured before and after the burn-down."""
    count = before.deliveries + after.deliveries
    seconds = before.seconds + after.seconds
    receiver = (
        None
        if before.receiver_cpu_us_per_post is None or after.receiver_cpu_us_per_post is None
        else round(
            (
                before.receiver_cpu_us_per_post * before.deliveries
                + after.receiver_cpu_us_per_post * after.deliveries
            )
            / count,
            1,
        )
    )
    cpu = (
        before.cpu_seconds_per_post * before.deliveries
        + after.cpu_seconds_per_post * after.deliveries
    ) / count
    return Ceiling(
        count,
        round(count / seconds, 1),
        round(cpu, 6),
        receiver,
        round(seconds, 3),
        (before.per_s, after.per_s),
    )


async def ceiling(ctx: Context, body: bytes, count: int) -> Ceiling:
    """A plain aiohttp client: the same body, receiver and concurrency, no database."""
    url = f"{ctx.base_url}/ok/ceiling"
    remaining = count
    done = 0
    headers = {"Content-Type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal remaining, done
        while remaining > 0:
            remaining -= 1
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
            done += 1

    async def report() -> None:
        while True:
            elapsed = time.perf_counter() - begun
            ctx.progress.show(
                f"[ceiling] {done:,}/{count:,} posted, {done / max(elapsed, 1e-9):,.0f}/s"
            )
            await asyncio.sleep(0.1)

    connector = aiohttp.TCPConnector(limit=ctx.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        begun = time.perf_counter()
        cpu0 = time.process_time()
        receiver0 = ctx.other_cpu()[1]
        shown = asyncio.create_task(report())
        try:
            await asyncio.gather(*(worker(session) for _ in range(ctx.concurrency)))
        finally:
            shown.cancel()
        elapsed = time.perf_counter() - begun
        cpu = time.process_time() - cpu0
        receiver1 = ctx.other_cpu()[1]
    ctx.progress.done()
    receiver = None if receiver0 is None or receiver1 is None else receiver1 - receiver0
    return Ceiling(
        count,
        round(count / elapsed, 1),
        round(cpu / count, 6),
        per(receiver, count),
        round(elapsed, 3),
    )


# Scenarios --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Burn:
    """A backlog published in one transaction, burnt down by the daemon."""

    deliveries: int
    publish_seconds: float
    per_s: float
    ratio_to_ceiling: float | None
    lag_p50_ms: float | None
    lag_p99_ms: float | None
    statements_per_delivery: float | None
    wal_bytes_per_delivery: float
    cpu_seconds_per_delivery: float
    postgres_cpu_us_per_delivery: float | None
    receiver_cpu_us_per_delivery: float | None
    peak_rss_mb: float
    rss_idle_mb: float  # the daemon started, before the backlog
    rss_after_mb: float  # the backlog burnt down, the daemon still running
    tables_before_kb: dict[str, int]
    tables_after_kb: dict[str, int]
    claim_mean_ms: float | None
    record_mean_ms: float | None
    mean_in_flight: float


async def burn(ctx: Context, count: int) -> Burn:
    env = ["bench-burn"]
    settings = daemon_settings(ctx, in_flight=ctx.concurrency, per_endpoint=ctx.concurrency)
    async with started(settings) as daemon:
        await subscribe(ctx, env[0], "/ok/burn")
        meter = Meter(ctx)
        await meter.start()
        rss_idle = _rss_mb()
        t0 = time.perf_counter()
        await publish(ctx, env, count)
        publish_s = time.perf_counter() - t0
        busy = daemon.metrics.attempt_seconds_total()
        elapsed = await drain(ctx, "burn", env, count, timeout=max(60.0, count / 200))
        busy = daemon.metrics.attempt_seconds_total() - busy
        rss_after = _rss_mb()
        costs = await meter.stop()
        claim_s = daemon.metrics.mean_db_seconds("claim")
        record_s = daemon.metrics.mean_db_seconds("record")
    ctx.progress.done()
    rate = count / elapsed
    p50, p99 = percentiles(await first_attempt_lags(ctx, env), 0.5, 0.99)
    await forget(ctx, env)
    return Burn(
        deliveries=count,
        publish_seconds=round(publish_s, 3),
        per_s=round(rate, 1),
        ratio_to_ceiling=None,  # set against the ceiling measured around it
        lag_p50_ms=ms(p50),
        lag_p99_ms=ms(p99),
        statements_per_delivery=(
            None if costs.statements is None else round(costs.statements / count, 4)
        ),
        wal_bytes_per_delivery=round(costs.wal_bytes / count, 1),
        cpu_seconds_per_delivery=round(costs.cpu_seconds / count, 6),
        postgres_cpu_us_per_delivery=per(costs.postgres_cpu_seconds, count),
        receiver_cpu_us_per_delivery=per(costs.receiver_cpu_seconds, count),
        peak_rss_mb=round(costs.peak_rss_mb, 1),
        rss_idle_mb=round(rss_idle, 1),
        rss_after_mb=round(rss_after, 1),
        tables_before_kb=costs.tables_before_kb,
        tables_after_kb=costs.tables_after_kb,
        claim_mean_ms=ms(claim_s),
        record_mean_ms=ms(record_s),
        mean_in_flight=round(busy / elapsed, 2),
    )


@dataclass(frozen=True, slots=True)
class Steady:
    """Events published at a steady rate (half the ceiling): how late each is sent."""

    target_per_s: float
    achieved_per_s: float
    seconds: float
    deliveries: int
    lag_p50_ms: float | None
    lag_p99_ms: float | None
    lag_max_ms: float | None
    statements_per_delivery: float | None
    cpu_seconds_per_delivery: float


async def steady(ctx: Context, rate: float, seconds: float) -> Steady:
    env = ["bench-steady"]
    settings = daemon_settings(ctx, in_flight=ctx.concurrency, per_endpoint=ctx.concurrency)
    async with started(settings):
        await subscribe(ctx, env[0], "/ok/steady")
        meter = Meter(ctx)
        await meter.start()
        begun = time.perf_counter()
        published = 0
        while (elapsed := time.perf_counter() - begun) < seconds:
            due = int(rate * elapsed) - published
            if due > 0:
                await publish(ctx, env, due)
                published += due
            ctx.progress.show(f"[steady] {elapsed:4.1f}/{seconds:.0f} s, {published:,} published")
            await asyncio.sleep(0.01)
        await drain(ctx, "steady", env, published, timeout=60.0)
        took = time.perf_counter() - begun
        costs = await meter.stop()
    ctx.progress.done()
    lags = await first_attempt_lags(ctx, env)
    p50, p99, top = percentiles(lags, 0.5, 0.99, 1.0)
    await forget(ctx, env)
    n = max(published, 1)
    return Steady(
        target_per_s=round(rate, 1),
        achieved_per_s=round(published / took, 1),
        seconds=round(took, 2),
        deliveries=published,
        lag_p50_ms=ms(p50),
        lag_p99_ms=ms(p99),
        lag_max_ms=ms(top),
        statements_per_delivery=(
            None if costs.statements is None else round(costs.statements / n, 4)
        ),
        cpu_seconds_per_delivery=round(costs.cpu_seconds / n, 6),
    )


@dataclass(frozen=True, slots=True)
class Faulty:
    """The same load over many endpoints, all healthy, then with 10% failing and 1% hanging,
    alternately: healthy, faulty, healthy, faulty, healthy. The ratio compares the
    deliveries/s of the endpoints that are healthy in every run, the faulty runs' mean
    against the healthy runs' mean: interleaved, a drift of this VM's speed (up to 25% within
    a minute) weighs on both sides alike. Answers are counted over both faulty runs."""

    endpoints: int
    deliveries: int
    timeout_s: float
    per_endpoint_limit: int
    healthy_run_per_s: float
    healthy_runs_per_s: tuple[float, ...]
    faulty_run_healthy_per_s: float
    faulty_runs_per_s: tuple[float, ...]
    ratio: float
    failing_endpoints: int
    hanging_endpoints: int
    timed_out: int
    answered_500: int


async def _healthy_rate(ctx: Context, environments: list[str], since: float) -> tuple[int, float]:
    """Deliveries to /ok endpoints and their rate from `since` (unix s) to the last answer."""
    row = await ctx.conn.fetchrow(
        TAG + "SELECT count(*) AS n, "
        "max(extract(epoch FROM a.started_at) + a.duration_ms / 1000)::float8 AS last "
        "FROM dispatcher.attempts a JOIN dispatcher.subscriptions s ON s.id = a.subscription_id "
        "WHERE s.environment_id = ANY($1::text[]) AND s.url LIKE '%/ok/%'",
        environments,
    )
    n = int(row["n"])
    return n, n / max(float(row["last"] or since) - since, 1e-9)


async def faulty(ctx: Context, count: int, endpoints: int = 100, timeout: float = 2.0) -> Faulty:
    per_endpoint = max(1, ctx.concurrency // 4)
    settings = daemon_settings(ctx, in_flight=ctx.concurrency, per_endpoint=per_endpoint)
    sub_settings = {"timeout": timeout, "retry": "none"}
    failing = max(1, endpoints // 10)
    hanging = max(1, endpoints // 100)
    rates: dict[str, list[float]] = {"healthy": [], "faulty": []}
    outcomes: Counter[str] = Counter()
    for n, run in enumerate(("healthy", "faulty", "healthy", "faulty", "healthy")):
        envs = [f"bench-{run}{n}-{i}" for i in range(endpoints)]
        async with started(settings):
            for i, env in enumerate(envs):
                kind = "ok"
                if run == "faulty" and i < hanging:
                    kind = "hang"
                elif run == "faulty" and i < hanging + failing:
                    kind = "fail"
                await subscribe(ctx, env, f"/{kind}/{i}", sub_settings)
            await publish(ctx, envs, count)
            since = time.time()
            # Not the hanging endpoints: throttled to one request at a time, their
            # deliveries time out one by one long after the rest is done.
            measured = envs[hanging:] if run == "faulty" else envs
            await drain(ctx, run, measured, count, timeout=max(60.0, count / 100))
            # The same endpoints in every run: those that stay healthy in the faulty ones.
            _, rate = await _healthy_rate(ctx, envs[hanging + failing :], since)
            rates[run].append(rate)
            if run == "faulty":
                for row in await ctx.conn.fetch(
                    TAG + "SELECT coalesce(a.status_code::text, split_part(a.error, ':', 1)) AS k,"
                    " count(*) AS n FROM dispatcher.attempts a "
                    "JOIN dispatcher.subscriptions s ON s.id = a.subscription_id "
                    "WHERE s.environment_id = ANY($1::text[]) GROUP BY 1",
                    envs,
                ):
                    outcomes[row["k"]] += int(row["n"])
        ctx.progress.done()
        await forget(ctx, envs)
    healthy = statistics.fmean(rates["healthy"])
    faulty_rate = statistics.fmean(rates["faulty"])
    return Faulty(
        endpoints=endpoints,
        deliveries=count,
        timeout_s=timeout,
        per_endpoint_limit=per_endpoint,
        healthy_run_per_s=round(healthy, 1),
        healthy_runs_per_s=tuple(round(r, 1) for r in rates["healthy"]),
        faulty_run_healthy_per_s=round(faulty_rate, 1),
        faulty_runs_per_s=tuple(round(r, 1) for r in rates["faulty"]),
        ratio=round(faulty_rate / healthy, 3),
        failing_endpoints=failing,
        hanging_endpoints=hanging,
        timed_out=outcomes.get("timeout", 0),
        answered_500=outcomes.get("500", 0),
    )


@dataclass(frozen=True, slots=True)
class Retries:
    """First attempts fail together; how late after its due time each retry starts."""

    deliveries: int
    delay_s: float
    retried: int
    late_p50_ms: float | None
    late_p99_ms: float | None
    late_max_ms: float | None
    early: int  # retries started before they were due (should be 0)


async def retries(ctx: Context, count: int, delay: float = 2.0) -> Retries:
    """`count` first attempts fail at once and are retried `delay` later. The delay is longer
    than the burst of first attempts takes (0.3-1.3 s here), so what is measured is when the
    timer fires, not slots still busy with first attempts."""
    env = ["bench-retries"]
    settings = daemon_settings(ctx, in_flight=ctx.concurrency, per_endpoint=ctx.concurrency)
    async with started(settings):
        await subscribe(
            ctx, env[0], "/flaky/retries", {"retry": {"delays": [delay], "max_attempts": 2}}
        )
        await publish(ctx, env, count)
        await drain(ctx, "retries", env, count, timeout=max(60.0, count / 100))
    ctx.progress.done()
    # A retry is due `delay` after the first attempt ended (policy.decide).
    rows = await ctx.conn.fetch(
        TAG + "SELECT extract(epoch FROM b.started_at - a.started_at)::float8 "
        "- a.duration_ms / 1000 - $2::float8 AS late "
        "FROM dispatcher.attempts a JOIN dispatcher.attempts b "
        "ON b.delivery_id = a.delivery_id AND b.attempt = 2 "
        "JOIN dispatcher.deliveries_done d ON d.id = a.delivery_id "
        "WHERE a.attempt = 1 AND d.environment_id = $1",
        env[0],
        delay,
    )
    late = [r["late"] for r in rows]
    await forget(ctx, env)
    p50, p99, top = percentiles(late, 0.5, 0.99, 1.0)
    return Retries(
        deliveries=count,
        delay_s=delay,
        retried=len(late),
        late_p50_ms=ms(p50),
        late_p99_ms=ms(p99),
        late_max_ms=ms(top),
        # Timestamps are rounded to microseconds on the way to Postgres.
        early=sum(1 for x in late if x < -1e-5),
    )


@dataclass(frozen=True, slots=True)
class Memory:
    """A large backlog with many requests in flight: the daemon's resident memory."""

    pending: int
    in_flight: int
    publish_seconds: float
    rss_before_mb: float
    rss_peak_mb: float
    max_in_flight_seen: int


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def memory(ctx: Context, count: int, in_flight: int, seconds: float = 10.0) -> Memory:
    env = ["bench-memory"]
    settings = daemon_settings(ctx, in_flight=in_flight, per_endpoint=in_flight)
    await subscribe(ctx, env[0], "/slow/memory")
    before = _rss_mb()
    ctx.progress.show(f"[memory] publishing {count:,} deliveries")
    t0 = time.perf_counter()
    step = 100_000
    for done in range(0, count, step):
        await publish(ctx, env, min(step, count - done))
        ctx.progress.show(f"[memory] published {min(done + step, count):,}/{count:,}")
    publish_s = time.perf_counter() - t0
    peak = before
    seen = 0
    async with started(settings) as running:
        begun = time.perf_counter()
        # Claims fill the slots a batch at a time: run until all `in_flight` were seen (a slow
        # machine takes longer than `seconds` for 1M pending), at most 30 s more.
        while (elapsed := time.perf_counter() - begun) < seconds or (
            seen < in_flight and elapsed < seconds + 30
        ):
            peak = max(peak, _rss_mb())
            seen = max(seen, running.worker.in_flight)
            ctx.progress.show(
                f"[memory] {elapsed:4.1f}/{seconds:.0f} s, {running.worker.in_flight} in flight, "
                f"RSS {peak:.0f} MB"
            )
            await asyncio.sleep(0.2)
    ctx.progress.done()
    await forget(ctx, env)
    return Memory(
        pending=count,
        in_flight=in_flight,
        publish_seconds=round(publish_s, 2),
        rss_before_mb=round(before, 1),
        rss_peak_mb=round(peak, 1),
        max_in_flight_seen=seen,
    )
