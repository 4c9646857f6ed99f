"""Failure mails: queued in Postgres, sent over real SMTP (aiosmtpd on loopback), at least once."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import orjson
import pytest
from aiosmtpd.controller import Controller

from dispatcher import config
from dispatcher.mailer import Kind, Mailer, QueuedMail, render, retry_delay

from .helpers import free_port, poll_until, subscribe

# A body with what a verbatim copy must survive: non-ASCII, quotes, a line past 78 columns.
REQUEST_BODY = orjson.dumps(
    {
        "type": "sales.closed",
        "id": "s-1",
        "customer": "Jürgen Müller-Lüdenscheidt",
        "note": 'a "quoted" value, and a line long enough to be folded by a careless mailer ' * 2,
        "total": 12.5,
    }
).decode()


@dataclass(frozen=True, slots=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage


class Sink:
    """aiosmtpd handler: records accepted mails; can refuse recipients or stall a mail."""

    def __init__(self, *, refuse: frozenset[str] = frozenset()) -> None:
        self.mails: list[Received] = []
        self.refused: list[str] = []
        self._refuse = refuse
        self._lock = threading.Lock()
        # Stall the mail whose DATA arrives while this many mails were accepted (None: never).
        self.stall_at: int | None = None
        self.stalled = threading.Event()
        self.unstall = threading.Event()

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address in self._refuse:
            with self._lock:
                self.refused.append(address)
            return "550 5.1.1 no such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            stall = self.stall_at is not None and len(self.mails) == self.stall_at
        if stall:
            self.stall_at = None
            self.stalled.set()
            # Never accepted: the client gives up first, so this mail was not delivered.
            await asyncio.to_thread(self.unstall.wait, 30)
            return "451 4.3.0 try again later"
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self._lock:
            self.mails.append(Received(envelope.mail_from, list(envelope.rcpt_tos), message))
        return "250 Message accepted"

    def subjects(self) -> list[str]:
        with self._lock:
            # .strip(): a long subject is folded right after "Subject:", and Python's parser
            # keeps the folding space that mail clients drop.
            return sorted(str(m.message["Subject"]).strip() for m in self.mails)


@contextlib.asynccontextmanager
async def smtp_server(sink: Sink, port: int) -> AsyncIterator[None]:
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    await asyncio.to_thread(controller.start)
    try:
        yield
    finally:
        sink.unstall.set()
        await asyncio.to_thread(controller.stop)


def email_settings(port: int, **overrides: Any) -> config.EmailSettings:
    base = config.EmailSettings(
        smtp_host="127.0.0.1",
        smtp_port=port,
        sender="dispatcher@shop.example",
        timeout=2.0,
        poll_interval=0.05,
    )
    return replace(base, **overrides)


@contextlib.asynccontextmanager
async def running(
    pool: asyncpg.Pool, settings: config.EmailSettings, **kwargs: Any
) -> AsyncIterator[Mailer]:
    mailer = Mailer(pool, settings, retry_base=0.05, retry_cap=0.2, **kwargs)
    task = asyncio.create_task(mailer.run())
    try:
        yield mailer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database, min_size=1, max_size=3)
    try:
        yield p
    finally:
        await p.close()


async def failing_delivery(
    db: asyncpg.Connection, address: str = "dev@shop.example", environment: str = "shop-42"
) -> tuple[int, UUID]:
    """A Tilby subscription with a failure address and the delivery of one published event."""
    sid = await subscribe(
        db, "https://partner.example/hook", ["sales.*"], environment=environment, profile="tilby"
    )
    await db.execute("UPDATE dispatcher.subscriptions SET email = $2 WHERE id = $1", sid, address)
    await db.execute(
        "SELECT dispatcher.publish($1, 'sales.closed.v0', $2::text::jsonb)",
        environment,
        REQUEST_BODY,
    )
    delivery_id: int = await db.fetchval(
        "SELECT id FROM dispatcher.deliveries WHERE subscription_id = $1", sid
    )
    return delivery_id, sid


async def queue(
    db: asyncpg.Connection,
    delivery_id: int,
    sid: UUID,
    kind: str,
    attempt: int,
    status: int | None,
    error: str | None,
) -> None:
    queued = await db.fetchval(
        "SELECT dispatcher.queue_emails($1, $2, $3, $4, $5, $6, $7)",
        [delivery_id],
        [sid],
        [kind],
        [attempt],
        [status],
        [error],
        [REQUEST_BODY],
    )
    assert queued == 1


async def email_rows(db: asyncpg.Connection) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        "SELECT id, kind, tries, last_error, sent_at, due_at FROM dispatcher.emails ORDER BY id"
    )
    return rows


def all_sent(db: asyncpg.Connection) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        unsent: int = await db.fetchval(
            "SELECT count(*) FROM dispatcher.emails WHERE sent_at IS NULL"
        )
        return unsent == 0

    return check


async def test_failure_mails_reach_the_address_with_the_request_body_verbatim(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    delivery_id, sid = await failing_delivery(db)
    await queue(db, delivery_id, sid, "attempt_failed", 2, 500, None)
    await queue(db, delivery_id, sid, "gave_up", 4, None, "timeout: no answer in 30 s")
    sink, port = Sink(), free_port()
    async with smtp_server(sink, port), running(pool, email_settings(port)):
        await poll_until(all_sent(db))
        await asyncio.sleep(0.3)  # several more polls: nothing is sent again

    assert sink.subjects() == [
        "Webhook delivery failed: sales.closed.v0 to https://partner.example/hook",
        "Webhook delivery gave up: sales.closed.v0 to https://partner.example/hook",
    ]
    for received in sink.mails:
        assert received.mail_from == "dispatcher@shop.example"
        assert received.rcpt_tos == ["dev@shop.example"]
        assert received.message["From"] == "dispatcher@shop.example"
        assert received.message["To"] == "dev@shop.example"
        assert received.message["Auto-Submitted"] == "auto-generated"
        # Text travels with CRLF line ends; the body itself arrives character for character.
        text = received.message.get_content().replace("\r\n", "\n")
        assert f"Request body:\n{REQUEST_BODY}\n" in text
        assert "https://partner.example/hook" in text
        assert f"Delivery:     {delivery_id}" in text
    by_kind = {
        str(m.message["Subject"]).strip().split(":")[0]: m.message.get_content() for m in sink.mails
    }
    failed = by_kind["Webhook delivery failed"]
    assert "Attempt 2 to deliver a webhook" in failed
    assert "HTTP status 500" in failed
    gave_up = by_kind["Webhook delivery gave up"]
    assert "reached the retry limit after 4 attempts and will not be sent again" in gave_up
    assert "timeout: no answer in 30 s" in gave_up
    assert [(r["tries"], r["last_error"]) for r in await email_rows(db)] == [(0, None)] * 2


async def test_a_mail_queued_while_the_smtp_server_is_down_arrives_once_it_is_up(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    delivery_id, sid = await failing_delivery(db)
    await queue(db, delivery_id, sid, "attempt_failed", 1, 503, None)
    sink, port = Sink(), free_port()
    async with running(pool, email_settings(port)):

        async def tried_twice() -> bool:
            return bool(await db.fetchval("SELECT tries >= 2 FROM dispatcher.emails"))

        await poll_until(tried_twice)
        [row] = await email_rows(db)
        assert row["sent_at"] is None
        assert "Connect" in row["last_error"] or "refused" in row["last_error"]
        async with smtp_server(sink, port):
            await poll_until(all_sent(db))
            await asyncio.sleep(0.3)
    assert sink.subjects() == [
        "Webhook delivery failed: sales.closed.v0 to https://partner.example/hook"
    ]


async def test_a_cancelled_mailer_leaves_what_is_unsent_to_the_next_one(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    delivery_id, sid = await failing_delivery(db)
    await queue(db, delivery_id, sid, "attempt_failed", 3, 502, None)
    await queue(db, delivery_id, sid, "gave_up", 4, 502, None)
    sink, port = Sink(), free_port()
    sink.stall_at = 1  # the first mail is accepted, the second stalls in DATA
    async with smtp_server(sink, port):
        async with running(pool, email_settings(port, timeout=30.0)):
            await asyncio.to_thread(sink.stalled.wait, 10)
        # Stopped mid-conversation: the accepted mail is recorded as sent, the stalled one
        # is handed back unsent, due now, with no try counted.
        rows = await email_rows(db)
        assert sorted(r["sent_at"] is None for r in rows) == [False, True]
        assert [r["tries"] for r in rows] == [0, 0]
        assert len(sink.mails) == 1
        async with running(pool, email_settings(port)):
            await poll_until(all_sent(db))
            await asyncio.sleep(0.3)
    assert sink.subjects() == [
        "Webhook delivery failed: sales.closed.v0 to https://partner.example/hook",
        "Webhook delivery gave up: sales.closed.v0 to https://partner.example/hook",
    ]


async def test_a_refused_mail_gives_up_after_max_tries_and_keeps_its_last_error(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    bad_delivery, bad_sid = await failing_delivery(db, "nobody@shop.example", "shop-1")
    good_delivery, good_sid = await failing_delivery(db, "dev@shop.example", "shop-2")
    await queue(db, bad_delivery, bad_sid, "gave_up", 4, 500, None)
    await queue(db, good_delivery, good_sid, "gave_up", 4, 500, None)
    sink, port = Sink(refuse=frozenset({"nobody@shop.example"})), free_port()
    async with smtp_server(sink, port), running(pool, email_settings(port, max_tries=3)):

        async def given_up() -> bool:
            return bool(await db.fetchval("SELECT bool_or(tries = 3) FROM dispatcher.emails"))

        await poll_until(given_up)
        await asyncio.sleep(0.5)  # retries would be due every 0.2 s at most: none come
    bad, good = await email_rows(db)
    assert bad["tries"] == 3
    assert bad["sent_at"] is None
    assert "550" in bad["last_error"]
    assert "no such mailbox here" in bad["last_error"]
    assert await db.fetchval(
        "SELECT due_at = 'infinity' FROM dispatcher.emails WHERE id = $1", bad["id"]
    )
    assert sink.refused == ["nobody@shop.example"] * 3
    # The refusal did not cost the other mail of the batch its connection.
    assert good["sent_at"] is not None
    assert [m.rcpt_tos for m in sink.mails] == [["dev@shop.example"]]


async def test_without_an_smtp_host_nothing_is_sent_and_nothing_is_lost(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    delivery_id, sid = await failing_delivery(db)
    await queue(db, delivery_id, sid, "attempt_failed", 1, 500, None)
    before = await email_rows(db)
    sink, port = Sink(), free_port()
    async with smtp_server(sink, port):
        async with running(pool, email_settings(port, smtp_host="")) as mailer:
            mailer.notify()
            await asyncio.sleep(0.3)
        assert await email_rows(db) == before
        assert sink.mails == []
        # Configured later, the mail that waited goes out.
        async with running(pool, email_settings(port)):
            await poll_until(all_sent(db))
    assert len(sink.mails) == 1


async def test_notify_wakes_the_mailer_before_its_poll(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    sink, port = Sink(), free_port()
    async with (
        smtp_server(sink, port),
        running(pool, email_settings(port, poll_interval=60.0)) as mailer,
    ):
        await asyncio.sleep(0.2)  # its first look found nothing; the next poll is a minute away
        delivery_id, sid = await failing_delivery(db)
        await queue(db, delivery_id, sid, "attempt_failed", 1, 500, None)
        mailer.notify()
        await poll_until(all_sent(db), timeout=5.0)
    assert len(sink.mails) == 1


def test_a_header_cannot_be_injected_through_the_url_or_event_name() -> None:
    mail = QueuedMail(
        id=7,
        subscription_id=uuid4(),
        delivery_id=1,
        environment_id="shop-42",
        recipient="dev@shop.example",
        kind=Kind.ATTEMPT_FAILED,
        attempt=1,
        status_code=None,
        error="connect: refused",
        url="https://x.example/\r\nBcc: victim@example.com",
        event_name="sales.closed.v0",
        body=None,
        created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        tries=0,
    )
    msg = render(mail, "dispatcher@shop.example", datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC))
    assert msg["Bcc"] is None
    assert msg["Message-ID"] == "<dispatcher-email-7.1767323045@shop.example>"
    assert "connect: refused" in msg.get_content()
    assert "(the request body was not recorded)" in msg.get_content()


def test_retry_delays_double_and_are_capped() -> None:
    assert [retry_delay(n, 30.0, 3600.0) for n in (1, 2, 3, 8, 9, 50, 10_000)] == [
        30.0,
        60.0,
        120.0,
        3600.0,
        3600.0,
        3600.0,
        3600.0,
    ]


def test_email_settings_come_from_the_environment() -> None:
    settings = config.load(
        None,
        environ={
            "DISPATCHER_EMAIL_SMTP_HOST": "mail.example",
            "DISPATCHER_EMAIL_SMTP_PORT": "587",
            "DISPATCHER_EMAIL_STARTTLS": "true",
            "DISPATCHER_EMAIL_USERNAME": "dispatcher",
            "DISPATCHER_EMAIL_PASSWORD": "s3cret",
        },
    )
    assert settings.email == config.EmailSettings(
        smtp_host="mail.example",
        smtp_port=587,
        starttls=True,
        username="dispatcher",
        password="s3cret",
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DISPATCHER_EMAIL_STARTTLS": "1", "DISPATCHER_EMAIL_TLS": "1"}, "exclude each other"),
        ({"DISPATCHER_EMAIL_SMTP_PORT": "0"}, "[email] smtp_port"),
        ({"DISPATCHER_EMAIL_SENDER": "dispatcher"}, "[email] sender"),
        ({"DISPATCHER_EMAIL_MAX_TRIES": "0"}, "[email] max_tries must be positive"),
        ({"DISPATCHER_EMAIL_USERNAME": "u"}, "username and password go together"),
    ],
)
def test_bad_email_settings_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.load(None, environ=env)
    assert message in str(info.value)
