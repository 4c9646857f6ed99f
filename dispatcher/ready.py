"""Claimed deliveries not started yet: ready ones per subscription, early ones by due time.

Pure: it says which jobs to start; the worker starts them.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from uuid import UUID

from .attempt import Job


class ReadyQueue:
    """Ready: claimed ahead of free slots, by subscription, each stamped with when it became
    ready (monotonic seconds), so a freed slot starts the next request at once instead of
    idling for a claim's round trip. Early: claimed a little before they are due, earliest
    first, to start at their due time."""

    def __init__(self, max_age: float) -> None:
        self._max_age = max_age
        self._ready: dict[UUID, deque[tuple[float, Job]]] = {}
        self._count = 0
        self._early: list[tuple[float, int, Job]] = []
        # Ready jobs of subscriptions that `admit` turned away when take() last looked at
        # them (their endpoint at its cap): how many each had then, and their sum.
        self._blocked: dict[UUID, int] = {}
        self._blocked_count = 0

    def __len__(self) -> int:
        """Ready and early jobs (what a claim counts as taken)."""
        return self._count + len(self._early)

    @property
    def ready(self) -> int:
        return self._count

    @property
    def blocked(self) -> int:
        """Ready jobs waiting for their own endpoint, not for a free slot: those of the
        subscriptions take() last found at their cap, as many as they had then (a job
        readied for one since is not counted until take() looks at it again)."""
        return self._blocked_count

    def _unblock(self, sid: UUID) -> None:
        self._blocked_count -= self._blocked.pop(sid, 0)

    def push(self, job: Job, mono: float) -> None:
        self._ready.setdefault(job.message.subscription_id, deque()).append((mono, job))
        self._count += 1

    def hold(self, due: float, job: Job) -> None:
        """Keep a job claimed before its due time (on the worker's clock) until it is due."""
        heapq.heappush(self._early, (due, job.message.delivery_id, job))

    def next_due(self) -> float | None:
        return self._early[0][0] if self._early else None

    def due(self, now: float) -> list[Job]:
        """The early jobs due at `now`, earliest first (to push as ready)."""
        jobs: list[Job] = []
        while self._early and self._early[0][0] <= now:
            jobs.append(heapq.heappop(self._early)[2])
        return jobs

    def take(
        self, slots: int, admit: Callable[[UUID], bool], first: UUID | None = None
    ) -> list[Job]:
        """Up to `slots` ready jobs to start, each subscription's in order while `admit`
        lets one more of it start (admit counts it as started); `first`, whose slot just
        freed, is served before the others."""
        order = list(self._ready)
        if first is not None and first in self._ready:
            order.insert(0, first)
        jobs: list[Job] = []
        for sid in order:
            if len(jobs) >= slots:
                break
            queue = self._ready.get(sid)
            if queue is None:
                continue
            self._unblock(sid)
            while queue and len(jobs) < slots and admit(sid):
                jobs.append(queue.popleft()[1])
            if not queue:
                del self._ready[sid]
            elif len(jobs) < slots:  # turned away: its endpoint is at its cap
                self._blocked[sid] = len(queue)
                self._blocked_count += len(queue)
        self._count -= len(jobs)
        return jobs

    def stale(self, mono: float) -> list[Job]:
        """Ready jobs that waited longer than max_age for their endpoint: they go back to the
        queue (due now) before their lease can run out."""
        stale: list[Job] = []
        for sid in list(self._ready):
            queue = self._ready[sid]
            if queue and mono - queue[0][0] > self._max_age:
                self._unblock(sid)
            while queue and mono - queue[0][0] > self._max_age:
                stale.append(queue.popleft()[1])
            if not queue:
                del self._ready[sid]
        self._count -= len(stale)
        return stale

    def stale_at(self) -> float | None:
        """When the oldest ready job turns stale (monotonic seconds)."""
        heads = [queue[0][0] for queue in self._ready.values() if queue]
        return min(heads) + self._max_age if heads else None

    def clear(self) -> tuple[list[Job], list[tuple[float, Job]]]:
        """Empty both: the ready jobs, and the early ones with their due times."""
        ready = [job for queue in self._ready.values() for _, job in queue]
        early = [(due, job) for due, _, job in self._early]
        self._ready.clear()
        self._count = 0
        self._blocked.clear()
        self._blocked_count = 0
        self._early.clear()
        return ready, early
