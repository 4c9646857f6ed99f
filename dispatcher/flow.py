"""Per-endpoint flow control: how many requests an endpoint may have in flight, and whether
a ready delivery may start. Pure: the worker tells it what happened and when (its clock)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from uuid import UUID

from .policy import ErrorKind, Outcome

# Answers that say the endpoint is straining: its concurrency halves.
_STRAIN = frozenset({ErrorKind.TIMEOUT, ErrorKind.CONNECT, ErrorKind.NETWORK})
_STRAIN_STATUSES = frozenset({429, 502, 503, 504})
# An endpoint that has not answered lately starts with this many requests at once and gains
# one per answer, doubling each round trip: one that hangs holds this few slots for a whole
# timeout, not its full cap.
SLOW_START = 4
SLOW_START_AFTER = 30.0  # seconds without an answer
# A claim may take four times an endpoint's cap (at most a batch beyond it, see Flow): the
# rest waits ready for its next free slots, so a freed slot starts the next request without
# a claim's round trip. Under load a claim takes 10-17 ms and a request 1-2 ms: at twice
# the cap one busy endpoint ran out of ready work between claims (mean in flight 24 of its
# 64; bench burn, issue 17).
CLAIM_AHEAD = 4
# Bounds on what is remembered of endpoints that are gone (past them a few start slow again).
_MAX_LOWERED = 10_000
_MAX_ANSWERED = 100_000


@dataclass(frozen=True, slots=True)
class Shares:
    """What a claim may take per endpoint with work here: `full` ones are skipped, each of
    `busy` may get its `room` more (queries.CLAIM's $4, $6, $7)."""

    full: list[UUID]
    busy: list[UUID]
    room: list[int]


class Flow:
    """Admission per endpoint.

    An endpoint's cap is its configured `max_in_flight` (else the daemon's
    `max_per_endpoint`), lowered while it starts (slow start) or struggles (halved on a
    timeout, a refused connection, a 429, 502, 503 or 504, one back per answer): an
    endpoint that holds slots for long keeps few of them, so it cannot starve healthy ones.
    Another quick 5xx frees its slot at once: it is retried on its schedule, not throttled.
    A 429 with a Retry-After pauses the endpoint: nothing of it starts before then.

    It counts, per endpoint, the requests in flight and the deliveries waiting ready; the
    worker reports each step (queued, start, answered, done, dropped).
    """

    def __init__(self, max_per_endpoint: int, ahead: int | None = None) -> None:
        self._default = max_per_endpoint
        # At most this many of one endpoint wait ready beyond its cap (the worker's batch):
        # an endpoint that holds its slots (hangs) cannot fill what the worker keeps ready
        # and stop its claims for the others.
        self._ahead = ahead
        self._in_flight: Counter[UUID] = Counter()
        self._waiting: Counter[UUID] = Counter()
        # Configured caps of the endpoints with work here (in flight or waiting).
        self._caps: dict[UUID, int] = {}
        # Caps lowered by slow start or strain, until they recover.
        self._lowered: dict[UUID, int] = {}
        # When each endpoint last answered, on the worker's clock (see SLOW_START).
        self._answered: dict[UUID, float] = {}
        # Endpoints told to wait (429 + Retry-After), until when on the worker's clock.
        self._paused: dict[UUID, float] = {}

    def cap(self, sid: UUID) -> int:
        """How many requests the endpoint may have in flight now (never above
        max_per_endpoint unless lowered from a higher configured cap)."""
        return min(self._caps.get(sid, self._default), self._lowered.get(sid, self._default))

    def in_flight(self, sid: UUID) -> int:
        return self._in_flight[sid]

    def may_claim(self, sid: UUID, configured: int) -> bool:
        """Whether one more claimed delivery of this endpoint (whose current version has cap
        `configured`) may be kept: see _allowance."""
        cap = min(configured, self._lowered.get(sid, configured))
        return self._in_flight[sid] + self._waiting[sid] < self._allowance(cap)

    def _allowance(self, cap: int) -> int:
        """How many of an endpoint with this cap may be in flight or ready: CLAIM_AHEAD
        times the cap, of which at most `ahead` beyond it."""
        beyond = (CLAIM_AHEAD - 1) * cap
        return cap + (beyond if self._ahead is None else min(beyond, self._ahead))

    def shares(self, now: float = 0.0) -> Shares:
        """The claim's per-endpoint room for the endpoints with work here, a lowered cap or
        a pause (paused at `now`: skipped; others are idle here: queries.CLAIM gives them a
        slow start's share)."""
        for sid in [s for s, until in self._paused.items() if until <= now]:
            del self._paused[sid]
        full: list[UUID] = []
        busy: list[UUID] = []
        room: list[int] = []
        for sid in (
            self._in_flight.keys()
            | self._lowered.keys()
            | self._waiting.keys()
            | self._paused.keys()
        ):
            free = self._allowance(self.cap(sid)) - self._in_flight[sid] - self._waiting[sid]
            if free <= 0 or sid in self._paused:
                full.append(sid)
            else:
                busy.append(sid)
                room.append(free)
        return Shares(full, busy, room)

    def idle_share(self) -> int:
        """What a claim may take of an endpoint with no work here (queries.CLAIM's $8)."""
        return self._allowance(SLOW_START)

    def queued(self, sid: UUID, configured: int, now: float) -> None:
        """A claimed delivery waits ready; an endpoint that has not answered lately and has
        nothing in flight starts slow."""
        if (
            configured > SLOW_START
            and sid not in self._lowered
            and now - self._answered.get(sid, 0.0) > SLOW_START_AFTER
            and sid not in self._in_flight
        ):
            self._lowered[sid] = SLOW_START
        self._caps[sid] = configured
        self._waiting[sid] += 1

    def start(self, sid: UUID, now: float) -> bool:
        """Start one of the endpoint's ready deliveries if its cap allows and it is not
        paused at `now`."""
        if self._in_flight[sid] >= self.cap(sid) or self.paused_until(sid, now) is not None:
            return False
        self._waiting[sid] -= 1
        if self._waiting[sid] <= 0:
            del self._waiting[sid]
        self._in_flight[sid] += 1
        return True

    def pause(self, sid: UUID, until: float) -> None:
        """Nothing of the endpoint starts before `until` (a 429's Retry-After, here or
        another instance's, read from Postgres by upkeep)."""
        if len(self._paused) > _MAX_LOWERED:
            self._paused.clear()
        self._paused[sid] = max(until, self._paused.get(sid, until))

    def paused_until(self, sid: UUID, now: float) -> float | None:
        """When the endpoint's pause ends, if it is paused at `now`."""
        until = self._paused.get(sid)
        if until is None:
            return None
        if until <= now:
            del self._paused[sid]
            return None
        return until

    def dropped(self, sids: Iterable[UUID]) -> None:
        """Ready deliveries went back to the queue unstarted (one entry each)."""
        for sid in sids:
            self._waiting[sid] -= 1
            if self._waiting[sid] <= 0:
                del self._waiting[sid]
                self._forget_idle(sid)

    def answered(self, sid: UUID, configured: int, outcome: Outcome) -> None:
        """Adapt the endpoint's cap to an attempt's outcome."""
        current = self._lowered.get(sid, configured)
        status = outcome.status
        if outcome.error in _STRAIN or status in _STRAIN_STATUSES:
            if len(self._lowered) > _MAX_LOWERED:
                self._lowered.clear()
            self._lowered[sid] = max(1, current // 2)
            return
        if status is not None:
            if len(self._answered) > _MAX_ANSWERED:
                self._answered.clear()
            self._answered[sid] = outcome.finished_at
        if sid in self._lowered:
            if current + 1 >= configured:
                del self._lowered[sid]
            else:
                self._lowered[sid] = current + 1

    def done(self, sid: UUID) -> None:
        """A request is over (answered or not): its slot is free."""
        self._in_flight[sid] -= 1
        if self._in_flight[sid] <= 0:
            del self._in_flight[sid]
            self._forget_idle(sid)

    def _forget_idle(self, sid: UUID) -> None:
        if sid not in self._in_flight and sid not in self._waiting:
            self._caps.pop(sid, None)
