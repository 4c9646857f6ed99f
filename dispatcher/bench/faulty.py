"""Faulty endpoints: healthy endpoints' throughput while some fail or hang."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass

from ..app import started
from .kit import TAG, Context, daemon_settings, drain, forget, publish, subscribe


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
