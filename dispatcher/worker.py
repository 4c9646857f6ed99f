"""The dispatch loop: claim due deliveries, POST them concurrently, hand outcomes to the recorder.

The loop sleeps until the earliest of: a retry's due time (the timer), a NOTIFY of new work,
a freed send slot while a backlog waits, the safety poll, or stop. It never busy-polls.
"""

from __future__ import annotations

import asyncio
import heapq
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson
import structlog

from . import queries
from .config import DeliverySettings, SecuritySettings
from .dberrors import DB_ERRORS
from .envelope import Message, render
from .metrics import Metrics
from .netguard import URLRejectedError, check_url
from .policy import Decision, ErrorKind, Outcome, Verdict, decide
from .profiles import (
    DEFAULT_USER_AGENT,
    EmailOn,
    EndpointSettings,
    ErrorRateLimit,
    SettingsError,
    resolve,
)
from .record import Recorder, Result
from .schedule import Clock, WakeTimer, Wakeup
from .send import Sender
from .signing import SIGNERS, auth_headers

log = structlog.get_logger(__name__)

_STRAIN = frozenset({ErrorKind.TIMEOUT, ErrorKind.CONNECT, ErrorKind.NETWORK})
# A claimed delivery waits at most this long for a slot before it goes back to the queue
# (well inside any lease, which is longer than the request timeout plus 5 s).
_READY_MAX_AGE = 2.0
# An endpoint that has not answered lately starts with this many requests at once and gains
# one per answer (see _adapt), doubling each round trip: one that hangs holds this few slots
# for a whole timeout, not its full cap.
_SLOW_START = 4
_SLOW_START_AFTER = 30.0  # seconds without an answer
# Claims take what falls due this soon (real seconds) and start it at its due time, so a
# retry does not wait for the claim's round trip after it is due.
_LOOKAHEAD = 0.05


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What is the same for every request to one subscription version, worked out once:
    where it goes, its secrets, its settings, its constant headers (content type, user
    agent, receiver auth) and whether its URL is refused."""

    url: str
    secret: str
    # The secret before a rotation signs too until `previous_until` (unix seconds).
    previous_secret: str | None
    previous_until: float | None
    settings: EndpointSettings | SettingsError
    headers: dict[str, str]
    blocked: str | None

    def secrets(self, now: float) -> list[str]:
        """The current signing secret first, then the previous one while it is valid."""
        previous = self.previous_secret
        if previous and self.previous_until is not None and self.previous_until > now:
            return [self.secret, previous]
        return [self.secret]


@dataclass(frozen=True, slots=True)
class Job:
    message: Message
    attempt: int
    url: str
    # The current signing secret first; during a rotation the previous one still signs too.
    secrets: list[str]
    endpoint: EndpointSettings | SettingsError
    headers: dict[str, str]
    blocked: str | None


def failure_email(email_on: EmailOn, verdict: Verdict) -> str | None:
    """Which failure mail an attempt queues: one per failed attempt for EVERY_FAILURE, and
    a last one when the delivery gives up (the kinds of dispatcher.emails)."""
    if verdict is Verdict.DELIVERED or email_on is EmailOn.NEVER:
        return None
    if verdict is Verdict.RETRY:
        return "attempt_failed" if email_on is EmailOn.EVERY_FAILURE else None
    return "gave_up"


class Worker:
    def __init__(
        self,
        pool: asyncpg.Pool,
        sender: Sender,
        settings: DeliverySettings,
        security: SecuritySettings,
        metrics: Metrics,
        *,
        clock: Clock | None = None,
        owner: UUID | None = None,
        retention_days: int = 14,
    ) -> None:
        self._retention_days = retention_days
        self.owner = owner or uuid.uuid4()
        self.timer = WakeTimer()
        self._pool = pool
        self._sender = sender
        self._settings = settings
        self._security = security
        self._metrics = metrics
        self._clock = clock or Clock()
        # Claims and flushes wait to gather a batch, but never for more than a quarter of the
        # slots: with few slots, waiting for a full batch would idle them.
        self._batch = max(1, min(settings.claim_batch, settings.max_in_flight // 4))
        self.recorder = Recorder(
            pool,
            self.owner,
            self.timer,
            metrics,
            interval=settings.flush_interval,
            max_batch=min(settings.flush_max, self._batch),
            on_flushed=self._recorded,
        )
        self._wake = Wakeup()
        # Whether the loop's sleep ends in time for its next claim (else a freed slot wakes it).
        self._sleep_claims = False
        self._stopping = False
        self._want_claim = True
        self._next_claim = 0.0
        self._in_flight = 0
        # Outcomes handed to the recorder and not yet written (their leases are still ours).
        self._unrecorded = 0
        self._per_subscription: Counter[UUID] = Counter()
        # Subscriptions the last claim skipped as full (a freed slot asks for a claim again).
        self._skipped: set[UUID] = set()
        # Configured caps of the subscriptions with work here (lowered by _limits).
        self._caps: dict[UUID, int] = {}
        # Claimed ahead of free slots, by subscription: a freed slot starts the next request at
        # once instead of idling for a claim's round trip. At most a batch of them.
        self._ready: dict[UUID, deque[tuple[float, Job]]] = {}
        self._ready_count = 0
        # Claimed a little before they are due: (due on the clock, delivery id, job), earliest
        # first; one timer moves them to _ready when due.
        self._early: list[tuple[float, int, Job]] = []
        self._early_timer: asyncio.TimerHandle | None = None
        # Lowered concurrency caps of endpoints that are struggling or starting (see _adapt).
        self._limits: dict[UUID, int] = {}
        # When each endpoint last answered, on the clock (see _SLOW_START).
        self._answered: dict[UUID, float] = {}
        self._tasks: dict[asyncio.Task[None], Job] = {}
        self._endpoints: dict[tuple[UUID, datetime], Endpoint] = {}
        self._next_poll = 0.0
        self._next_maintenance = 0.0
        # Subscriptions with an error-rate limit that failed since the last poll.
        self._error_limits: dict[UUID, ErrorRateLimit] = {}
        self._lookahead = _LOOKAHEAD * self._clock.rate  # in the clock's seconds
        metrics.in_flight.set_function(lambda: self._in_flight)
        metrics.unrecorded.set_function(lambda: self._unrecorded)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def notify(self) -> None:
        """New work may be due (NOTIFY, reconnect, reactivation)."""
        self._want_claim = True
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def _recorded(self, results: list[Result]) -> None:
        """Outcomes written. A request's slot is freed as soon as it has its outcome, but a new
        request starts only while requests in flight plus outcomes not yet written stay under
        max_in_flight: at a crash, what was sent and not recorded (and so is sent again)
        never exceeds max_in_flight."""
        self._unrecorded -= len(results)
        if self._ready_count:
            self._fill()
        if any(r.decision.next_at is not None for r in results):
            self._wake.set()  # retries were armed: the loop may have to wake sooner
        else:
            self._maybe_wake()

    def _maybe_wake(self) -> None:
        """After a request or a write, wake the loop only if it would now claim: a batch's
        room, or any room when its sleep does not end in time for a claim. (Otherwise its own
        deadline, which counts the next claim, the timer and the poll, wakes it.)"""
        if self._wake.is_set() or not self._want_claim:
            return
        room = self._claimable()
        if room >= self._batch or (room > 0 and not self._sleep_claims):
            self._wake.set()

    def _claimable(self) -> int:
        """How many deliveries a claim may take: the free slots (see _recorded) plus a batch
        to have ready."""
        limit = self._settings.max_in_flight
        taken = self._in_flight + self._unrecorded + self._ready_count + len(self._early)
        return limit + self._batch - taken

    def _release_slot(self, sid: UUID) -> None:
        if sid in self._skipped:
            # The last claim skipped it as full; it may have more waiting.
            self._skipped.discard(sid)
            self._want_claim = True
        self._in_flight -= 1
        self._per_subscription[sid] -= 1
        if self._per_subscription[sid] <= 0:
            del self._per_subscription[sid]
            if sid not in self._ready:
                self._caps.pop(sid, None)
        if self._ready_count:
            self._fill(sid)

    def _fill(self, first: UUID | None = None) -> None:
        """Start ready deliveries while there are free slots, within each endpoint's cap;
        `first` (whose slot just freed) is served before the others."""
        if self._stopping:
            return
        limit = self._settings.max_in_flight
        order = list(self._ready)
        if first is not None and first in self._ready:
            order.insert(0, first)
        for sid in order:
            if self._in_flight + self._unrecorded >= limit:
                return
            queue = self._ready.get(sid)
            if queue is None:
                continue
            cap = self._effective_cap(sid)
            while (
                queue
                and self._in_flight + self._unrecorded < limit
                and self._per_subscription[sid] < cap
            ):
                self._start(queue.popleft()[1])
                self._ready_count -= 1
            if not queue:
                del self._ready[sid]

    def _take_stale(self, mono: float) -> list[int]:
        """Ready deliveries that waited too long for their endpoint's cap: they go back to the
        queue (due now) before their lease can run out."""
        stale: list[int] = []
        for sid in list(self._ready):
            queue = self._ready[sid]
            while queue and mono - queue[0][0] > _READY_MAX_AGE:
                stale.append(queue.popleft()[1].message.delivery_id)
            if not queue:
                del self._ready[sid]
                if sid not in self._per_subscription:
                    self._caps.pop(sid, None)
        self._ready_count -= len(stale)
        return stale

    def _oldest_ready(self) -> float | None:
        heads = [queue[0][0] for queue in self._ready.values() if queue]
        return min(heads) if heads else None

    async def run(self) -> None:
        """Dispatch until stop(); then drain within the grace period and release the rest."""
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                self._wake.clear()
                mono = loop.time()
                if mono >= self._next_poll:
                    await self._poll()
                    self._next_poll = mono + self._settings.poll_interval
                # A retry that fell due is claimed at once: batching it would make it late.
                retry_due = self.timer.pop_due(self._clock() + self._lookahead) > 0
                if retry_due:
                    self._want_claim = True
                if self.timer.overflowed and not len(self.timer):
                    self.timer.overflowed = False
                    await self._arm_next_due()
                if self._ready_count:
                    stale = self._take_stale(mono)
                    if stale:
                        self._want_claim = True
                        await self._release(stale, "stale")
                room = self._claimable()
                if (
                    self._want_claim
                    and room > 0
                    and (retry_due or room >= self._batch or mono >= self._next_claim)
                ):
                    await self._claim(room)
                    continue
                await self._sleep(mono, room)
        finally:
            await self._drain()

    async def _sleep(self, mono: float, free: int) -> None:
        delays = [self._next_poll - mono]
        if self._want_claim and free > 0:
            delays.append(self._next_claim - mono)
        at = self.timer.next_at()
        if at is not None:
            delays.append(self._clock.real_seconds(at - self._lookahead - self._clock()))
        oldest = self._oldest_ready()
        if oldest is not None:
            delays.append(oldest + _READY_MAX_AGE + 0.01 - mono)
        self._sleep_claims = self._want_claim and free > 0
        await self._wake.wait(max(min(delays), 0.0))

    async def _claim(self, claimable: int) -> None:
        limit = min(claimable, self._settings.claim_batch)
        saturated: list[UUID] = []
        self._skipped.clear()
        busy: list[UUID] = []
        room: list[int] = []
        for sid in self._per_subscription.keys() | self._limits.keys() | self._ready.keys():
            cap = self._effective_cap(sid)
            # As much again may wait ready for the endpoint's next free slots.
            ready = len(self._ready.get(sid, ()))
            free_here = 2 * cap - self._per_subscription.get(sid, 0) - ready
            if free_here <= 0:
                saturated.append(sid)
                self._skipped.add(sid)
            else:
                busy.append(sid)
                room.append(free_here)
        now = self._clock()
        # Consumed before the query: a NOTIFY or a freed slot during the await sets it again.
        self._want_claim = False
        began = time.perf_counter()
        try:
            rows = await self._pool.fetch(
                queries.CLAIM,
                now + self._lookahead,
                limit,
                self._settings.lease_seconds,
                saturated,
                self.owner,
                busy,
                room,
                2 * _SLOW_START,
            )
        except DB_ERRORS as exc:
            self._metrics.db_errors.labels("claim").inc()
            log.warning("claim.failed", error=str(exc))
            self._want_claim = True
            self._next_claim = asyncio.get_running_loop().time() + 1.0
            return
        self._metrics.db_seconds.labels("claim").observe(time.perf_counter() - began)
        self._metrics.claims.inc()
        self._metrics.claimed.inc(len(rows))
        # A full batch locked means more is due: claim again as slots free up, in batches.
        # Rows held back by an idle endpoint's share (see queries.CLAIM) are claimed again at
        # once: known now, it comes with its room next time, or is skipped when full.
        mono = asyncio.get_running_loop().time()
        self._next_claim = mono + self._settings.flush_interval / 2
        if rows and rows[0]["scanned"] == limit:
            self._want_claim = True
        if rows and rows[0]["shared"] < rows[0]["scanned"]:
            self._want_claim = True
            self._next_claim = mono
        excess: list[int] = []
        endpoints = await self._endpoints_of(rows)
        wall = time.time()
        early = False
        for row in rows:
            endpoint = endpoints.get(row["subscription_id"])
            if endpoint is None:
                # Deleted since the claim (its deliveries went with it).
                continue
            job = self._job(row, endpoint, wall)
            if row["due_at"] > now:
                heapq.heappush(self._early, (row["due_at"], job.message.delivery_id, job))
                early = True
                continue
            sid = job.message.subscription_id
            waiting = len(self._ready.get(sid, ()))
            if self._per_subscription[sid] + waiting >= 2 * self._cap(sid, job.endpoint):
                excess.append(job.message.delivery_id)
                continue
            self._make_ready(job, mono, now)
        if early:
            self._arm_early()
        self._fill()
        if excess:
            # More than the endpoint may take soon: back to the queue, due now, for whichever
            # instance has room for it first.
            self._want_claim = True
            await self._release(excess, "excess")

    def _arm_early(self) -> None:
        """One timer, for the earliest delivery claimed before its due time."""
        if self._early_timer is not None:
            self._early_timer.cancel()
            self._early_timer = None
        if self._early:
            delay = self._clock.real_seconds(self._early[0][0] - self._clock())
            loop = asyncio.get_running_loop()
            self._early_timer = loop.call_later(max(delay, 0.0), self._start_due)

    def _start_due(self) -> None:
        """Move the early deliveries that are now due to _ready and start what fits. Judged
        by the clock, not the timer: a timer may fire a little early."""
        self._early_timer = None
        now = self._clock()
        mono = asyncio.get_running_loop().time()
        while self._early and self._early[0][0] <= now:
            self._make_ready(heapq.heappop(self._early)[2], mono, now)
        self._arm_early()
        self._fill()

    def _make_ready(self, job: Job, mono: float, now: float) -> None:
        """Queue a claimed job to start as soon as a slot and its endpoint's cap allow."""
        sid = job.message.subscription_id
        configured = self._configured_cap(job.endpoint)
        if (
            configured > _SLOW_START
            and sid not in self._limits
            and now - self._answered.get(sid, 0.0) > _SLOW_START_AFTER
            and sid not in self._per_subscription
        ):
            self._limits[sid] = _SLOW_START
        self._caps[sid] = configured
        self._ready.setdefault(sid, deque()).append((mono, job))
        self._ready_count += 1

    async def _release(
        self, deliveries: list[int], why: str, due: list[float] | None = None
    ) -> None:
        """Hand claimed rows back, due now or each at its `due` time."""
        if due is None:
            due = [self._clock()] * len(deliveries)
        try:
            await self._pool.execute(queries.RELEASE, deliveries, self.owner, due)
        except DB_ERRORS as exc:
            self._metrics.db_errors.labels("release").inc()
            log.warning("release.failed", deliveries=len(deliveries), why=why, error=str(exc))
        else:
            log.debug("worker.released", deliveries=len(deliveries), why=why)

    def _configured_cap(self, endpoint: EndpointSettings | SettingsError) -> int:
        if isinstance(endpoint, EndpointSettings) and endpoint.max_in_flight is not None:
            return endpoint.max_in_flight
        return self._settings.max_per_endpoint

    def _effective_cap(self, sid: UUID) -> int:
        """The cap of an endpoint with work here: configured, lowered by _adapt."""
        default = self._settings.max_per_endpoint
        return min(self._caps.get(sid, default), self._limits.get(sid, default))

    def _cap(self, sid: UUID, endpoint: EndpointSettings | SettingsError) -> int:
        """The configured cap, lowered while the endpoint struggles (see _adapt)."""
        configured = self._configured_cap(endpoint)
        return min(configured, self._limits.get(sid, configured))

    def _adapt(self, job: Job, outcome: Outcome) -> None:
        """Halve an endpoint's concurrency when it times out, refuses connections or says 429,
        and give one slot back per answer: an endpoint that holds slots for long keeps few of
        them, so it cannot starve healthy ones. (A quick 5xx frees its slot at once: it is
        retried on its schedule, not throttled.)"""
        sid = job.message.subscription_id
        configured = self._configured_cap(job.endpoint)
        current = self._limits.get(sid, configured)
        status = outcome.status
        if outcome.error in _STRAIN or status == 429:
            if len(self._limits) > 10_000:
                self._limits.clear()
            self._limits[sid] = max(1, current // 2)
            return
        if status is not None:
            if len(self._answered) > 100_000:
                self._answered.clear()  # a few endpoints start slow again
            self._answered[sid] = outcome.finished_at
        if sid in self._limits:
            if current + 1 >= configured:
                del self._limits[sid]
            else:
                self._limits[sid] = current + 1

    async def _endpoints_of(self, rows: list[asyncpg.Record]) -> dict[UUID, Endpoint]:
        """Each claimed subscription's Endpoint: from the cache, and the versions it does not
        hold yet read in one statement."""
        found: dict[UUID, Endpoint] = {}
        missing: set[UUID] = set()
        for row in rows:
            sid = row["subscription_id"]
            if sid in found or sid in missing:
                continue
            endpoint = self._endpoints.get((sid, row["updated_at"]))
            if endpoint is None:
                missing.add(sid)
            else:
                found[sid] = endpoint
        if not missing:
            return found
        try:
            subscriptions = await self._pool.fetch(queries.SUBSCRIPTIONS, list(missing))
        except DB_ERRORS as exc:
            # The claimed rows keep their lease and come back when it ends.
            self._metrics.db_errors.labels("subscriptions").inc()
            log.warning("subscriptions.failed", error=str(exc))
            return found
        if len(self._endpoints) > 10_000:
            self._endpoints.clear()
        for sub in subscriptions:
            endpoint = self._endpoint(sub)
            self._endpoints[sub["id"], sub["updated_at"]] = endpoint
            found[sub["id"]] = endpoint
        return found

    def _job(self, row: asyncpg.Record, endpoint: Endpoint, now: float) -> Job:
        return Job(
            message=Message(
                delivery_id=row["id"],
                subscription_id=row["subscription_id"],
                event_id=row["event_id"],
                event_name=row["event_name"],
                environment_id=row["environment_id"],
                entity_instance_id=row["entity_instance_id"],
                created_at=row["created_at"],
                payload=row["payload"],
            ),
            attempt=row["attempts"] + 1,
            url=endpoint.url,
            secrets=endpoint.secrets(now),
            endpoint=endpoint.settings,
            headers=endpoint.headers,
            blocked=endpoint.blocked,
        )

    def _endpoint(self, row: asyncpg.Record) -> Endpoint:
        settings = self._resolve(row["profile"], row["settings"])
        user_agent = (
            settings.user_agent if isinstance(settings, EndpointSettings) else DEFAULT_USER_AGENT
        )
        headers = {
            "Content-Type": "application/json",
            "User-Agent": user_agent,
            **auth_headers(orjson.loads(row["auth"])),
        }
        blocked = None
        try:
            check_url(
                row["url"],
                allow_http=self._security.allow_http,
                allow_private=self._security.allow_private_networks,
                allow_loopback=self._security.allow_loopback,
            )
        except URLRejectedError as exc:
            blocked = str(exc)
        return Endpoint(
            url=row["url"],
            secret=row["secret"],
            previous_secret=row["previous_secret"],
            previous_until=row["previous_until"],
            settings=settings,
            headers=headers,
            blocked=blocked,
        )

    def _resolve(self, profile: str, settings: str) -> EndpointSettings | SettingsError:
        try:
            overrides: Any = orjson.loads(settings)
            return resolve(
                profile,
                overrides,
                timeout=self._settings.timeout,
                connect_timeout=self._settings.connect_timeout,
            )
        except SettingsError as exc:
            return exc

    def _start(self, job: Job) -> None:
        self._in_flight += 1
        self._per_subscription[job.message.subscription_id] += 1
        task = asyncio.create_task(self._deliver(job))
        self._tasks[task] = job
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        job = self._tasks.pop(task)
        if task.cancelled() or task.exception() is not None:
            # No outcome will be recorded for it: free its slot now.
            if not task.cancelled():
                log.error(
                    "delivery.crashed",
                    delivery_id=job.message.delivery_id,
                    error=repr(task.exception()),
                )
            self._release_slot(job.message.subscription_id)
            self._wake.set()

    async def _deliver(self, job: Job) -> None:
        outcome, body = await self._attempt(job)
        self._adapt(job, outcome)
        endpoint = job.endpoint
        if isinstance(endpoint, SettingsError):
            decision = Decision(Verdict.FAILED)
            email = None
        else:
            decision = decide(
                endpoint.policy, job.attempt, outcome, job.message.created_at.timestamp()
            )
            email = failure_email(endpoint.email_on, decision.verdict)
            if endpoint.error_rate is not None and decision.verdict is not Verdict.DELIVERED:
                self._error_limits[job.message.subscription_id] = endpoint.error_rate
        self._unrecorded += 1
        self.recorder.add(
            Result(
                job.message.delivery_id,
                job.message.subscription_id,
                job.attempt,
                outcome,
                decision,
                email=email,
                body=body.decode(errors="replace") if email and body is not None else None,
            )
        )
        log.debug(
            "delivery.attempted",
            delivery_id=job.message.delivery_id,
            attempt=job.attempt,
            status=outcome.status,
            verdict=decision.verdict.value,
        )
        # The request is over: its slot (and its endpoint's) is free for the next one.
        self._release_slot(job.message.subscription_id)
        self._maybe_wake()

    async def _attempt(self, job: Job) -> tuple[Outcome, bytes | None]:
        """The attempt's outcome and the body it sent (None when nothing was sent)."""
        endpoint = job.endpoint
        if isinstance(endpoint, SettingsError):
            now = self._clock()
            return Outcome(now, now, 0.0, error=ErrorKind.SETTINGS, detail=str(endpoint)), None
        if job.blocked is not None:
            now = self._clock()
            return Outcome(now, now, 0.0, error=ErrorKind.BLOCKED, detail=job.blocked), None
        sent_ns = time.time_ns()
        body = render(endpoint.envelope, job.message, sent_ns)
        headers = dict(job.headers)
        headers.update(
            SIGNERS[endpoint.signature](
                job.secrets,
                f"msg_{job.message.delivery_id}",
                body,
                sent_ns // 1_000_000,
                endpoint.signature_header,
            )
        )
        return await self._sender.post(job.url, body, headers, endpoint), body

    async def _poll(self) -> None:
        """The slow safety net: work other instances scheduled, gauges, partitions."""
        self._want_claim = True
        await self._arm_next_due()
        try:
            stats = await self._pool.fetchrow(queries.QUEUE_STATS)
            self._metrics.queue_depth.set(stats["depth"])
            self._metrics.oldest_due_age.set(float(stats["oldest_due_age"]))
            self._metrics.subscriptions.labels("active").set(stats["active_subscriptions"])
            self._metrics.subscriptions.labels("inactive").set(stats["inactive_subscriptions"])
        except DB_ERRORS as exc:
            self._metrics.db_errors.labels("poll").inc()
            log.warning("poll.failed", error=str(exc))
        if self._error_limits:
            await self._deactivate_failing()
        mono = asyncio.get_running_loop().time()
        if mono >= self._next_maintenance:
            self._next_maintenance = mono + 3600
            await self._maintain()

    async def _deactivate_failing(self) -> None:
        """Deactivate subscriptions whose error rate stays above their limit; their queued
        deliveries wait (paused) for a reactivation."""
        limits, self._error_limits = self._error_limits, {}
        try:
            rows = await self._pool.fetch(
                queries.ERROR_RATE_DEACTIVATE,
                list(limits),
                [lim.threshold for lim in limits.values()],
                [lim.min_attempts for lim in limits.values()],
                [lim.window for lim in limits.values()],
            )
        except DB_ERRORS as exc:
            self._metrics.db_errors.labels("error_rate").inc()
            log.warning("error_rate.failed", error=str(exc))
            return
        for row in rows:
            self._metrics.deactivations.labels("error_rate").inc()
            log.warning(
                "subscription.deactivated",
                subscription_id=str(row["id"]),
                reason=row["deactivated_reason"],
            )

    async def _maintain(self) -> None:
        """Hourly: partitions for the next days, retention for the old ones."""
        try:
            await self._pool.execute(queries.PARTITIONS)
            dropped = await self._pool.fetchval(queries.DROP_PARTITIONS, self._retention_days)
            if dropped:
                log.info("retention.dropped", partitions=dropped, keep_days=self._retention_days)
        except DB_ERRORS as exc:
            self._metrics.db_errors.labels("maintenance").inc()
            log.warning("maintenance.failed", error=str(exc))

    async def _arm_next_due(self) -> None:
        try:
            due = await self._pool.fetchval(queries.NEXT_DUE)
        except DB_ERRORS as exc:
            self._metrics.db_errors.labels("next_due").inc()
            log.warning("next_due.failed", error=str(exc))
            return
        if due is not None:
            self.timer.arm(due.timestamp())

    async def _drain(self) -> None:
        """Let in-flight requests finish within the grace period; release what did not, and
        what was claimed ahead and never started."""
        self._stopping = True  # also when the loop died: _fill starts nothing more
        now = self._clock()
        unsent = [job.message.delivery_id for q in self._ready.values() for _, job in q]
        due = [now] * len(unsent)
        self._ready.clear()
        self._ready_count = 0
        if self._early_timer is not None:
            self._early_timer.cancel()
        # Claimed ahead of their time: released due at it, not now.
        for at, delivery_id, _ in self._early:
            unsent.append(delivery_id)
            due.append(at)
        self._early.clear()
        tasks = list(self._tasks)
        if tasks:
            log.info(
                "worker.draining", in_flight=len(tasks), grace_period=self._settings.grace_period
            )
            _, pending = await asyncio.wait(tasks, timeout=self._settings.grace_period)
            cut = [self._tasks[t].message.delivery_id for t in pending if t in self._tasks]
            unsent += cut
            due += [self._clock()] * len(cut)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if unsent:
            await self._release(unsent, "stop", due)
        await self.recorder.flush(give_up_after=self._settings.grace_period)
