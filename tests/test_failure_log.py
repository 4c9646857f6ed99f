"""The log says when an attempt fails and when a delivery gives up, without flooding."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import structlog
from structlog.testing import CapturingLogger

from dispatcher.failure_log import FailureLog
from dispatcher.policy import Decision, ErrorKind, Outcome, Verdict
from dispatcher.record import Result

from .helpers import DaemonProcess, Receiver, poll_until, publish, subscribe, wait_done


def _capturing(**kwargs: Any) -> tuple[FailureLog, CapturingLogger]:
    """A FailureLog writing into a list, at every level."""
    sink = CapturingLogger()
    logger = structlog.wrap_logger(
        sink,
        processors=[structlog.processors.add_log_level],
        wrapper_class=structlog.make_filtering_bound_logger(0),
    )
    return FailureLog(logger=logger, **kwargs), sink


def _lines(sink: CapturingLogger) -> list[dict[str, Any]]:
    return [call.kwargs for call in sink.calls]


def async_true(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def run() -> bool:
        return check()

    return run


def _result(sid: uuid.UUID, delivery: int, verdict: Verdict, status: int | None = 500) -> Result:
    outcome = Outcome(
        1_800_000_000.0,
        1_800_000_000.1,
        0.1,
        status=status,
        error=None if status else ErrorKind.CONNECT,
        detail="" if status else "refused",
    )
    next_at = 1_800_000_060.0 if verdict is Verdict.RETRY else None
    return Result(delivery, sid, 2, outcome, Decision(verdict, next_at))


def test_one_line_per_failure_and_a_warning_when_a_delivery_gives_up() -> None:
    sid = uuid.uuid4()
    failures, sink = _capturing()
    failures.note(
        [
            _result(sid, 1, Verdict.RETRY),
            _result(sid, 2, Verdict.DELIVERED, 200),
            _result(sid, 3, Verdict.FAILED, None),
            _result(sid, 4, Verdict.EXPIRED),
        ]
    )
    lines = _lines(sink)
    assert [(x["event"], x["level"]) for x in lines] == [
        ("delivery.attempt_failed", "info"),
        ("delivery.gave_up", "warning"),
        ("delivery.gave_up", "warning"),
    ]
    retry, failed, expired = lines
    assert retry["delivery_id"] == 1
    assert retry["subscription_id"] == str(sid)
    assert retry["attempt"] == 2
    assert retry["status"] == 500
    assert retry["next_attempt_at"] == "2027-01-15T08:01:00+00:00"
    assert failed["error"] == "connect"
    assert failed["detail"] == "refused"
    assert failed["outcome"] == "failed"
    assert expired["outcome"] == "expired"


def test_a_dead_endpoint_cannot_flood_the_log_and_what_was_held_back_is_counted() -> None:
    now = [0.0]
    failures, sink = _capturing(burst=3, window=60.0, monotonic=lambda: now[0])
    dead, other = uuid.uuid4(), uuid.uuid4()
    failures.note([_result(dead, i, Verdict.RETRY) for i in range(1000)])
    failures.note([_result(other, 5000, Verdict.RETRY)])
    now[0] = 61.0
    failures.note([_result(dead, 2000, Verdict.FAILED)])
    lines = _lines(sink)
    assert [x["subscription_id"] for x in lines] == [str(dead)] * 3 + [str(other), str(dead)]
    assert "suppressed" not in lines[3]
    assert lines[-1]["suppressed"] == 997
    assert lines[-1]["event"] == "delivery.gave_up"


async def test_the_daemon_logs_a_failed_attempt_and_a_delivery_that_gave_up(
    database: str, db: asyncpg.Connection, receiver: Receiver, tmp_path: Path
) -> None:
    receiver.plan("/hook", 503, then=503)
    sid = await subscribe(
        db, receiver.url(), settings={"retry": {"delays": [0.05], "max_attempts": 2}}
    )
    await publish(db)
    with DaemonProcess(database, {"DISPATCHER_LOG_LEVEL": "info"}) as proc:
        proc.start(tmp_path)
        await proc.wait_ready()
        await wait_done(db, 1)
        # The line follows the commit that wait_done sees.
        await poll_until(async_true(lambda: "delivery.gave_up" in proc.output()), 5.0)
        output = proc.output()
    lines = [orjson.loads(line) for line in output.splitlines() if line.startswith("{")]
    mine = [x for x in lines if x["event"].startswith("delivery.")]
    assert [(x["event"], x["level"], x["attempt"], x.get("status")) for x in mine] == [
        ("delivery.attempt_failed", "info", 1, 503),
        ("delivery.gave_up", "warning", 2, 503),
    ], output
    assert all(x["subscription_id"] == str(sid) for x in mine)
    assert "next_attempt_at" in mine[0]
