"""Ordered burn-down: a backlog over many entities of an "ordering": "entity" subscription,
against the same backlog unordered, interleaved (unordered, ordered, unordered) because this
VM's speed drifts; the ratio is the ordered rate over the unordered runs' mean.

Each key goes out one at a time, so the rate rests on how quickly a finished head's next one
is released (in the recorder's flush, into its instance's lease) and sent; with 1,000
entities there are far more heads than send slots. pg_stat_statements gives each run's mean
claim and record time (for the ordered run, of the record statement that also releases the
next ones: queries.RECORD_ENDING_HEADS): the unordered runs' must be what they were before
ordering existed.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..app import started
from .kit import PAYLOAD_TEXT, TAG, Context, daemon_settings, drain, forget, ms, subscribe


@dataclass(frozen=True, slots=True)
class Phase:
    """One burn-down: its rate and the mean time (pg_stat_statements, execution only) of
    its claim, record and, when ordered, record-and-release statements."""

    ordered: bool
    per_s: float
    claim_mean_ms: float | None
    record_mean_ms: float | None
    record_heads_mean_ms: float | None


@dataclass(frozen=True, slots=True)
class Ordered:
    deliveries: int  # per run
    entities: int
    unordered_per_s: float  # the two unordered runs' mean
    ordered_per_s: float
    ratio: float  # ordered / unordered
    runs: list[Phase]


# Mean execution time per statement kind since the last reset (milliseconds).
MEANS = (
    TAG + "SELECT CASE WHEN query LIKE '%WITH due AS%' THEN 'claim' "
    "WHEN query LIKE '%dispatcher.record_ending_heads%' THEN 'record_heads' "
    "ELSE 'record' END AS kind, "
    "sum(total_exec_time) / greatest(sum(calls), 1) AS mean_ms FROM pg_stat_statements "
    "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND query NOT LIKE '/*bench*/%' AND (query LIKE '%WITH due AS%' "
    "OR query LIKE '%WITH o AS%' OR query LIKE '%dispatcher.record_ending_heads%') GROUP BY 1"
)


async def _publish(ctx: Context, environment: str, count: int, entities: int) -> None:
    """`count` events over `entities` entity ids, round-robin, in one transaction."""
    await ctx.conn.execute(
        TAG + "INSERT INTO dispatcher.events "
        "(environment_id, event_name, payload, entity_instance_id) "
        "SELECT $1, 'products.update.v0', $2::text::jsonb, 'e-' || (g % $4) "
        "FROM generate_series(1, $3) g ORDER BY g",
        environment,
        PAYLOAD_TEXT,
        count,
        entities,
    )


async def _phase(ctx: Context, n: int, count: int, entities: int, ordered: bool) -> Phase:
    env = [f"bench-ordered-{n}"]
    settings = daemon_settings(ctx, in_flight=ctx.concurrency, per_endpoint=ctx.concurrency)
    async with started(settings):
        await subscribe(
            ctx, env[0], "/ok/ordered", {"ordering": "entity"} if ordered else {"ordering": "none"}
        )
        await _publish(ctx, env[0], count, entities)
        if ctx.statements:
            await ctx.conn.execute(TAG + "SELECT pg_stat_statements_reset()")
        elapsed = await drain(
            ctx, "ordered" if ordered else "unordered", env, count, max(60.0, count / 200)
        )
    means: dict[str, float] = {}
    if ctx.statements:
        means = {r["kind"]: r["mean_ms"] / 1000 for r in await ctx.conn.fetch(MEANS)}
    await forget(ctx, env)
    return Phase(
        ordered=ordered,
        per_s=round(count / elapsed, 1),
        claim_mean_ms=ms(means.get("claim")),
        record_mean_ms=ms(means.get("record")),
        record_heads_mean_ms=ms(means.get("record_heads")),
    )


async def ordered(ctx: Context, count: int, entities: int) -> Ordered:
    runs = []
    for n, is_ordered in enumerate((False, True, False)):
        runs.append(await _phase(ctx, n, count, entities, is_ordered))
    ctx.progress.done()
    unordered = (runs[0].per_s + runs[2].per_s) / 2
    return Ordered(
        deliveries=count,
        entities=entities,
        unordered_per_s=round(unordered, 1),
        ordered_per_s=runs[1].per_s,
        ratio=round(runs[1].per_s / unordered, 3),
        runs=runs,
    )
