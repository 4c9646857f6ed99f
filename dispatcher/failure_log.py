"""Log lines for failed attempts and deliveries that give up, bounded per subscription.

One info line per failed attempt (`delivery.attempt_failed`: delivery, subscription,
attempt, status or error, when the next attempt is due) and one warning per delivery that
gives up (`delivery.gave_up`). A dead endpoint with a million queued deliveries would
otherwise write a million lines an hour: each subscription may write `burst` lines per
`window` seconds, and the lines held back are counted and reported, as `suppressed`, on that
subscription's next line.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from uuid import UUID

import structlog

from .policy import Verdict

if TYPE_CHECKING:
    from .record import Result

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

_MAX_TRACKED = 10_000


class FailureLog:
    def __init__(
        self,
        *,
        burst: int = 5,
        window: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
        logger: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self._log = logger or log
        self._burst = burst
        self._window = window
        self._monotonic = monotonic
        # Per subscription: when its window began, lines written in it, lines held back since
        # its last line.
        self._windows: dict[UUID, tuple[float, int, int]] = {}

    def note(self, results: Iterable[Result]) -> None:
        """Log the failures among recorded results (the delivered ones say nothing)."""
        for r in results:
            verdict = r.decision.verdict
            if verdict is Verdict.DELIVERED:
                continue
            suppressed = self._admit(r.subscription_id)
            if suppressed is None:
                continue
            fields: dict[str, object] = {
                "delivery_id": r.delivery_id,
                "subscription_id": str(r.subscription_id),
                "attempt": r.attempt,
            }
            if r.outcome.status is not None:
                fields["status"] = r.outcome.status
            else:
                fields["error"] = r.outcome.error.value if r.outcome.error else "unknown"
                if r.outcome.detail:
                    fields["detail"] = r.outcome.detail[:200]
            if suppressed:
                fields["suppressed"] = suppressed
            if verdict is Verdict.RETRY and r.decision.next_at is not None:
                next_at = datetime.fromtimestamp(r.decision.next_at, UTC)
                self._log.info(
                    "delivery.attempt_failed", next_attempt_at=next_at.isoformat(), **fields
                )
            else:
                self._log.warning("delivery.gave_up", outcome=verdict.value, **fields)

    def _admit(self, subscription: UUID) -> int | None:
        """None when the line is held back; else how many were held back before it."""
        now = self._monotonic()
        began, written, held = self._windows.get(subscription, (now, 0, 0))
        if now - began >= self._window:
            began, written = now, 0
        if written >= self._burst:
            self._windows[subscription] = (began, written, held + 1)
            return None
        if len(self._windows) >= _MAX_TRACKED and subscription not in self._windows:
            self._windows.clear()  # many failing endpoints: each starts a fresh window
        self._windows[subscription] = (began, written + 1, 0)
        return held
