"""Operational events: what the dispatcher tells integrators about their endpoints, as
ordinary events of the reserved entity `dispatcher` (payloads: models.OPERATIONAL_EVENTS).

Where each is published, so that the hot path pays nothing for them:
- endpoint_disabled / endpoint_enabled: a row trigger on subscriptions.active (sql/0008),
  whoever changes it; the store's unsubscribe phrase (a delete) from the recorder.
- delivery_exhausted: the recorder, with the results that gave up, in their transaction.
- delivery_failing / delivery_recovered: the recorder, from dispatcher.failure_streaks, only
  for batches with failures or with successes of subscriptions known to have a streak
  (`Streaks`, refreshed by upkeep so other instances' streaks are known too).

Deliveries of operational events are left out of all of these: an endpoint failing on them
produces no further events about them (no storms, no loops).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from uuid import UUID

from .models import RESERVED_ENTITY
from .policy import Verdict

if TYPE_CHECKING:
    from .record import Result

PREFIX = RESERVED_ENTITY + "."
# Subscriptions with a live streak an instance remembers; past it, every success is
# written (correct, only more writes).
MAX_KNOWN = 10_000


def is_operational(event_name: str) -> bool:
    return event_name.startswith(PREFIX)


def gave_up(results: Iterable[Result]) -> list[Result]:
    """The results whose delivery gave up and that publish delivery_exhausted."""
    return [
        r
        for r in results
        if r.decision.verdict in (Verdict.FAILED, Verdict.EXPIRED)
        and not is_operational(r.event_name)
    ]


@dataclass(frozen=True, slots=True)
class StreakChanges:
    """One batch's change to the failure streaks (queries.RECORD_FAILURES. $19-$22)."""

    subscription_ids: list[UUID]
    failures: list[int]  # failed attempts after the subscription's last success here
    succeeded: list[bool]
    thresholds: list[int | None]


class Streaks:
    """Which subscriptions have a failure streak: the ones whose successes must be written."""

    def __init__(self) -> None:
        self._known: set[UUID] = set()
        self._overflow = False

    def changes(self, batch: Sequence[Result]) -> StreakChanges | None:
        """What the batch changes, or None when it changes nothing (the common case: all
        delivered, none of them to a subscription with a streak). Pure: see settle()."""
        failures: dict[UUID, int] = {}
        succeeded: dict[UUID, bool] = {}
        thresholds: dict[UUID, int | None] = {}
        for r in batch:
            if is_operational(r.event_name):
                continue
            sid = r.subscription_id
            if r.failing_threshold is None:
                continue  # publishes no delivery_failing: nothing to count
            thresholds[sid] = r.failing_threshold
            if r.decision.verdict is Verdict.DELIVERED:
                failures[sid], succeeded[sid] = 0, True
            else:
                failures[sid] = failures.get(sid, 0) + 1
                succeeded.setdefault(sid, False)
        wanted = [
            sid for sid, n in failures.items() if n > 0 or sid in self._known or self._overflow
        ]
        if not wanted:
            return None
        return StreakChanges(
            wanted,
            [failures[s] for s in wanted],
            [succeeded[s] for s in wanted],
            [thresholds[s] for s in wanted],
        )

    def settle(self, changes: StreakChanges) -> None:
        """After the changes committed: remember the streaks they started, forget ended ones."""
        for sid, n in zip(changes.subscription_ids, changes.failures, strict=True):
            if n > 0:
                if len(self._known) < MAX_KNOWN:
                    self._known.add(sid)
                else:
                    self._overflow = True
            else:
                self._known.discard(sid)

    def snapshot(self) -> frozenset[UUID]:
        return frozenset(self._known)

    def refresh(self, before: frozenset[UUID], live: list[UUID], limit: int = MAX_KNOWN) -> None:
        """The streaks the table holds (`live`, read after `before` was taken), keeping what
        this instance learnt while it was read."""
        self._known = set(live) | (self._known - before)
        self._overflow = len(live) >= limit
