"""Outcome writer: buffers attempt results, writes them in batches shielded from cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from uuid import UUID

import asyncpg
import structlog

from . import operational, queries
from .dberrors import Backoff, Outage
from .failure_log import FailureLog
from .metrics import Metrics
from .policy import Action, Decision, Outcome, Verdict
from .schedule import WakeTimer

log = structlog.get_logger(__name__)

# Errors that say the database is away or busy, not that the batch is wrong: retry it whole
# (InternalClientError: see dberrors).
_TRANSIENT = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.TransactionRollbackError,
    asyncpg.InsufficientResourcesError,
)


@dataclass(slots=True)  # not frozen: one per delivery (see attempt.py)
class Result:
    delivery_id: int
    subscription_id: UUID
    attempt: int
    outcome: Outcome
    decision: Decision
    # A failure mail to queue (a kind of dispatcher.emails) and the request body it quotes.
    email: str | None = None
    body: str | None = None
    # The delivery's event (operational events publish no further ones about themselves)
    # and the subscription's failing_threshold (None: no delivery_failing events).
    event_name: str = ""
    failing_threshold: int | None = None
    # The delivery's ordering key (sql/0010), None when unordered: a finished one releases
    # the next of its key.
    order_key: str | None = None


@dataclass(frozen=True, slots=True)
class Leasing:
    """How the recorder takes the deliveries it releases behind ended heads (ordering): into
    this instance's lease, `seconds` from `clock()` (the daemon's clock), handed to `take`
    as claimed rows (queries.RECORD_ENDING_HEADS) once their transaction committed, with the number
    of slots the flush is about to free: the released rows have the first claim on them."""

    clock: Callable[[], float]
    seconds: float
    take: Callable[[list[asyncpg.Record], int], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Parts:
    """What a batch writes besides its outcomes: what its failures publish (in the outcomes'
    statement, queries.RECORD_FAILURES), the rare rest (a statement each, in one
    transaction), and the results that end heads of ordering keys."""

    actions: list[Result]
    emails: list[Result]
    honoured: list[Result]
    paused: list[Result]
    exhausted: list[Result]
    streaks: operational.StreakChanges | None
    heads: list[Result]

    @property
    def failures(self) -> bool:
        return bool(self.exhausted or self.streaks)

    @property
    def rare(self) -> bool:
        return bool(self.actions or self.emails or self.honoured or self.paused)


class Recorder:
    """Collects results; flushes every `interval` seconds or `max_batch` results, writing at
    most `largest` at once.

    A flush is one statement (queries.RECORD). Retry times are armed in the timer only after
    the flush committed: Postgres holds every retry before memory does. Flushes write one
    after another; the next starts before the last one's hand-over (see flush), and a
    bound on each keeps two in play when all the worker's slots end at once (as ordered keys
    do, whose next deliveries only a flush releases): one is written while the requests the
    other freed are sent, where a single flush of everything left PostgreSQL and the
    requests waiting for each other in turn (ordered burn-down 0.66 → 0.78-0.85 of
    unordered, issue 17).
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
        largest: int | None = None,
        on_flushed: Callable[[list[Result]], None],
        failures: FailureLog | None = None,
        outage: Outage | None = None,
        leasing: Leasing | None = None,
    ) -> None:
        self._outage = outage or Outage()
        self._leasing = leasing
        # False (a stopping instance): released deliveries are left for any instance.
        self.lease_released = leasing is not None
        self._released: list[asyncpg.Record] = []
        self._pool = pool
        self._owner = owner
        self._timer = timer
        self._metrics = metrics
        self._interval = interval
        self._max_batch = max_batch
        self._largest = largest
        self._on_flushed = on_flushed
        self._failures = failures or FailureLog()
        self.streaks = operational.Streaks()
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
            if not self._full.is_set():
                # asyncio.timeout, not wait_for: wait_for returns the event's result to a
                # task cancelled as it is set, and the cancellation is lost.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._full.wait()
            await self.flush()

    async def flush(self, *, give_up_after: float | None = None) -> None:
        """Write what is pending, in batches of at most `largest`, and more while a batch's
        worth came in meanwhile; retries while the database is away (until the deadline)."""
        try:
            await asyncio.wait_for(self._lock.acquire(), give_up_after)
        except TimeoutError:
            batch, self._pending = self._pending, []
            log.error("record.abandoned", results=len(batch), reason="a flush is stuck")
            self._on_flushed(batch)
            return
        try:
            loop = asyncio.get_running_loop()
            deadline = None if give_up_after is None else loop.time() + give_up_after
            owed = len(self._pending)
            batch = self._take()
            owed -= len(batch)
            # One task per batch, so a cancelled flush cannot cut a write short.
            writing = asyncio.ensure_future(self._commit(batch, deadline)) if batch else None
            while writing is not None:
                written = await asyncio.shield(writing)
                # A batch's worth that came in meanwhile goes out before this batch's
                # hand-over starts the requests it frees: PostgreSQL writes it while they
                # are sent, instead of waiting for their start behind them in the loop.
                # (Only a one-statement write: a transaction's round trips would each wait
                # behind those requests, and hold the next write back longer.)
                following = self._take() if owed > 0 or self._full.is_set() else []
                owed -= len(following)
                early = bool(following) and self._one_statement(self._parts(following))
                writing = (
                    asyncio.ensure_future(self._commit(following, deadline)) if early else None
                )
                if written:
                    self._account(batch)
                    self._failures.note(batch)
                # Under the lock: a stopping worker's last flush waits for this hand-over.
                await self._hand_over(len(batch))
                self._on_flushed(batch)
                if following and not early:
                    writing = asyncio.ensure_future(self._commit(following, deadline))
                batch = following
        finally:
            self._lock.release()

    def _take(self) -> list[Result]:
        """The next batch: what is pending, up to `largest`."""
        largest = self._largest or len(self._pending)
        batch, self._pending = self._pending[:largest], self._pending[largest:]
        if not self._pending:
            self._has_pending.clear()
        if len(self._pending) < self._max_batch:
            self._full.clear()
        return batch

    async def _commit(self, batch: list[Result], deadline: float | None) -> bool:
        """Write the batch, retrying while the database is away; False once the deadline
        passes first (their leases run out and the deliveries are sent again: at least
        once)."""
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        # Results written (or refused for good) so far: a retry writes the others only (the
        # attempts of a written half would be recorded twice).
        settled: set[int] = set()
        while True:
            left = [r for r in batch if id(r) not in settled]
            try:
                await self._write_isolating(left, settled)
                self._outage.succeeded()
                return True
            except _TRANSIENT as exc:
                self._metrics.db_errors.labels("record").inc()
                self._outage.failed("record", exc)
                delay = backoff.next()
                if deadline is not None and loop.time() + delay > deadline:
                    log.error("record.abandoned", results=len(batch), error=str(exc))
                    return False
                log.debug("record.retrying", results=len(batch), retry_in=delay)
                if isinstance(exc, asyncpg.InternalClientError):
                    # Its connection may go back to the pool in a broken state.
                    await self._pool.expire_connections()
                await asyncio.sleep(delay)

    async def _hand_over(self, freeing: int) -> None:
        """Give the worker what this flush released into its lease (committed ones only)."""
        released, self._released = self._released, []
        if released and self._leasing is not None:
            await self._leasing.take(released, freeing)

    async def _write_isolating(self, batch: list[Result], settled: set[int]) -> None:
        """Write the batch; a result the database refuses for good is set aside alone.

        Halving the batch finds it in log2(n) writes; the others are written. The refused
        one keeps its lease and is sent again when the lease ends (at least once). What was
        written or refused is added to `settled` (ids of the results).
        """
        try:
            await self._write(batch)
        except _TRANSIENT:
            raise
        except asyncpg.PostgresError as exc:
            if len(batch) == 1:
                self._metrics.db_errors.labels("record_refused").inc()
                log.error("record.refused", delivery_id=batch[0].delivery_id, error=str(exc))
                settled.add(id(batch[0]))
                return
            half = len(batch) // 2
            await self._write_isolating(batch[:half], settled)
            await self._write_isolating(batch[half:], settled)
            return
        settled.update(id(r) for r in batch)

    def _parts(self, batch: list[Result]) -> _Parts:
        return _Parts(
            actions=[r for r in batch if r.decision.action is not None],
            emails=[r for r in batch if r.email is not None],
            honoured=[r for r in batch if r.decision.retry_after is not None],
            paused=[r for r in batch if r.decision.pause_until is not None],
            exhausted=operational.gave_up(batch),
            streaks=self.streaks.changes(batch),
            heads=[
                r
                for r in batch
                if r.order_key is not None and r.decision.verdict is not Verdict.RETRY
            ],
        )

    def _one_statement(self, parts: _Parts) -> bool:
        """Whether the batch is written in one statement, no transaction round trips: its
        outcomes with what its failures publish (the common case), or an ordered batch's
        ending heads without failures (one call, its own transaction: sql/0014, sql/0016)."""
        if parts.rare:
            return False
        return not parts.heads or (self.lease_released and not parts.failures)

    async def _write(self, batch: list[Result]) -> None:
        parts = self._parts(batch)
        if self._one_statement(parts):
            if parts.heads:
                released = await self._record_ending_heads(self._pool, batch, parts.heads)
                self._released += [row for row in released if row["leased"]]
            else:
                await self._record(self._pool, batch, parts)
                self._settle(parts)
            return
        # Rare: what an answer does to its subscription, failure mails and Retry-After (and
        # the end of an ordered key's head with failures, or from a stopping instance, which
        # notifies the others) commit with the outcomes or not at all.
        released = []
        async with self._pool.acquire() as conn, conn.transaction():
            if parts.heads:
                released = await self._record_ending_heads(conn, batch, parts.heads)
                if parts.failures:
                    await self._record(conn, [], parts)
            else:
                await self._record(conn, batch, parts)
            if parts.honoured:
                await conn.execute(
                    queries.NOTE_RETRY_AFTER,
                    [r.delivery_id for r in parts.honoured],
                    [r.attempt for r in parts.honoured],
                    [r.decision.retry_after for r in parts.honoured],
                )
            if parts.paused:
                await conn.execute(
                    queries.PAUSE_ENDPOINTS,
                    [r.subscription_id for r in parts.paused],
                    [r.decision.pause_until for r in parts.paused],
                )
            if parts.emails:
                await conn.execute(
                    queries.QUEUE_EMAILS,
                    [r.delivery_id for r in parts.emails],
                    [r.subscription_id for r in parts.emails],
                    [r.email for r in parts.emails],
                    [r.attempt for r in parts.emails],
                    [r.outcome.status for r in parts.emails],
                    [_error_text(r.outcome) for r in parts.emails],
                    [r.body for r in parts.emails],
                )
            deactivate = [r for r in parts.actions if r.decision.action is Action.DEACTIVATE]
            if deactivate:
                await conn.execute(
                    queries.DEACTIVATE,
                    [r.subscription_id for r in deactivate],
                    [f"receiver answered {r.outcome.status}" for r in deactivate],
                )
            delete = [
                r.subscription_id for r in parts.actions if r.decision.action is Action.DELETE
            ]
            if delete:
                # A delete leaves no row for the active trigger: endpoint_disabled from here.
                await conn.execute(queries.PUBLISH_DELETED, delete)
                await conn.execute(queries.DELETE_SUBSCRIPTIONS, delete)
        self._released += [row for row in released if row["leased"]]
        self._settle(parts)
        for r in parts.actions:
            reason = "unsubscribe" if r.decision.action is Action.DELETE else "status"
            self._metrics.deactivations.labels(reason).inc()
            log.warning(
                "subscription."
                + ("deleted" if r.decision.action is Action.DELETE else "deactivated"),
                subscription_id=str(r.subscription_id),
                status=r.outcome.status,
            )

    def _settle(self, parts: _Parts) -> None:
        """After the batch committed: the streaks it wrote are the known ones."""
        if parts.streaks:
            self.streaks.settle(parts.streaks)

    async def _record(
        self, conn: asyncpg.Pool | asyncpg.Connection, batch: list[Result], parts: _Parts
    ) -> None:
        """queries.RECORD, or RECORD_FAILURES when the batch's failures publish."""
        began = time.perf_counter()
        if not parts.failures:
            await conn.fetchrow(queries.RECORD, *self._outcomes(batch))
        else:
            exhausted, streaks = parts.exhausted, parts.streaks
            await conn.fetchrow(
                queries.RECORD_FAILURES,
                *self._outcomes(batch),
                [r.delivery_id for r in exhausted],
                [r.subscription_id for r in exhausted],
                [r.event_name for r in exhausted],
                [r.decision.verdict.value for r in exhausted],
                [r.attempt for r in exhausted],
                [r.outcome.status for r in exhausted],
                [_error_text(r.outcome) for r in exhausted],
                streaks.subscription_ids if streaks else [],
                streaks.failures if streaks else [],
                streaks.succeeded if streaks else [],
                streaks.thresholds if streaks else [],
                not batch,  # recorded by the transaction's earlier statement
            )
        self._metrics.observe_db("record", time.perf_counter() - began, len(batch))

    async def _record_ending_heads(
        self, conn: asyncpg.Pool | asyncpg.Connection, batch: list[Result], heads: list[Result]
    ) -> list[asyncpg.Record]:
        """Record, and release the next delivery of each key whose head ended: into this
        instance's lease while it takes them, else for any instance (which a NOTIFY wakes:
        only ever in a transaction, see _write)."""
        leasing = self._leasing if self.lease_released else None
        began = time.perf_counter()
        rows: list[asyncpg.Record] = await conn.fetch(
            queries.RECORD_ENDING_HEADS,
            *self._outcomes(batch),
            leasing.clock() if leasing is not None else 0.0,
            leasing.seconds if leasing is not None else 0.0,
            self._owner if leasing is not None else None,
            [r.subscription_id for r in heads],
            [r.order_key for r in heads],
        )
        self._metrics.observe_db("record", time.perf_counter() - began, len(batch))
        if rows and leasing is None:
            await conn.execute(queries.NOTIFY_WORK)
        return rows

    def _outcomes(self, batch: list[Result]) -> tuple[object, ...]:
        """RECORD's parameters ($1-$11)."""
        return (
            [r.delivery_id for r in batch],
            [r.subscription_id for r in batch],
            [r.attempt for r in batch],
            [r.outcome.started_at for r in batch],
            [r.outcome.duration * 1000.0 for r in batch],
            [r.outcome.status for r in batch],
            [_error_text(r.outcome) for r in batch],
            [_excerpt(r.outcome) for r in batch],
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


def _excerpt(outcome: Outcome) -> str | None:
    """The response excerpt, after a first line with the redirects followed, if any: the
    attempt's history shows where the webhook went without a new column."""
    if not outcome.redirects:
        return outcome.body_excerpt or None
    chain = "redirected: " + " -> ".join(outcome.redirects)
    if len(chain) > 2000:
        chain = chain[:1999] + "…"
    return chain + "\n" + outcome.body_excerpt


def _error_text(outcome: Outcome) -> str | None:
    if outcome.error is None:
        return None
    return f"{outcome.error.value}: {outcome.detail}" if outcome.detail else outcome.error.value
