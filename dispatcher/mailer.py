"""Failure mails: send what `dispatcher.queue_emails` queued, over SMTP, at least once.

A mail leaves the queue (gets its `sent_at`) only after the SMTP server accepted it. Rows
are claimed with a lease (their `due_at` pushed ahead), never inside a transaction held
across the SMTP conversation, so a crashed or cancelled mailer's rows come back by
themselves: a mail may be sent twice, never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from enum import Enum
from typing import Any
from uuid import UUID

import aiosmtplib
import asyncpg
import structlog

from .config import EmailSettings
from .dberrors import DB_ERRORS, Backoff, Outage

log = structlog.get_logger(__name__)

Clock = Callable[[], float]

BATCH = 20
RETRY_BASE = 30.0
RETRY_CAP = 3600.0
RECORD_GRACE = 5.0

# Claim up to $3 due, unsent mails that have tries left ($4). The lease is the due time
# itself: pushed $2 seconds past the clock $1 (unix seconds), so the rows of a mailer that
# died come back when it ends, and other instances skip them meanwhile.
CLAIM = """
WITH due AS (
    SELECT id FROM dispatcher.emails
    WHERE sent_at IS NULL AND due_at <= to_timestamp($1::float8) AND tries < $4::int
    ORDER BY due_at
    LIMIT $3::int
    FOR UPDATE SKIP LOCKED
)
UPDATE dispatcher.emails m SET due_at = to_timestamp($1::float8 + $2::float8)
FROM due WHERE m.id = due.id
RETURNING m.id, m.subscription_id, m.delivery_id, m.environment_id, m.recipient, m.kind,
          m.attempt, m.status_code, m.error, m.url, m.event_name, m.body, m.created_at,
          m.tries
"""

# Write a batch's outcomes in one statement. 'sent': accepted by the server. 'failed': one
# more try used, due again at $4 (NULL: no tries left, parked at infinity so the due index
# never offers it again; the row stays, unsent, with its last_error). 'released': never
# tried (the mailer stopped), the lease is handed back at once and no try is counted.
RECORD = """
UPDATE dispatcher.emails m SET
    sent_at = CASE WHEN o.outcome = 'sent' THEN to_timestamp($5::float8) END,
    tries = m.tries + (o.outcome = 'failed')::int,
    last_error = CASE WHEN o.outcome = 'failed' THEN o.error ELSE m.last_error END,
    due_at = CASE o.outcome
        WHEN 'sent' THEN m.due_at
        WHEN 'released' THEN to_timestamp($5::float8)
        ELSE coalesce(to_timestamp(o.next_at), 'infinity')
    END
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::float8[])
     AS o(id, outcome, error, next_at)
WHERE m.id = o.id AND m.sent_at IS NULL
"""


class Kind(Enum):
    ATTEMPT_FAILED = "attempt_failed"
    GAVE_UP = "gave_up"


@dataclass(frozen=True, slots=True)
class QueuedMail:
    """One row of dispatcher.emails: what a failure mail says."""

    id: int
    subscription_id: UUID
    delivery_id: int
    environment_id: str
    recipient: str
    kind: Kind
    attempt: int
    status_code: int | None
    error: str | None
    url: str
    event_name: str
    body: str | None
    created_at: datetime
    tries: int

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> QueuedMail:
        return cls(**{**dict(row), "kind": Kind(row["kind"])})


class Outcome(Enum):
    SENT = "sent"
    FAILED = "failed"
    RELEASED = "released"


def render(mail: QueuedMail, sender: str, now: datetime) -> EmailMessage:
    """The mail a shop developer reads: what failed, why, and the request body verbatim."""
    target = f"{_one_line(mail.event_name)} to {_one_line(mail.url)}"
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = mail.recipient
    msg["Date"] = format_datetime(now)
    # Stable per queued mail, so a mail sent twice (at least once) is recognizably the same.
    stamp = int(mail.created_at.timestamp())
    msg["Message-ID"] = f"<dispatcher-email-{mail.id}.{stamp}@{sender.rpartition('@')[2]}>"
    # RFC 3834: out-of-office replies and other robots must not answer.
    msg["Auto-Submitted"] = "auto-generated"
    outcome = _outcome_text(mail)
    when = mail.created_at.astimezone(UTC).isoformat(timespec="seconds")
    if mail.kind is Kind.ATTEMPT_FAILED:
        msg["Subject"] = f"Webhook delivery failed: {target}"
        intro = (
            f"Attempt {mail.attempt} to deliver a webhook to your endpoint failed.\n"
            "It will be retried; you get a mail for each failed attempt."
        )
    else:
        msg["Subject"] = f"Webhook delivery gave up: {target}"
        intro = (
            f"This message reached the retry limit after {mail.attempt} attempts and will "
            "not be sent again.\nThe last attempt failed as shown below."
        )
    body = mail.body if mail.body is not None else "(the request body was not recorded)"
    msg.set_content(
        f"{intro}\n\n"
        f"Event:        {mail.event_name}\n"
        f"URL:          {mail.url}\n"
        f"Attempt:      {mail.attempt}\n"
        f"Result:       {outcome}\n"
        f"Time:         {when}\n"
        f"Delivery:     {mail.delivery_id}\n"
        f"Subscription: {mail.subscription_id}\n"
        f"Environment:  {mail.environment_id}\n\n"
        f"Request body:\n{body}\n"
    )
    return msg


def _outcome_text(mail: QueuedMail) -> str:
    parts = []
    if mail.status_code is not None:
        parts.append(f"HTTP status {mail.status_code}")
    if mail.error:
        parts.append(mail.error)
    return ", ".join(parts) or "no response"


def _one_line(text: str) -> str:
    # A header value with a line break is an injected header: flatten it.
    return " ".join(text.split())


def retry_delay(tries: int, base: float = RETRY_BASE, cap: float = RETRY_CAP) -> float:
    """Seconds before try number `tries + 1`, after `tries` failures: base doubling, capped."""
    return float(min(cap, base * 2 ** max(0, min(tries - 1, 62))))


@dataclass(frozen=True, slots=True)
class _Result:
    mail: QueuedMail
    outcome: Outcome
    error: str | None = None


class Mailer:
    """Sends queued failure mails until cancelled; `notify()` wakes it before the next poll."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: EmailSettings,
        clock: Clock = time.time,
        *,
        batch: int = BATCH,
        retry_base: float = RETRY_BASE,
        retry_cap: float = RETRY_CAP,
        outage: Outage | None = None,
    ) -> None:
        self._pool = pool
        self._outage = outage or Outage()
        self._settings = settings
        self._clock = clock
        self._batch = batch
        self._retry_base = retry_base
        self._retry_cap = retry_cap
        # Each SMTP step may take `timeout`; a batch is about three steps a mail plus the
        # greeting, login and TLS. The batch is cut off well before the lease ends.
        self._lease = max(60.0, settings.timeout * (3 * batch + 6))
        self._wake = asyncio.Event()
        self._local_hostname: str | None = None

    def notify(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        s = self._settings
        if not s.smtp_host:
            log.warning(
                "mail.disabled",
                reason="[email] smtp_host is empty; failure mails stay queued, unsent",
            )
            # A side task that returns counts as dead; this one just has nothing to do.
            await asyncio.Future()
        # socket.getfqdn may do a slow reverse lookup: once, off the loop, not per batch.
        self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        log.info("mail.started", smtp_host=s.smtp_host, smtp_port=s.smtp_port)
        backoff = Backoff()
        while True:
            # Cleared before the claim: a notify that arrives during it is not lost.
            self._wake.clear()
            try:
                claimed = await self.run_once()
            except DB_ERRORS as exc:
                self._outage.failed("mail", exc)
                await asyncio.sleep(backoff.next())
                continue
            self._outage.succeeded()
            backoff.reset()
            if claimed >= self._batch:
                continue  # more may be due right now
            # asyncio.timeout, not wait_for: wait_for returns the event's result to a task
            # cancelled as it is set, and the cancellation is lost.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(s.poll_interval):
                    await self._wake.wait()

    async def run_once(self) -> int:
        """Claim one batch of due mails, send them, record the outcomes; the number claimed."""
        now = self._clock()
        rows = await self._pool.fetch(
            CLAIM, now, self._lease, self._batch, self._settings.max_tries
        )
        if not rows:
            return 0
        mails = [QueuedMail.from_row(r) for r in rows]
        results: list[_Result] = []
        try:
            await self._send(mails, results)
        finally:
            done = {r.mail.id for r in results}
            results += [_Result(m, Outcome.RELEASED) for m in mails if m.id not in done]
            await self._record_shielded(results)
        return len(mails)

    async def _record_shielded(self, results: list[_Result]) -> None:
        """Record even when cancelled: a lost "sent" means the mail goes out again.

        A cancellation (shutdown) waits up to RECORD_GRACE seconds for the write, so the
        caller can close the pool after it; past that the leases cover it (a duplicate).
        """
        write = asyncio.ensure_future(self._record(results))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(write, RECORD_GRACE)
            raise

    async def _send(self, mails: list[QueuedMail], results: list[_Result]) -> None:
        """One SMTP connection for the batch; appends an outcome for each mail it tried."""
        s = self._settings
        smtp = aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            username=s.username or None,
            password=s.password or None,
            local_hostname=self._local_hostname,
            timeout=s.timeout,
            use_tls=s.tls,
            start_tls=s.starttls,
        )
        pending = list(mails)
        try:
            async with asyncio.timeout(self._lease * 0.8):
                await smtp.connect()
                while pending:
                    mail = pending[0]
                    try:
                        now = datetime.fromtimestamp(self._clock(), UTC)
                        await smtp.send_message(render(mail, s.sender, now))
                    except OSError:
                        raise  # the connection is gone (dropped, timed out): see below
                    except Exception as exc:
                        # This mail only: the server refused it (recipient, size, SMTPUTF8)
                        # and aiosmtplib reset the transaction, or the row makes no valid
                        # mail. The connection still serves the others.
                        pending.pop(0)
                        results.append(_Result(mail, Outcome.FAILED, _describe(exc)))
                        continue
                    pending.pop(0)
                    results.append(_Result(mail, Outcome.SENT))
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await smtp.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # The connection failed (refused, dropped, login, timeout): every mail not yet
            # tried fails with it.
            error = _describe(exc)
            results += [_Result(m, Outcome.FAILED, error) for m in pending]
        finally:
            # Never QUIT on the way out of a cancellation: the server may be stuck, and
            # close() drops the connection at once.
            smtp.close()

    async def _record(self, results: list[_Result]) -> None:
        now = self._clock()
        next_at: list[float | None] = []
        for r in results:
            tries = r.mail.tries + 1
            if r.outcome is Outcome.FAILED and tries < self._settings.max_tries:
                next_at.append(now + retry_delay(tries, self._retry_base, self._retry_cap))
            else:
                next_at.append(None)
        await self._pool.execute(
            RECORD,
            [r.mail.id for r in results],
            [r.outcome.value for r in results],
            [r.error for r in results],
            next_at,
            now,
        )
        for r, at in zip(results, next_at, strict=True):
            self._log(r, at, now)

    def _log(self, r: _Result, next_at: float | None, now: float) -> None:
        m = r.mail
        context: dict[str, Any] = {
            "email_id": m.id,
            "kind": m.kind.value,
            "recipient": m.recipient,
            "delivery_id": m.delivery_id,
            "subscription_id": str(m.subscription_id),
        }
        if r.outcome is Outcome.SENT:
            log.info("mail.sent", **context)
        elif r.outcome is Outcome.RELEASED:
            log.info("mail.released", **context)
        elif next_at is None:
            # No tries left: the row stays unsent with its last_error, for an operator.
            log.error("mail.failed", error=r.error, tries=m.tries + 1, gave_up=True, **context)
        else:
            log.warning(
                "mail.failed",
                error=r.error,
                tries=m.tries + 1,
                retry_in=round(next_at - now, 3),
                **context,
            )


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"
