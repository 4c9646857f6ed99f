"""`dispatcher status` reads the queue, the last hour's outcomes and the failing subscriptions."""

from __future__ import annotations

import asyncio
import os
import sys
from uuid import UUID

import asyncpg

from dispatcher import status

from .helpers import subscribe

GOOD = "https://good.example/hook"
BAD = "https://bad.example/hook"
QUIET = "https://quiet.example/hook"


async def publish(db: asyncpg.Connection, event: str, count: int) -> None:
    for n in range(count):
        await db.execute(
            "SELECT dispatcher.publish('env-1', $1, jsonb_build_object('n', $2::int))", event, n
        )


async def deliveries(db: asyncpg.Connection, sid: UUID) -> list[int]:
    rows = await db.fetch(
        "SELECT id FROM dispatcher.deliveries WHERE subscription_id = $1 ORDER BY id", sid
    )
    return [r["id"] for r in rows]


async def finish(db: asyncpg.Connection, ids: list[int], final: str, ago: float = 0) -> None:
    """Move deliveries to deliveries_done as the recorder does, finished `ago` seconds ago."""
    await db.execute(
        """
        WITH moved AS (DELETE FROM dispatcher.deliveries WHERE id = ANY($1) RETURNING *)
        INSERT INTO dispatcher.deliveries_done
            (id, subscription_id, event_id, event_created_at, environment_id, attempts,
             status, created_at, finished_at)
        SELECT id, subscription_id, event_id, event_created_at, environment_id, 1,
               $2, created_at, now() - make_interval(secs => $3)
        FROM moved
        """,
        ids,
        final,
        ago,
    )


async def attempt(
    db: asyncpg.Connection, delivery: int, sid: UUID, outcome: str, *, ago: float = 1, n: int = 1
) -> None:
    await db.execute(
        "INSERT INTO dispatcher.attempts "
        "(delivery_id, subscription_id, attempt, started_at, duration_ms, status_code, outcome) "
        "SELECT $1, $2, i, now() - make_interval(secs => $3), 12.5, "
        "       CASE WHEN $4 = 'delivered' THEN 200 ELSE 503 END, $4 "
        "FROM generate_series(1, $5) AS i",
        delivery,
        sid,
        ago,
        outcome,
        n,
    )


async def test_status_of_an_empty_database_is_all_zero(db: asyncpg.Connection) -> None:
    s = await status.collect(db)
    assert (s.queue_depth, s.due_now, s.leased, s.paused) == (0, 0, 0, 0)
    assert s.oldest_due_age == 0
    assert s.finished == {"delivered": 0, "failed": 0, "expired": 0}
    assert s.failing == ()
    assert (s.active_subscriptions, s.inactive_subscriptions) == (0, 0)
    assert "failing subscriptions" in status.render(s)
    assert status.render(s).rstrip().endswith(": none")


async def test_status_counts_queue_outcomes_and_failing_subscriptions(
    db: asyncpg.Connection,
) -> None:
    good = await subscribe(db, GOOD, ["products.*"])
    bad = await subscribe(db, BAD, ["products.*"])
    quiet = await subscribe(db, QUIET, ["orders.*"])
    await publish(db, "products.create.v0", 4)
    await publish(db, "orders.paid.v0", 2)
    # A deactivated subscription's queued deliveries are paused, not counted as queue.
    await db.execute("UPDATE dispatcher.subscriptions SET active = false WHERE id = $1", quiet)

    good_ids = await deliveries(db, good)
    bad_ids = await deliveries(db, bad)
    # good: three delivered now, one delivered two hours ago (outside the window), one leased.
    await finish(db, good_ids[:3], "delivered")
    for d in good_ids[:3]:
        await attempt(db, d, good, "delivered")
    await attempt(db, good_ids[3], good, "delivered")
    await attempt(db, good_ids[3], good, "retry")  # 1 failure in 5 attempts: 20%
    await db.execute(
        "UPDATE dispatcher.deliveries SET lease_owner = gen_random_uuid(), "
        "leased_until = now() + interval '60 seconds' WHERE id = $1",
        good_ids[3],
    )
    await publish(db, "products.update.v0", 1)  # one more for each; good's is finished long ago
    old_good = (await deliveries(db, good))[-1]
    await finish(db, [old_good], "delivered", ago=7200)
    await attempt(db, old_good, bad, "failed", ago=7200, n=50)  # outside the window
    # bad: every attempt in the last hour failed; one delivery gave up, one waits 2 minutes.
    bad_ids = await deliveries(db, bad)
    await attempt(db, bad_ids[0], bad, "retry", n=5)
    await attempt(db, bad_ids[0], bad, "failed")
    await finish(db, [bad_ids[0]], "failed")
    await db.execute(
        "UPDATE dispatcher.deliveries SET due_at = now() - interval '120 seconds', attempts = 3 "
        "WHERE id = $1",
        bad_ids[1],
    )

    s = await status.collect(db)

    assert s.queue_depth == 1 + 4  # good's leased one, bad's remaining four
    assert s.due_now == 4
    assert s.leased == 1
    assert s.paused == 2
    assert 120 <= s.oldest_due_age < 180
    assert s.finished == {"delivered": 3, "failed": 1, "expired": 0}
    assert (s.active_subscriptions, s.inactive_subscriptions) == (2, 1)
    assert len(s.failing) == 1
    failing = s.failing[0]
    assert (failing.id, failing.url, failing.active) == (bad, BAD, True)
    assert (failing.attempts, failing.failures, failing.failure_rate) == (6, 6, 1.0)

    lowered = await status.collect(db, failure_threshold=0.1)
    assert [f.id for f in lowered.failing] == [bad, good]
    assert lowered.failing[1].failure_rate == 0.2
    assert (await status.collect(db, min_attempts=7)).failing == ()


async def test_render_aligns_figures_and_the_failing_table(db: asyncpg.Connection) -> None:
    bad = await subscribe(db, BAD)
    worse = await subscribe(db, "https://much-longer-hostname.example/webhooks/in", ["*"])
    await publish(db, "products.create.v0", 2)
    for sid, failures in ((bad, 4), (worse, 12)):
        delivery = (await deliveries(db, sid))[0]
        await attempt(db, delivery, sid, "retry", n=failures)
        await attempt(db, delivery, sid, "delivered")

    page = status.render(await status.collect(db))
    lines = page.splitlines()

    figures = lines[: lines.index("")]
    assert len({len(line) for line in figures}) == 1  # values right-aligned to one column
    assert figures[0].split() == ["queue", "depth", "4"]  # 2 events x 2 subscriptions
    assert any(line.startswith("oldest due age") for line in figures)
    assert any(line.split()[-1] == "2" for line in figures if "active subscriptions" in line)

    header = next(line for line in lines if line.startswith("ID"))
    rows = lines[lines.index(header) + 1 :]
    assert [r.split()[0] for r in rows] == [str(worse), str(bad)]  # 92% before 80%
    url_column = header.index("URL")
    assert rows[0][url_column:] == "https://much-longer-hostname.example/webhooks/in"
    assert rows[1][url_column:] == BAD
    rate_end = header.index("RATE") + len("RATE")
    assert [r[:rate_end].split()[-1] for r in rows] == ["92%", "80%"]
    assert all(line == line.rstrip() for line in lines)


def test_duration_reads_like_a_person_would_say_it() -> None:
    assert [status.duration(s) for s in (0, 42.9, 192, 7500, 273600)] == [
        "0s",
        "42s",
        "3m 12s",
        "2h 05m",
        "3d 04h",
    ]


async def test_dispatcher_status_prints_the_queue_from_the_command_line(
    database: str, db: asyncpg.Connection
) -> None:
    await db.execute(
        "INSERT INTO dispatcher.subscriptions (environment_id, url, events, secret) "
        "VALUES ('env-1', 'https://partner.example/h', '{*}', 'x')"
    )
    await db.execute("SELECT dispatcher.publish('env-1', 'products.create.v0', '{}')")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher",
        "status",
        env={
            **os.environ,
            "DISPATCHER_DATABASE_URL": database,
            "DISPATCHER_CONFIG": os.devnull,
            "DISPATCHER_LOG_FORMAT": "json",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "queue" in text.lower()
    assert "1" in text
