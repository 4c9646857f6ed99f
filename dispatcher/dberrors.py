"""What asyncpg raises when the database is away or refuses a statement, and how the daemon's
loops live through it: each backs off (Backoff) and reports to one Outage, which logs a line
when the database goes away and one when it is back, not one per failed call."""

from __future__ import annotations

import time
from collections.abc import Callable

import asyncpg
import structlog

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

# InternalClientError is what asyncpg raises for a connection the server ended in the middle
# of an operation (MagicStack/asyncpg#1069): the database being away, not a bug of ours.
DB_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)

# The database away, or ending this connection: no connection, a closed one, the server's
# FATAL for a backend it ends (57P01 pg_terminate_backend or a shutdown, 57P02 a crash,
# 57P03 not accepting connections yet), which a failover's old primary sends to the
# connections a pool still holds, or asyncpg's InternalClientError for one it ended in the
# middle of an operation (whose pool should expire its connections: see above). Worth a
# retry by whoever asked, not a bug.
UNAVAILABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
)


class Backoff:
    """Delays after failed calls: `first`, doubling up to `cap`; reset() after a success."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self._first = first
        self._cap = cap
        self._next = first

    def next(self) -> float:
        """The delay before the next try; the one after it doubles."""
        delay = self._next
        self._next = min(self._next * 2, self._cap)
        return delay

    def reset(self) -> None:
        self._next = self._first


class Outage:
    """The database as this process's loops see it (claim, record, listen, poll, mail).

    The first failed call logs `database.unavailable` (warning: which call, the error); the
    first call to succeed after it logs `database.available` with how long the database was
    away and how many calls failed meanwhile. The calls in between log at debug only: a
    10-second outage is two lines, whatever the loops' retry rates.
    """

    def __init__(
        self,
        monotonic: Callable[[], float] = time.monotonic,
        logger: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self._monotonic = monotonic
        self._log = logger or log
        self._since: float | None = None
        self._failed = 0

    @property
    def away(self) -> bool:
        return self._since is not None

    def failed(self, operation: str, exc: BaseException) -> None:
        self._failed += 1
        if self._since is None:
            self._since = self._monotonic()
            self._log.warning("database.unavailable", operation=operation, error=str(exc))
        else:
            self._log.debug("database.call_failed", operation=operation, error=str(exc))

    def succeeded(self) -> None:
        if self._since is None:
            return
        away = self._monotonic() - self._since
        self._log.info("database.available", away_seconds=round(away, 3), failed_calls=self._failed)
        self._since = None
        self._failed = 0
