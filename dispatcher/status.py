"""`dispatcher status`: the queue, the last hour's outcomes and the failing subscriptions.

Plain SQL against the schema, read in one read-only snapshot so the numbers add up; meant
for a person at a terminal, so it favours clarity over the hot path's batching.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from uuid import UUID

import asyncpg

# Live deliveries. A claimed row is due again when its lease ends (sql/0013), so "due now"
# counts rows nobody holds (never claimed, waiting retries whose time came, expired leases)
# and "leased" those an instance is sending right now. "waiting" are those behind their
# ordering key's head (sql/0010): queued, but not due until the head ends.
QUEUE = """
SELECT count(*) FILTER (WHERE NOT paused) AS depth,
       count(*) FILTER (WHERE NOT paused AND NOT waiting AND due <= now()) AS due_now,
       coalesce(extract(epoch FROM now() - min(due)
                FILTER (WHERE NOT paused AND NOT waiting AND due <= now())), 0)::float8
           AS oldest_due_age,
       count(*) FILTER (WHERE lease_owner IS NOT NULL AND leased_until > now()) AS leased,
       count(*) FILTER (WHERE NOT paused AND waiting) AS waiting,
       count(*) FILTER (WHERE paused) AS paused
FROM (SELECT *, greatest(due_at, leased_until) AS due FROM dispatcher.deliveries) d
"""

# Deliveries that reached an end in the window, by final status.
FINISHED = """
SELECT status, count(*) AS n
FROM dispatcher.deliveries_done
WHERE finished_at > now() - make_interval(secs => $1)
GROUP BY status
"""

# Subscriptions whose attempts in the window mostly failed. Attempts are partitioned by
# started_at, so the window prunes to the last partition or two.
FAILING = """
SELECT s.id, s.environment_id, s.url, s.active,
       a.attempts, a.failures, a.failures::float8 / a.attempts AS failure_rate
FROM (
    SELECT subscription_id,
           count(*) AS attempts,
           count(*) FILTER (WHERE outcome <> 'delivered') AS failures
    FROM dispatcher.attempts
    WHERE started_at > now() - make_interval(secs => $1)
    GROUP BY subscription_id
) a
JOIN dispatcher.subscriptions s ON s.id = a.subscription_id
WHERE a.attempts >= $2 AND a.failures::float8 / a.attempts >= $3
ORDER BY failure_rate DESC, a.attempts DESC, s.id
LIMIT $4
"""

SUBSCRIPTIONS = """
SELECT count(*) FILTER (WHERE active) AS active,
       count(*) FILTER (WHERE NOT active) AS inactive
FROM dispatcher.subscriptions
"""

FINAL_STATUSES = ("delivered", "failed", "expired")


@dataclass(frozen=True, slots=True)
class FailingSubscription:
    id: UUID
    environment_id: str
    url: str
    active: bool
    attempts: int
    failures: int
    failure_rate: float


@dataclass(frozen=True, slots=True)
class Status:
    queue_depth: int
    due_now: int
    oldest_due_age: float  # seconds
    leased: int
    paused: int
    # Behind the head of their ordering key (not paused).
    waiting: int
    finished: Mapping[str, int]  # last window's finished deliveries, by status
    failing: Sequence[FailingSubscription]
    active_subscriptions: int
    inactive_subscriptions: int
    window: float  # seconds
    failure_threshold: float
    min_attempts: int


async def collect(
    conn: asyncpg.Connection,
    *,
    window: float = 3600.0,
    failure_threshold: float = 0.5,
    min_attempts: int = 5,
    limit: int = 20,
) -> Status:
    """Read the status; `failing` holds subscriptions at or above `failure_threshold`."""
    # One snapshot: a delivery finishing between two queries is counted once, not twice.
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        queue = await conn.fetchrow(QUEUE)
        finished = await conn.fetch(FINISHED, window)
        failing = await conn.fetch(FAILING, window, min_attempts, failure_threshold, limit)
        subs = await conn.fetchrow(SUBSCRIPTIONS)
    counts = {status: 0 for status in FINAL_STATUSES}
    counts.update({r["status"]: r["n"] for r in finished})
    return Status(
        queue_depth=queue["depth"],
        due_now=queue["due_now"],
        oldest_due_age=queue["oldest_due_age"],
        leased=queue["leased"],
        paused=queue["paused"],
        waiting=queue["waiting"],
        finished=counts,
        failing=tuple(FailingSubscription(**dict(r)) for r in failing),
        active_subscriptions=subs["active"],
        inactive_subscriptions=subs["inactive"],
        window=window,
        failure_threshold=failure_threshold,
        min_attempts=min_attempts,
    )


def duration(seconds: float) -> str:
    """A short human duration: 0s, 42s, 3m 12s, 2h 05m, 3d 04h."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Rows under a header, columns padded to their widest cell; `right` columns are numbers.

    The last column is not padded, so a long URL does not push trailing spaces.
    """
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell
            if i == len(row) - 1 and i not in right
            else cell.rjust(widths[i])
            if i in right
            else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def render(status: Status) -> str:
    """The status as a terminal page: key figures, then the failing subscriptions."""
    window = "hour" if status.window == 3600 else duration(status.window)
    figures = [
        ("queue depth", str(status.queue_depth)),
        ("due now", str(status.due_now)),
        ("oldest due age", duration(status.oldest_due_age)),
        ("leased (in flight)", str(status.leased)),
        ("waiting (ordering)", str(status.waiting)),
        ("paused", str(status.paused)),
        *((f"{name} (last {window})", str(n)) for name, n in status.finished.items()),
        ("active subscriptions", str(status.active_subscriptions)),
        ("inactive subscriptions", str(status.inactive_subscriptions)),
    ]
    width = max(len(name) for name, _ in figures)
    num = max(len(value) for _, value in figures)
    lines = [f"{name.ljust(width)}  {value.rjust(num)}" for name, value in figures]
    lines.append("")
    rule = (
        f"failure rate >= {status.failure_threshold:.0%} over at least "
        f"{status.min_attempts} attempts in the last {window}"
    )
    if not status.failing:
        lines.append(f"failing subscriptions ({rule}): none")
        return "\n".join(lines) + "\n"
    lines.append(f"failing subscriptions ({rule}):")
    rows = [
        [
            str(f.id),
            f.environment_id,
            "yes" if f.active else "no",
            str(f.attempts),
            str(f.failures),
            f"{f.failure_rate:.0%}",
            f.url,
        ]
        for f in status.failing
    ]
    header = ["ID", "ENVIRONMENT", "ACTIVE", "ATTEMPTS", "FAILED", "RATE", "URL"]
    lines.extend(table(header, rows, right={3, 4, 5}))
    return "\n".join(lines) + "\n"
