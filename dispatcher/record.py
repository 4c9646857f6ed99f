"""Outcome writer: buffers attempt results, writes them in batches shielded from cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

import asyncpg
import structlog

from . import queries
from .metrics import Metrics
from .policy import Decision, Outcome
from .schedule import WakeTimer

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Result:
    delivery_id: int
    subscription_id: UUID
    attempt: int
    outcome: Outcome
    decision: Decision


class Recorder:
    """Collects results; flushes every `interval` seconds or `max_batch` results.

    A flush is one statement (queries.RECORD). Retry times are armed in the timer only after
    the flush committed: Postgres holds every retry before memory does.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        owner: UUID,
        timer: WakeTimer,
        metrics: Metrics,
        *,
        interval: float,
        max_batch: int,
        on_flushed: Callable[[list[Result]], None],
    ) -> None:
        self._pool = pool
        self._owner = owner
        self._timer = timer
        self._metrics = metrics
        self._interval = interval
        self._max_batch = max_batch
        self._on_flushed = on_flushed
        self._pending: list[Result] = []
        self._has_pending = asyncio.Event()
        self._full = asyncio.Event()
        self._lock = asyncio.Lock()

    def add(self, result: Result) -> None:
        self._pending.append(result)
        self._has_pending.set()
        if len(self._pending) >= self._max_batch:
            self._full.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        while True:
            await self._has_pending.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self._interval)
            await self.flush()

    async def flush(self, *, give_up_after: float | None = None) -> None:
        """Write what is pending; retries a failing database until it answers (or the deadline)."""
        async with self._lock:
            batch, self._pending = self._pending, []
            self._has_pending.clear()
            self._full.clear()
            if not batch:
                return
            loop = asyncio.get_running_loop()
            deadline = None if give_up_after is None else loop.time() + give_up_after
            backoff = 0.1
            while True:
                try:
                    await asyncio.shield(self._write(batch))
                    break
                except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                    self._metrics.db_errors.labels("record").inc()
                    if deadline is not None and loop.time() + backoff > deadline:
                        # Their leases run out and the deliveries are sent again: at least once.
                        log.error("record.abandoned", results=len(batch), error=str(exc))
                        self._on_flushed(batch)
                        return
                    log.warning(
                        "record.retrying", results=len(batch), error=str(exc), backoff=backoff
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        self._account(batch)
        self._on_flushed(batch)

    async def _write(self, batch: list[Result]) -> None:
        await self._pool.fetchrow(
            queries.RECORD,
            [r.delivery_id for r in batch],
            [r.subscription_id for r in batch],
            [r.attempt for r in batch],
            [r.outcome.started_at for r in batch],
            [r.outcome.duration * 1000.0 for r in batch],
            [r.outcome.status for r in batch],
            [_error_text(r.outcome) for r in batch],
            [r.outcome.body_excerpt or None for r in batch],
            [r.decision.verdict.value for r in batch],
            [r.decision.next_at for r in batch],
            self._owner,
        )

    def _account(self, batch: list[Result]) -> None:
        m = self._metrics
        m.flushes.inc()
        attempts: Counter[tuple[str, str]] = Counter()
        ended: Counter[str] = Counter()
        for r in batch:
            verdict = r.decision.verdict.value
            status = r.outcome.status
            attempts[verdict, f"{status // 100}xx" if status else "none"] += 1
            m.attempt_seconds.observe(r.outcome.duration)
            if r.decision.next_at is not None:
                self._timer.arm(r.decision.next_at)
            else:
                ended[verdict] += 1
        for labels, n in attempts.items():
            m.attempts.labels(*labels).inc(n)
        for verdict, n in ended.items():
            m.deliveries.labels(verdict).inc(n)


def _error_text(outcome: Outcome) -> str | None:
    if outcome.error is None:
        return None
    return f"{outcome.error.value}: {outcome.detail}" if outcome.detail else outcome.error.value
