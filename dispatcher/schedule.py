"""The timer wheel: a heap of wake-up times for retries this instance has persisted."""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class Clock:
    """Unix time as the scheduler sees it: the database server's, read through this host's.

    Production uses Clock(): the wall clock, corrected by `correction`, this host's measured
    distance to the database's clock (see clocksync.py), so that instances whose clocks
    disagree by minutes still agree on leases and due times. Tests run it `rate` times faster
    (and may start it `offset` seconds ahead), so the real loop fires a schedule of minutes or
    days within seconds; every retry time, claim and lease is in this clock, sleeps are
    converted back. `wall` is the host's clock (a test may skew it).
    """

    rate: float = 1.0
    offset: float = 0.0
    wall: Callable[[], float] = time.time
    origin: float | None = None
    correction: float = 0.0

    def __post_init__(self) -> None:
        if self.origin is None:
            self.origin = self.wall()

    def __call__(self) -> float:
        now = self.wall()
        assert self.origin is not None
        return now + self.correction + self.offset + (now - self.origin) * (self.rate - 1.0)

    def real_seconds(self, seconds: float) -> float:
        return seconds / self.rate

    def wall_ns(self) -> int:
        """Real unix time in nanoseconds (corrected, never sped up): for what others hold
        against their own clocks (a signature's timestamp, a rotated secret's expiry)."""
        base = time.time_ns() if self.wall is time.time else int(self.wall() * 1e9)
        return base + int(self.correction * 1e9)


class WakeTimer:
    """Earliest-first wake-up times (unix seconds).

    Only times already written to Postgres are armed, so losing this heap (a crash) loses
    nothing: the safety poll finds the earliest due time again. Past `capacity` entries a
    time is not kept and `overflowed` is set; the loop then asks Postgres for the next due
    time whenever the heap runs dry.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self._heap: list[float] = []
        self._capacity = capacity
        self.overflowed = False

    def __len__(self) -> int:
        return len(self._heap)

    def arm(self, at: float) -> None:
        if len(self._heap) >= self._capacity:
            self.overflowed = True
            return
        heapq.heappush(self._heap, at)

    def next_at(self) -> float | None:
        return self._heap[0] if self._heap else None

    def pop_due(self, now: float) -> int:
        """Drop every time at or before `now`; returns how many were due."""
        due = 0
        while self._heap and self._heap[0] <= now:
            heapq.heappop(self._heap)
            due += 1
        return due


class Wakeup:
    """What the dispatch loop sleeps on: set() wakes it, or its deadline passes.

    Cheaper than asyncio.wait_for(event.wait(), timeout), which makes a task and a timer
    for every sleep, and the loop may sleep once per request.
    """

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self, timeout: float) -> None:
        """Return once set (at once if it is) or after `timeout` seconds."""
        if self._set:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        handle = loop.call_later(timeout, _resolve, waiter)
        try:
            await waiter
        finally:
            handle.cancel()
            self._waiter = None


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
