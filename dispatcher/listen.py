"""LISTEN for new work on a dedicated connection; reconnect when it drops."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import asyncpg
import structlog

from .dberrors import DB_ERRORS, Backoff, Outage

log = structlog.get_logger(__name__)

CHANNEL = "dispatcher_work"


class Listener:
    """Calls `on_work` for every notification, and once after each (re)connect.

    `connected` is what /readyz reports: while it is false the daemon still runs on its
    timer and safety poll, but new work waits for the poll.
    """

    def __init__(
        self,
        dsn: str,
        on_work: Callable[[], None],
        *,
        retry_max: float = 5.0,
        also: Mapping[str, Callable[[], None]] | None = None,
        outage: Outage | None = None,
    ) -> None:
        self._dsn = dsn
        self._outage = outage or Outage()
        # Channel -> callback; `also` adds channels heard on the same connection.
        self._wakers = {CHANNEL: on_work, **(also or {})}
        self._retry_max = retry_max
        self.connected = False

    async def run(self) -> None:
        backoff = Backoff(cap=self._retry_max)
        while True:
            try:
                conn = await asyncpg.connect(self._dsn)
            except DB_ERRORS as exc:
                self._outage.failed("listen", exc)
                await asyncio.sleep(backoff.next())
                continue
            self._outage.succeeded()
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c, lost=lost: lost.set())
            try:
                for channel in self._wakers:
                    await conn.add_listener(channel, self._notified)
                self.connected = True
                backoff.reset()
                log.info("listen.connected")
                # Anything published while we were away was not heard: look now.
                for wake in self._wakers.values():
                    wake()
                await self._watch(conn, lost)
            except DB_ERRORS as exc:
                self._outage.failed("listen", exc)
            finally:
                self.connected = False
                if not conn.is_closed():
                    conn.terminate()

    async def _watch(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        """Wait for the connection to drop; a cheap ping every few seconds finds a dead peer."""
        while not lost.is_set():
            # asyncio.timeout, not wait_for: wait_for returns the event's result to a task
            # cancelled as it is set, and the cancellation is lost.
            try:
                async with asyncio.timeout(5.0):
                    await lost.wait()
            except TimeoutError:
                await asyncio.wait_for(conn.execute("SELECT 1"), 5.0)

    def _notified(self, _conn: object, _pid: int, channel: str, _payload: object) -> None:
        self._wakers[channel]()
