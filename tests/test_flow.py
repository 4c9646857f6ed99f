"""Per-endpoint flow control, without I/O: slow start, halving, recovery, caps, claim room."""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest

from dispatcher.flow import CLAIM_AHEAD, SLOW_START, SLOW_START_AFTER, Flow
from dispatcher.policy import ErrorKind, Outcome

T0 = 1_700_000_000.0
DEFAULT = 64


def answer(status: int = 200, at: float = T0) -> Outcome:
    return Outcome(started_at=at, finished_at=at, duration=0.0, status=status)


def failure(kind: ErrorKind, at: float = T0) -> Outcome:
    return Outcome(started_at=at, finished_at=at, duration=0.0, error=kind)


def started(flow: Flow, sid: UUID, count: int, configured: int = DEFAULT) -> int:
    """Queue `count` deliveries and start what the flow lets start; returns how many."""
    for _ in range(count):
        flow.queued(sid, configured, T0)
    return sum(flow.start(sid, T0) for _ in range(count))


def warm(flow: Flow, sid: UUID, configured: int = DEFAULT) -> None:
    """An endpoint that answered just now (no slow start)."""
    flow.answered(sid, configured, answer())


def test_an_endpoint_that_has_not_answered_lately_starts_slow() -> None:
    flow = Flow(DEFAULT)
    sid = uuid4()
    assert started(flow, sid, 10) == SLOW_START
    assert flow.cap(sid) == SLOW_START


def test_an_endpoint_that_answered_lately_starts_at_its_cap() -> None:
    flow = Flow(DEFAULT)
    sid = uuid4()
    warm(flow, sid)
    assert started(flow, sid, 100) == DEFAULT


def test_slow_start_comes_back_after_a_quiet_spell() -> None:
    flow = Flow(DEFAULT)
    sid = uuid4()
    flow.answered(sid, DEFAULT, answer(at=T0 - SLOW_START_AFTER - 1))
    assert started(flow, sid, 10) == SLOW_START


def test_a_configured_cap_at_or_below_slow_start_is_not_lowered() -> None:
    flow = Flow(DEFAULT)
    sid = uuid4()
    assert started(flow, sid, 10, configured=3) == 3
    assert flow.cap(sid) == 3


def test_each_answer_gives_one_slot_back_until_the_configured_cap() -> None:
    flow = Flow(DEFAULT)
    sid = uuid4()
    started(flow, sid, 1, configured=6)
    assert flow.cap(sid) == SLOW_START
    flow.answered(sid, 6, answer())
    assert flow.cap(sid) == 5
    flow.answered(sid, 6, answer())
    assert flow.cap(sid) == 6
    flow.answered(sid, 6, answer())
    assert flow.cap(sid) == 6


def test_timeouts_refusals_and_429_halve_the_cap() -> None:
    flow = Flow(DEFAULT)
    sid = uuid4()
    warm(flow, sid)
    started(flow, sid, 1)
    flow.answered(sid, DEFAULT, failure(ErrorKind.TIMEOUT))
    assert flow.cap(sid) == 32
    flow.answered(sid, DEFAULT, failure(ErrorKind.CONNECT))
    assert flow.cap(sid) == 16
    flow.answered(sid, DEFAULT, answer(429))
    assert flow.cap(sid) == 8
    flow.answered(sid, DEFAULT, failure(ErrorKind.NETWORK))
    assert flow.cap(sid) == 4


def test_halving_stops_at_one() -> None:
    flow = Flow(DEFAULT)
    sid = uuid4()
    started(flow, sid, 1)
    for _ in range(10):
        flow.answered(sid, DEFAULT, failure(ErrorKind.TIMEOUT))
    assert flow.cap(sid) == 1


def test_a_quick_500_is_an_answer_not_strain() -> None:
    flow = Flow(DEFAULT)
    sid = uuid4()
    started(flow, sid, 1, configured=8)
    flow.answered(sid, 8, answer(500))
    assert flow.cap(sid) == SLOW_START + 1


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_an_overloaded_answer_halves_the_cap_like_a_timeout(status: int) -> None:
    flow = Flow(DEFAULT)
    sid = uuid4()
    started(flow, sid, 1, configured=8)
    flow.answered(sid, 8, answer(status))
    assert flow.cap(sid) == SLOW_START // 2


def test_a_paused_endpoint_starts_nothing_and_is_not_claimed_until_its_pause_ends() -> None:
    flow = Flow(DEFAULT)
    sid, other = uuid4(), uuid4()
    flow.queued(sid, 8, T0)
    flow.queued(other, 8, T0)
    flow.pause(sid, T0 + 30)
    assert not flow.start(sid, T0 + 29.9)
    assert flow.start(other, T0)
    assert flow.paused_until(sid, T0 + 10) == T0 + 30
    assert sid in flow.shares(T0 + 10).full
    # A later, shorter pause does not shorten it.
    flow.pause(sid, T0 + 5)
    assert flow.paused_until(sid, T0 + 10) == T0 + 30
    assert sid not in flow.shares(T0 + 30).full
    assert flow.paused_until(sid, T0 + 30) is None
    assert flow.start(sid, T0 + 30)


def test_a_full_endpoint_starts_more_once_a_slot_is_done() -> None:
    flow = Flow(DEFAULT)
    sid = uuid4()
    assert started(flow, sid, 6, configured=SLOW_START) == SLOW_START
    assert not flow.start(sid, T0)
    flow.done(sid)
    assert flow.start(sid, T0)
    assert flow.in_flight(sid) == SLOW_START


def test_claim_ahead_times_the_cap_may_be_claimed() -> None:
    flow = Flow(DEFAULT)
    sid = uuid4()
    configured = 5
    kept = 0
    while flow.may_claim(sid, configured):
        flow.queued(sid, configured, T0)
        kept += 1
    assert kept == CLAIM_AHEAD * SLOW_START  # slow start lowered it after the first
    assert flow.shares().full == [sid]


def test_claim_shares_give_busy_endpoints_their_room_and_skip_full_ones() -> None:
    flow = Flow(DEFAULT)
    busy, full = uuid4(), uuid4()
    warm(flow, busy, 10)
    warm(flow, full, 2)
    started(flow, busy, 3, configured=10)
    started(flow, full, CLAIM_AHEAD * 2, configured=2)
    shares = flow.shares()
    assert shares.full == [full]
    assert dict(zip(shares.busy, shares.room, strict=True)) == {busy: CLAIM_AHEAD * 10 - 3}
    assert flow.idle_share() == CLAIM_AHEAD * SLOW_START


def test_the_daemon_cap_bounds_what_starts() -> None:
    flow = Flow(8)
    sid = uuid4()
    warm(flow, sid, 100)
    assert started(flow, sid, 20, configured=100) == 8


def test_an_endpoint_with_nothing_left_forgets_its_configured_cap() -> None:
    flow = Flow(DEFAULT)
    sid = uuid4()
    warm(flow, sid, 3)
    started(flow, sid, 2, configured=3)
    flow.dropped([sid])
    assert flow.cap(sid) == 3  # one still in flight
    for _ in range(2):
        flow.done(sid)
    assert flow.cap(sid) == DEFAULT
    assert flow.shares().busy == []


def test_a_lowered_cap_outlives_the_work_and_is_shared_in_claims() -> None:
    flow = Flow(DEFAULT)
    sid = uuid4()
    warm(flow, sid)
    started(flow, sid, 1)
    flow.answered(sid, DEFAULT, failure(ErrorKind.TIMEOUT))
    flow.done(sid)
    shares = flow.shares()
    assert dict(zip(shares.busy, shares.room, strict=True)) == {sid: CLAIM_AHEAD * 32}


def test_what_waits_beyond_the_cap_is_bounded_by_the_ahead_given() -> None:
    flow = Flow(DEFAULT, ahead=5)
    sid = uuid4()
    warm(flow, sid, 10)
    kept = 0
    while flow.may_claim(sid, 10):
        flow.queued(sid, 10, T0)
        kept += 1
    assert kept == 10 + 5
    assert flow.idle_share() == SLOW_START + 5
