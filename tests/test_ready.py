"""The ready and early queues, without I/O: what to start, in which order, what went stale."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID, uuid4

from dispatcher.attempt import Job
from dispatcher.envelope import Message
from dispatcher.profiles import SettingsError
from dispatcher.ready import ReadyQueue

T0 = 1_700_000_000.0
_ids = iter(range(1, 1_000_000))


def job(sid: UUID) -> Job:
    message = Message(
        delivery_id=next(_ids),
        subscription_id=sid,
        event_id=uuid4(),
        event_name="products.update.v0",
        environment_id="shop-42",
        entity_instance_id=None,
        created_at=datetime.fromtimestamp(T0, UTC),
        payload="{}",
    )
    return Job(
        message, 1, "https://example.com/hook", ["s"], SettingsError("x", "y"), {}, None, 4, False
    )


def always(_: UUID) -> bool:
    return True


def test_jobs_start_in_order_up_to_the_free_slots() -> None:
    queue = ReadyQueue(max_age=2.0)
    sid = uuid4()
    jobs = [job(sid) for _ in range(5)]
    for j in jobs:
        queue.push(j, 0.0)
    assert queue.take(3, always) == jobs[:3]
    assert queue.ready == 2
    assert queue.take(10, always) == jobs[3:]
    assert len(queue) == 0


def test_admit_holds_back_a_full_subscription_but_not_the_others() -> None:
    queue = ReadyQueue(max_age=2.0)
    full, free = uuid4(), uuid4()
    held = [job(full) for _ in range(2)]
    going = [job(free) for _ in range(2)]
    for j in [*held, *going]:
        queue.push(j, 0.0)
    assert queue.take(10, lambda sid: sid != full) == going
    assert queue.ready == 2


def test_the_subscription_whose_slot_freed_goes_first() -> None:
    queue = ReadyQueue(max_age=2.0)
    one, two = uuid4(), uuid4()
    a, b = job(one), job(two)
    queue.push(a, 0.0)
    queue.push(b, 0.0)
    assert queue.take(1, always, first=two) == [b]


def test_admit_is_asked_once_per_job_started() -> None:
    queue = ReadyQueue(max_age=2.0)
    sid = uuid4()
    for _ in range(4):
        queue.push(job(sid), 0.0)
    allowed = [True, True, False]
    assert len(queue.take(10, lambda _: allowed.pop(0))) == 2


def test_jobs_that_waited_too_long_go_stale() -> None:
    queue = ReadyQueue(max_age=2.0)
    sid = uuid4()
    old, new = job(sid), job(sid)
    queue.push(old, 10.0)
    queue.push(new, 11.5)
    assert queue.stale_at() == 12.0
    assert queue.stale(12.0) == []
    assert queue.stale(12.1) == [old]
    assert queue.ready == 1
    assert queue.stale_at() == 13.5


def test_early_jobs_come_out_when_due_earliest_first() -> None:
    queue = ReadyQueue(max_age=2.0)
    sid = uuid4()
    late, soon = job(sid), job(sid)
    queue.hold(T0 + 2, late)
    queue.hold(T0 + 1, soon)
    assert len(queue) == 2
    assert queue.ready == 0
    assert queue.next_due() == T0 + 1
    assert queue.due(T0) == []
    assert queue.due(T0 + 1) == [soon]
    assert queue.due(T0 + 5) == [late]
    assert queue.next_due() is None


def test_clear_returns_ready_jobs_and_early_ones_with_their_due_times() -> None:
    queue = ReadyQueue(max_age=2.0)
    sid = uuid4()
    ready, early = job(sid), job(sid)
    queue.push(ready, 0.0)
    queue.hold(T0 + 3, early)
    assert queue.clear() == ([ready], [(T0 + 3, early)])
    assert len(queue) == 0


def test_jobs_turned_away_by_their_endpoint_count_as_blocked_until_it_admits_again() -> None:
    """What the worker keeps out of a claim's room (Worker._claimable): ready jobs that wait
    for their own endpoint, not for a free slot."""
    queue = ReadyQueue(max_age=2.0)
    hung, busy = uuid4(), uuid4()
    for j in [job(hung) for _ in range(3)] + [job(busy) for _ in range(2)]:
        queue.push(j, 0.0)
    assert queue.blocked == 0  # not looked at yet
    # hung is turned away; busy's second job stays because the slots ran out: not blocked.
    assert len(queue.take(1, lambda sid: sid != hung)) == 1
    assert queue.blocked == 3
    started = queue.take(1, always, first=hung)
    assert [j.message.subscription_id for j in started] == [hung]
    assert queue.blocked == 0
    assert queue.take(5, lambda sid: sid == busy)[0].message.subscription_id == busy
    assert queue.blocked == 2


def test_blocked_jobs_that_go_stale_or_are_cleared_are_no_longer_counted() -> None:
    queue = ReadyQueue(max_age=2.0)
    hung = uuid4()
    for j in [job(hung) for _ in range(2)]:
        queue.push(j, 0.0)
    queue.take(4, lambda _: False)
    assert queue.blocked == 2
    assert len(queue.stale(3.0)) == 2
    assert queue.blocked == 0
    queue.push(job(hung), 3.0)
    queue.take(4, lambda _: False)
    assert queue.blocked == 1
    queue.clear()
    assert queue.blocked == 0
