"""The timer wheel: a heap of wake-up times for retries this instance has persisted."""

from __future__ import annotations

import heapq


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
