"""The dispatch loop: wake, claim due deliveries, start them, hand outcomes to the recorder.

The loop sleeps until the earliest of: a retry's due time (the timer), a NOTIFY of new work
or an upkeep poll (notify), a freed send slot while a backlog waits, or stop. It never
busy-polls. Admission per endpoint is flow.py's, the claimed-but-unstarted jobs ready.py's,
the requests' pure ends attempt.py's.

Time: "now" is the injected Clock (claims, due times, leases); the loop's monotonic time
only for real-time deadlines (a claim's pacing, how long a job waited ready, sleeps).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from uuid import UUID

import asyncpg
import structlog

from . import attempt, queries
from .attempt import Job, Request
from .claim import Claims
from .config import DeliverySettings, SecuritySettings
from .dberrors import DB_ERRORS, Backoff, Outage
from .egress import DIRECT_EGRESS, Egress
from .endpoints import Endpoints
from .flow import Flow
from .metrics import Metrics
from .profiles import ErrorRateLimit
from .ready import ReadyQueue
from .record import Leasing, Recorder, Result
from .schedule import Clock, WakeTimer, Wakeup
from .send import Sender

log = structlog.get_logger(__name__)

# A claimed delivery waits at most this long for a slot before it goes back to the queue
# (well inside any lease, which is longer than the request timeout plus 5 s).
_READY_MAX_AGE = 2.0
# Claims take what falls due this soon (real seconds) and start it at its due time, so a
# retry does not wait for the claim's round trip after it is due.
_LOOKAHEAD = 0.05


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
        outage: Outage | None = None,
        egress: Egress = DIRECT_EGRESS,
    ) -> None:
        self.owner = owner or uuid.uuid4()
        self._outage = outage = outage or Outage()
        self.timer = WakeTimer()
        self._pool = pool
        self._sender = sender
        self._settings = settings
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
            # Half the slots: when they all end at once, two flushes take turns (Recorder).
            largest=min(settings.flush_max, max(settings.max_in_flight // 2, self._batch)),
            on_flushed=self._recorded,
            outage=outage,
            leasing=Leasing(self._clock, settings.lease_seconds, self._admit_released),
        )
        endpoints = Endpoints(pool, settings, security, metrics, outage, egress)
        self._claims = Claims(
            pool,
            self.owner,
            endpoints,
            metrics,
            self._clock,
            lease_seconds=settings.lease_seconds,
            outage=outage,
        )
        self._flow = Flow(settings.max_per_endpoint, ahead=self._batch)
        self._queue = ReadyQueue(_READY_MAX_AGE)
        self._early_timer: asyncio.TimerHandle | None = None
        self._wake = Wakeup()
        # Whether the loop's sleep ends in time for its next claim (else a freed slot wakes it).
        self._sleep_claims = False
        self._stopping = False
        self._want_claim = True
        self._next_claim = 0.0  # monotonic
        # After a failed claim, none before this (monotonic), however much room is free.
        self._claim_backoff = Backoff()
        self._no_claim_before = 0.0
        self._in_flight = 0
        # Payload bytes of the jobs claimed and not finished (ready, held or in flight):
        # no claim while they reach [delivery] claim_bytes.
        self._held_bytes = 0
        # Outcomes handed to the recorder and not yet written (their leases are still ours).
        self._unrecorded = 0
        # Subscriptions the last claim skipped as full (a freed slot asks for a claim again).
        self._skipped: set[UUID] = set()
        self._tasks: dict[asyncio.Task[None], Job] = {}
        # Subscriptions with an error-rate limit that failed since upkeep last asked.
        self._failing: dict[UUID, ErrorRateLimit] = {}
        self._lookahead = _LOOKAHEAD * self._clock.rate  # in the clock's seconds
        metrics.in_flight.set_function(lambda: self._in_flight)
        metrics.unrecorded.set_function(lambda: self._unrecorded)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def held_bytes(self) -> int:
        """Payload bytes claimed and not finished (counted against claim_bytes)."""
        return self._held_bytes

    def notify(self) -> None:
        """New work may be due (NOTIFY, reconnect, reactivation, the safety poll)."""
        self._ask()
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def pause(self, sid: UUID, until: float) -> None:
        """An endpoint asked (perhaps of another instance) to be left alone until `until`."""
        self._flow.pause(sid, until)

    def take_failing(self) -> dict[UUID, ErrorRateLimit]:
        failing, self._failing = self._failing, {}
        return failing

    async def rearm(self) -> None:
        """Arm the timer with the earliest due time in Postgres (the safety poll, or a timer
        that overflowed and ran dry)."""
        try:
            due = await self._pool.fetchval(queries.NEXT_DUE)
        except DB_ERRORS as exc:
            self._metrics.db_errors.labels("next_due").inc()
            self._outage.failed("next_due", exc)
            return
        if due is not None:
            self.timer.arm(due.timestamp())

    def _ask(self) -> None:
        """There may be more to claim than the last claim took; _claim_now decides when."""
        self._want_claim = True

    def _free_slots(self) -> int:
        """How many more requests may start: requests in flight plus outcomes not yet written
        stay under max_in_flight, so at a crash what was sent and not recorded (and so is
        sent again) never exceeds it."""
        return self._settings.max_in_flight - self._in_flight - self._unrecorded

    def _claimable(self) -> int:
        """How many deliveries a claim may take: the free slots plus a batch to have ready,
        less what is claimed and not started yet, except what waits for an endpoint at its
        cap (it starts as that endpoint's own requests end, never in another's slot: one
        endpoint that hangs held its ready jobs against every claim, bench faulty, issue
        17); none while the claimed payloads fill claim_bytes."""
        if self._held_bytes >= self._settings.claim_bytes:
            return 0
        return self._free_slots() + self._batch - len(self._queue) + self._queue.blocked

    def _bytes_left(self) -> int:
        return self._settings.claim_bytes - self._held_bytes

    def _claim_now(self, room: int, mono: float, urgent: bool) -> bool:
        """Whether the loop claims now: wanted, with room, not backing off after a failed
        claim, and urgent (a retry fell due), or a batch's room, or its pacing allows."""
        return (
            self._want_claim
            and room > 0
            and mono >= self._no_claim_before
            and (urgent or room >= self._batch or mono >= self._next_claim)
        )

    async def run(self) -> None:
        """Dispatch until stop(); then drain within the grace period and release the rest."""
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                self._wake.clear()
                mono = loop.time()
                # A retry that fell due is claimed at once: batching it would make it late.
                retry_due = self.timer.pop_due(self._clock() + self._lookahead) > 0
                if retry_due:
                    self._ask()
                if self.timer.overflowed and not len(self.timer):
                    self.timer.overflowed = False
                    await self.rearm()
                if self._queue.ready:
                    stale = self._queue.stale(mono)
                    if stale:
                        self._flow.dropped(job.message.subscription_id for job in stale)
                        self._held_bytes -= sum(job.size for job in stale)
                        self._ask()
                        # Back due now, or, for an endpoint that asked to wait, when it ends.
                        now = self._clock()
                        await self._claims.release(
                            [job.message.delivery_id for job in stale],
                            "stale",
                            [
                                self._flow.paused_until(job.message.subscription_id, now) or now
                                for job in stale
                            ],
                        )
                room = self._claimable()
                if self._claim_now(room, mono, retry_due):
                    await self._claim(room)
                    continue
                await self._sleep(mono, room)
        finally:
            await self._drain()

    async def _sleep(self, mono: float, room: int) -> None:
        # The safety poll (upkeep) wakes the loop through notify(): no deadline of its own.
        delays = [self._settings.poll_interval]
        self._sleep_claims = self._want_claim and room > 0
        if self._sleep_claims:
            delays.append(self._next_claim - mono)
        at = self.timer.next_at()
        if at is not None:
            delays.append(self._clock.real_seconds(at - self._lookahead - self._clock()))
        stale_at = self._queue.stale_at()
        if stale_at is not None:
            delays.append(stale_at + 0.01 - mono)
        await self._wake.wait(max(min(delays), 0.0))

    async def _claim(self, claimable: int) -> None:
        limit = min(claimable, self._settings.claim_batch)
        now = self._clock()
        shares = self._flow.shares(now)
        self._skipped = set(shares.full)
        # Consumed before the query: a NOTIFY or a freed slot during the await sets it again.
        self._want_claim = False
        due_by = now + self._lookahead
        batch = await self._claims.take(
            due_by, limit, shares, self._flow.idle_share(), self._bytes_left()
        )
        if batch is None:
            # The database is away: the next try after 100 ms, doubling up to 5 s.
            self._ask()
            self._no_claim_before = self._next_claim = (
                asyncio.get_running_loop().time() + self._claim_backoff.next()
            )
            return
        self._claim_backoff.reset()
        mono = batch.answered
        self._next_claim = mono + self._settings.flush_interval / 2
        # A full batch means more is due: claim again as slots free up, in batches. Rows held
        # back by an idle endpoint's share are claimed again at once: known now, it comes
        # with its room next time, or is skipped when full.
        if batch.full:
            self._ask()
        if batch.held_back:
            self._ask()
            self._next_claim = mono
        await self._admit(batch.jobs, mono, now)

    async def _admit(self, jobs: list[tuple[float, Job]], mono: float, now: float) -> None:
        """Make leased jobs ready (or hold them to their due time) and start what fits."""
        excess: list[int] = []
        early = False
        for due, job in jobs:
            if due > now:
                self._queue.hold(due, job)
                early = True
            elif self._flow.may_claim(job.message.subscription_id, job.cap):
                self._make_ready(job, mono, now)
            else:
                excess.append(job.message.delivery_id)
                continue
            self._held_bytes += job.size
        if early:
            self._arm_early()
        self._fill()
        if excess:
            # More than the endpoint may take soon: back to the queue, due now, for whichever
            # instance has room for it first.
            self._ask()
            await self._claims.release(excess, "excess")

    async def _admit_released(self, rows: list[asyncpg.Record], freeing: int) -> None:
        """Rows the recorder released into our lease (the next ones of ordered keys), before
        the flush frees `freeing` slots: kept as many as a claim would take once they are
        free (and within claim_bytes), so that they, not a claim of other keys, fill them;
        the rest back for any instance (a release and a claim more each)."""
        jobs = await self._claims.jobs_of(rows)
        keep = 0 if self._stopping else max(self._claimable() + freeing, 0)
        room = self._bytes_left()
        for n, (_, job) in enumerate(jobs[:keep]):
            if job.size > room and (n or self._held_bytes):
                keep = n
                break
            room -= job.size
        if len(jobs) > keep:
            self._ask()
            await self._claims.release(
                [job.message.delivery_id for _, job in jobs[keep:]],
                "stop" if self._stopping else "excess",
            )
        if keep:
            await self._admit(jobs[:keep], asyncio.get_running_loop().time(), self._clock())

    def _make_ready(self, job: Job, mono: float, now: float) -> None:
        self._flow.queued(job.message.subscription_id, job.cap, now)
        self._queue.push(job, mono)

    def _arm_early(self) -> None:
        """One timer, for the earliest delivery claimed before its due time."""
        if self._early_timer is not None:
            self._early_timer.cancel()
            self._early_timer = None
        due = self._queue.next_due()
        if due is not None:
            delay = self._clock.real_seconds(due - self._clock())
            loop = asyncio.get_running_loop()
            self._early_timer = loop.call_later(max(delay, 0.0), self._start_due)

    def _start_due(self) -> None:
        """Make the early deliveries that are now due ready and start what fits. Judged by
        the clock, not the timer: a timer may fire a little early."""
        self._early_timer = None
        now = self._clock()
        mono = asyncio.get_running_loop().time()
        for job in self._queue.due(now):
            self._make_ready(job, mono, now)
        self._arm_early()
        self._fill()

    def _fill(self, first: UUID | None = None) -> None:
        """Start ready deliveries while there are free slots, within each endpoint's cap;
        `first` (whose slot just freed) is served before the others."""
        if self._stopping or not self._queue.ready:
            return
        slots = self._free_slots()
        if slots <= 0:
            return
        now = self._clock()
        for job in self._queue.take(slots, lambda sid: self._flow.start(sid, now), first):
            self._start(job)

    def _start(self, job: Job) -> None:
        self._in_flight += 1
        task = asyncio.create_task(self._deliver(job))
        self._tasks[task] = job
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        job = self._tasks.pop(task)
        self._held_bytes -= job.size
        self._maybe_wake()  # its bytes may be what kept the next claim waiting
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
        request = attempt.prepare(job, self._clock.wall_ns(), self._clock())
        if isinstance(request, Request):
            post = self._sender.post(
                job.url, request.body, request.headers, request.settings, egress=job.egress
            )
            outcome, sent = await post, request.body
        else:
            outcome, sent = request, None
        sid = job.message.subscription_id
        self._flow.answered(sid, job.cap, outcome)
        judged = attempt.judge(job, outcome, sent, random.random())
        if judged.error_rate is not None:
            self._failing[sid] = judged.error_rate
        if judged.result.decision.pause_until is not None:
            self._flow.pause(sid, judged.result.decision.pause_until)
        self._unrecorded += 1
        self.recorder.add(judged.result)
        log.debug(
            "delivery.attempted",
            delivery_id=job.message.delivery_id,
            attempt=job.attempt,
            status=outcome.status,
            verdict=judged.result.decision.verdict.value,
        )
        # The request is over: its slot (and its endpoint's) is free for the next one.
        self._release_slot(sid)
        self._maybe_wake()

    def _release_slot(self, sid: UUID) -> None:
        if sid in self._skipped:
            # The last claim skipped it as full; it may have more waiting.
            self._skipped.discard(sid)
            self._ask()
        self._in_flight -= 1
        self._flow.done(sid)
        self._fill(sid)

    def _recorded(self, results: list[Result]) -> None:
        """Outcomes written: their slots count as free for new requests (see _fill)."""
        self._unrecorded -= len(results)
        self._fill()
        if any(r.decision.next_at is not None for r in results):
            self._wake.set()  # retries were armed: the loop may have to wake sooner
        else:
            self._maybe_wake()

    def _maybe_wake(self) -> None:
        """After a request or a write, wake the loop only if it would now claim: a batch's
        room, or any room when its sleep does not end in time for a claim. (Otherwise its own
        deadline, which counts the next claim and the timer, wakes it.)"""
        if self._wake.is_set() or not self._want_claim:
            return
        room = self._claimable()
        if room >= self._batch or (room > 0 and not self._sleep_claims):
            self._wake.set()

    async def _drain(self) -> None:
        """Let in-flight requests finish within the grace period; release what did not, and
        what was claimed ahead and never started."""
        self._stopping = True  # also when the loop died: _fill starts nothing more
        self.recorder.lease_released = False
        if self._early_timer is not None:
            self._early_timer.cancel()
        ready, early = self._queue.clear()
        now = self._clock()
        unsent = [job.message.delivery_id for job in ready]
        due = [now] * len(unsent)
        # Claimed ahead of their time: released due at it, not now.
        for at, job in early:
            unsent.append(job.message.delivery_id)
            due.append(at)
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
            await self._claims.release(unsent, "stop", due)
        await self.recorder.flush(give_up_after=self._settings.grace_period)
