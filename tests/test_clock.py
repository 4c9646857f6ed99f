"""Instances whose host clocks disagree by minutes still share one clock: the database's."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from contextlib import AsyncExitStack

import asyncpg
import pytest
from aiohttp import web

from dispatcher import clocksync
from dispatcher.schedule import Clock

from .helpers import Receiver, daemon, publish, settings_for, subscribe, wait_done

SKEW = 300.0  # seconds ahead: far beyond the 90 s lease


def test_a_corrected_clock_reads_the_database_time_whatever_the_host_says() -> None:
    skewed = Clock(wall=lambda: time.time() + SKEW)
    assert skewed() - time.time() == pytest.approx(SKEW, abs=0.05)
    skewed.correction = -SKEW
    assert skewed() == pytest.approx(time.time(), abs=0.05)
    # A fast test clock keeps its pace; the correction shifts it, it does not scale.
    fast = Clock(rate=100.0, wall=lambda: time.time() + SKEW)
    fast.correction = -SKEW
    start = fast()
    assert start == pytest.approx(time.time(), abs=0.5)
    time.sleep(0.05)
    assert fast() - start == pytest.approx(5.0, abs=1.5)


async def test_the_correction_is_measured_against_the_database(database: str) -> None:
    pool = await asyncpg.create_pool(database, min_size=1, max_size=1)
    try:
        clock = Clock(wall=lambda: time.time() - SKEW)
        correction, trip = await clocksync.measure(pool, clock)
        assert correction == pytest.approx(SKEW, abs=0.05)
        assert 0 <= trip < 0.5
        await clocksync.sync(pool, clock)
        assert clock() == pytest.approx(time.time(), abs=0.05)
    finally:
        await pool.close()


def fail_first_then_slow_ok(seconds: float, seen: dict[str, list[float]]) -> object:
    """Each delivery's first request answers 500, the next ones 200 after `seconds`."""

    async def reply(request: web.Request) -> web.Response:
        key = request.headers["webhook-id"]
        seen[key].append(time.monotonic())
        if len(seen[key]) == 1:
            return web.Response(status=500)
        await asyncio.sleep(seconds)
        return web.Response(text="ok")

    return reply


@pytest.mark.timeout(90)
async def test_two_daemons_five_minutes_apart_never_send_twice_and_retry_on_time(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    retries: dict[str, list[float]] = defaultdict(list)

    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(0.2)
        return web.Response(text="ok")

    receiver.plan("/hook", then=slow)
    receiver.plan("/retry", then=fail_first_then_slow_ok(0.05, retries))  # type: ignore[arg-type]
    await subscribe(db, receiver.url("/hook"), ["products.*"])
    await subscribe(db, receiver.url("/retry"), ["orders.*"], settings={"retry": {"delays": [1.0]}})
    settings = settings_for(database, max_in_flight=32, max_per_endpoint=16)
    async with AsyncExitStack() as stack:
        normal = await stack.enter_async_context(daemon(settings))
        ahead = await stack.enter_async_context(
            daemon(settings, clock=Clock(wall=lambda: time.time() + SKEW))
        )
        await publish(db, count=200, event="products.create.v0")
        await publish(db, count=40, event="orders.create.v0")
        await wait_done(db, 240, timeout=60)
        claimed = [
            r.metrics.registry.get_sample_value("dispatcher_claimed_total") or 0.0
            for r in (normal, ahead)
        ]
    sent = Counter(r.headers["webhook-id"] for r in receiver.at("/hook"))
    assert len(sent) == 200, "every event delivered"
    assert max(sent.values()) == 1, f"sent twice: {[k for k, n in sent.items() if n > 1]}"
    assert all(n > 0 for n in claimed), f"both instances worked: {claimed}"
    assert len(retries) == 40
    gaps = sorted(times[1] - times[0] for times in retries.values())
    assert all(len(times) == 2 for times in retries.values())
    # Due 1 s after the failed answer, whichever instance scheduled or sent it.
    assert gaps[0] >= 0.95, gaps
    assert gaps[-1] < 3.0, gaps
    outcomes = await db.fetch(
        "SELECT status, count(*) AS n FROM dispatcher.deliveries_done GROUP BY status"
    )
    assert {r["status"]: r["n"] for r in outcomes} == {"delivered": 240}
