"""Hostile and broken receivers: every attempt ends in time, is classified and recorded.

Also the SSRF guard at send time (URL check, resolver, redirects) and the pure error
classification for faults loopback cannot produce (DNS).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
import trustme
from aiohttp import web

from dispatcher import http1
from dispatcher.netguard import (
    BlockedAddressError,
    GuardedResolver,
    Lookup,
    URLRejectedError,
    check_url,
    is_public,
)
from dispatcher.policy import ErrorKind, Outcome, Verdict, decide
from dispatcher.profiles import resolve
from dispatcher.send import Sender, classify, http_client

from .helpers import (
    Receiver,
    TLSReceiver,
    attempts_of,
    daemon,
    publish,
    settings_for,
    subscribe,
    wait_done,
)

HUGE = 50 * 1024 * 1024
ONE_SHOT = {"retry": {"max_attempts": 1}}


async def final_status(db: asyncpg.Connection) -> str:
    status: str = await db.fetchval("SELECT status FROM dispatcher.deliveries_done")
    return status


# -- a raw TCP receiver: for what a well-behaved HTTP server cannot be made to do ---------

Handler = Callable[["Conn"], Awaitable[None]]


@dataclass
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    sent: int = 0

    async def read_request(self) -> None:
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await self.reader.readexactly(length)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()
        self.sent += len(data)

    async def peer_closed(self) -> None:
        """Returns once the client closed or reset the connection."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass


@dataclass
class RawServer:
    """Counts connections and hands each to `handler`; sees when the client hangs up."""

    handler: Handler
    port: int = 0
    conns: list[Conn] = field(default_factory=list)
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(reader, writer)
        self.conns.append(conn)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def watch_hang_up(self, conn: Conn) -> None:
        await conn.peer_closed()
        self.hung_up.set()


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[RawServer]:
    raw = RawServer(handler)
    server = await asyncio.start_server(raw._serve, "127.0.0.1", 0)
    raw.port = server.sockets[0].getsockname()[1]
    try:
        yield raw
    finally:
        server.close()
        for task in list(raw._tasks):
            task.cancel()
        await asyncio.gather(*raw._tasks, return_exceptions=True)
        await server.wait_closed()


def trickle(where: str, server: list[RawServer]) -> Handler:
    """Slowloris: a byte every 0.2 s forever, in the headers or in a promised body."""

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        watcher = asyncio.create_task(server[0].watch_hang_up(conn))
        try:
            if where == "headers":
                await conn.send(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            else:
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            while not server[0].hung_up.is_set():
                await conn.send(b"a")
                await asyncio.sleep(0.2)
        finally:
            await watcher

    return handler


@pytest.mark.parametrize("where", ["headers", "body"])
async def test_a_slowloris_receiver_is_cut_off_at_the_subscription_timeout(
    database: str, db: asyncpg.Connection, where: str
) -> None:
    holder: list[RawServer] = []
    async with raw_server(trickle(where, holder)) as server:
        holder.append(server)
        url = f"http://127.0.0.1:{server.port}/hook"
        await subscribe(db, url, settings={"timeout": 1, **ONE_SHOT})
        async with daemon(settings_for(database)):
            await publish(db)
            await wait_done(db, 1)
            # The daemon hung up on it; the trickle did not keep a socket of ours open.
            await asyncio.wait_for(server.hung_up.wait(), 2)
    [attempt] = await attempts_of(db)
    assert attempt["status_code"] is None
    assert attempt["error"].startswith("timeout"), attempt["error"]
    assert 900 <= attempt["duration_ms"] <= 2500
    assert await final_status(db) == "failed"
    assert len(server.conns) == 1


def flood(framing: str) -> Handler:
    """A 200 with a 50 MB body, streamed as fast as the client takes it."""

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        if framing == "content-length":
            await conn.send(f"HTTP/1.1 200 OK\r\nContent-Length: {HUGE}\r\n\r\n".encode())
        else:
            await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        block = b"x" * 65536
        frame = block if framing == "content-length" else b"10000\r\n" + block + b"\r\n"
        with contextlib.suppress(ConnectionError):
            while conn.sent < HUGE:
                await conn.send(frame)
            if framing == "chunked":
                await conn.send(b"0\r\n\r\n")
        await conn.peer_closed()

    return handler


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_huge_response_body_is_captured_up_to_the_limit_and_not_read(
    database: str, db: asyncpg.Connection, framing: str
) -> None:
    async with raw_server(flood(framing)) as server:
        await subscribe(db, f"http://127.0.0.1:{server.port}/hook", settings=ONE_SHOT)
        async with daemon(settings_for(database, response_capture_bytes=1000)):
            await publish(db)
            await wait_done(db, 1)
        [conn] = server.conns
    [attempt] = await attempts_of(db)
    assert (attempt["status_code"], attempt["outcome"]) == (200, "delivered")
    assert attempt["response_excerpt"] == "x" * 1000
    assert attempt["duration_ms"] < 2000
    # Only what the socket buffers held left the server before the daemon hung up.
    assert conn.sent < HUGE // 2, f"{conn.sent} bytes of {HUGE} were read"


def redirect_to(location: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": location})

    return reply


async def test_an_endless_redirect_loop_ends_after_max_redirects(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    receiver.plan("/loop", then=redirect_to("/loop"))
    settings = {"follow_redirects": True, "max_redirects": 5, **ONE_SHOT}
    await subscribe(db, receiver.url("/loop"), settings=settings)
    async with daemon(settings_for(database)):
        await publish(db)
        await wait_done(db, 1)
    [attempt] = await attempts_of(db)
    assert attempt["status_code"] is None
    assert attempt["error"].startswith("too_many_redirects"), attempt["error"]
    assert 5 <= len(receiver.at("/loop")) <= 6
    assert await final_status(db) == "failed"


async def test_redirects_are_not_followed_by_default_and_a_302_is_a_failure(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    receiver.plan("/moved", then=redirect_to("/elsewhere"))
    await subscribe(db, receiver.url("/moved"), settings=ONE_SHOT)
    async with daemon(settings_for(database)):
        await publish(db)
        await wait_done(db, 1)
    [attempt] = await attempts_of(db)
    assert (attempt["status_code"], attempt["error"], attempt["outcome"]) == (302, None, "failed")
    assert receiver.at("/elsewhere") == []


async def test_tillhub_follows_a_redirect_to_an_allowed_destination(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    receiver.plan("/moved", then=redirect_to(receiver.url("/final")))
    await subscribe(db, receiver.url("/moved"), profile="tillhub", settings=ONE_SHOT)
    async with daemon(settings_for(database)):
        await publish(db)
        await wait_done(db, 1)
    [attempt] = await attempts_of(db)
    assert (attempt["status_code"], attempt["outcome"]) == (200, "delivered")
    assert len(receiver.at("/final")) == 1


async def test_a_redirect_to_a_private_address_is_refused_when_private_networks_are_not(
    receiver: Receiver,
) -> None:
    # The first hop stands in for a public host (the worker checks it, not the Sender);
    # the redirect names a literal address, which the connector never sends to a resolver.
    receiver.plan("/first", then=redirect_to(receiver.url("/second")))
    endpoint = resolve("tillhub", {})
    async with http_client(allow_private=False) as client:
        outcome = await Sender(client, 100, time.time, allow_http=True, allow_private=False).post(
            receiver.url("/first"), b"{}", {}, endpoint
        )
    assert outcome.error is ErrorKind.BLOCKED, outcome
    assert "non-public address 127.0.0.1" in outcome.detail
    assert [r.path for r in receiver.requests] == ["/first"]


# -- TLS --------------------------------------------------------------------------------


@pytest.fixture
async def untrusted_tls() -> AsyncIterator[TLSReceiver]:
    """An HTTPS receiver whose certificate comes from a CA no client trusts."""
    cert = trustme.CA().issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    async with TLSReceiver(context) as r:
        yield r


async def test_an_untrusted_certificate_is_a_tls_error(
    database: str, db: asyncpg.Connection, untrusted_tls: TLSReceiver
) -> None:
    await subscribe(db, untrusted_tls.url(), settings=ONE_SHOT)
    async with daemon(settings_for(database)):
        await publish(db)
        await wait_done(db, 1)
    [attempt] = await attempts_of(db)
    assert attempt["status_code"] is None
    assert attempt["error"].startswith("tls"), attempt["error"]
    assert untrusted_tls.requests == []


async def test_verify_tls_off_delivers_to_the_same_receiver(
    database: str, db: asyncpg.Connection, untrusted_tls: TLSReceiver
) -> None:
    await subscribe(db, untrusted_tls.url(), settings={"verify_tls": False, **ONE_SHOT})
    async with daemon(settings_for(database)):
        await publish(db)
        await wait_done(db, 1)
    [attempt] = await attempts_of(db)
    assert (attempt["status_code"], attempt["outcome"]) == (200, "delivered")
    assert len(untrusted_tls.requests) == 1


async def test_tillhub_does_not_retry_a_tls_error(
    database: str, db: asyncpg.Connection, untrusted_tls: TLSReceiver
) -> None:
    # No max_attempts override: the profile alone decides that a TLS error is final.
    await subscribe(db, untrusted_tls.url(), profile="tillhub")
    async with daemon(settings_for(database)):
        await publish(db)
        await wait_done(db, 1)
    [attempt] = await attempts_of(db)
    assert attempt["error"].startswith("tls")
    assert attempt["outcome"] == "failed"
    assert await final_status(db) == "failed"


async def test_a_redirect_from_https_to_plain_http_is_refused_when_http_is_not_allowed(
    untrusted_tls: TLSReceiver, receiver: Receiver
) -> None:
    untrusted_tls.plan("/hook", then=redirect_to(receiver.url("/plain")))
    endpoint = resolve("tillhub", {"verify_tls": False})
    async with http_client(allow_private=True) as client:
        outcome = await Sender(client, 100, time.time, allow_http=False, allow_private=True).post(
            untrusted_tls.url(), b"{}", {}, endpoint
        )
    assert outcome.error is ErrorKind.BLOCKED, outcome
    assert "https" in outcome.detail
    assert len(untrusted_tls.requests) == 1
    assert receiver.requests == []


# -- connection resets ------------------------------------------------------------------


def reset(when: str) -> Handler:
    """Abort the connection with a RST (SO_LINGER 0), on accept or after reading the request."""

    async def handler(conn: Conn) -> None:
        if when == "after_request":
            await conn.read_request()
        sock = conn.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.writer.transport.abort()

    return handler


@pytest.mark.parametrize("when", ["on_accept", "after_request"])
async def test_a_connection_reset_is_a_network_error_and_retried(
    database: str, db: asyncpg.Connection, when: str
) -> None:
    async with raw_server(reset(when)) as server:
        settings = {"retry": {"delays": [0.05], "max_attempts": 3}}
        await subscribe(db, f"http://127.0.0.1:{server.port}/hook", settings=settings)
        async with daemon(settings_for(database)):
            await publish(db)
            await wait_done(db, 1)
        assert len(server.conns) == 3
    attempts = await attempts_of(db)
    assert [a["outcome"] for a in attempts] == ["retry", "retry", "failed"]
    for a in attempts:
        assert a["status_code"] is None
        assert a["error"].startswith(("network", "connect")), a["error"]


# -- classification of what loopback cannot produce -------------------------------------


def failing_lookup(error: OSError) -> Lookup:
    """A resolver answer loopback cannot give: this lookup fails as a DNS server would."""

    async def lookup(host: str, port: int, **_: object) -> list[Any]:
        raise error

    return lookup


def fixed_lookup(address: str) -> Lookup:
    """A name that resolves to `address`, as a public DNS server could answer."""

    async def lookup(host: str, port: int, **_: object) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    return lookup


async def post_through(client: http1.Client, url: str) -> Outcome:
    sender = Sender(client, 100, time.time, allow_http=True, allow_private=False)
    return await sender.post(url, b"{}", {}, resolve("tillhub", {}))


async def test_a_dns_failure_is_classified_as_dns_and_retried_by_tillhub() -> None:
    error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    client = http1.Client(allow_private=False, lookup=failing_lookup(error))
    try:
        outcome = await post_through(client, "https://nowhere.invalid/hook")
    finally:
        await client.close()
    assert outcome.error is ErrorKind.DNS, outcome
    assert "nowhere.invalid" in outcome.detail
    created = outcome.started_at
    assert decide(resolve("tillhub", {}).policy, 1, outcome, created).verdict is Verdict.RETRY


async def test_a_name_resolving_only_to_private_addresses_is_blocked_not_retried(
    receiver: Receiver,
) -> None:
    client = http1.Client(allow_private=False, lookup=fixed_lookup("127.0.0.1"))
    try:
        outcome = await post_through(client, f"http://internal.example:{receiver.port}/hook")
    finally:
        await client.close()
    assert outcome.error is ErrorKind.BLOCKED, outcome
    assert "internal.example resolves only to non-public" in outcome.detail
    assert receiver.requests == []
    created = outcome.started_at
    assert decide(resolve("tillhub", {}).policy, 1, outcome, created).verdict is Verdict.FAILED


def test_a_refused_redirect_is_classified_as_blocked() -> None:
    kind, detail = classify(URLRejectedError("points at a non-public address 10.0.0.1"))
    assert kind is ErrorKind.BLOCKED
    assert detail.startswith("redirect points at")


# -- SSRF guard -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.255.254",
        "10.0.0.1",
        "10.255.255.255",
        "172.16.0.1",
        "172.31.255.254",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.1",
        "::1",
        "::",
        "fc00::1",
        "fd12:3456:789a::1",
        "fe80::1",
        "fe80::1%eth0",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "ff02::1",
    ],
)
def test_non_public_addresses_are_not_public(address: str) -> None:
    assert not is_public(address)


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "172.32.0.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_are_public(address: str) -> None:
    assert is_public(address)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://127.0.0.1/hook", "non-public address"),
        ("https://10.1.2.3/hook", "non-public address"),
        ("https://172.16.5.4:8443/hook", "non-public address"),
        ("https://192.168.0.10/hook", "non-public address"),
        ("https://169.254.169.254/latest/meta-data/", "non-public address"),
        ("https://0.0.0.0/hook", "non-public address"),
        ("https://[::1]/hook", "non-public address"),
        ("https://[fc00::1]/hook", "non-public address"),
        ("https://[fd00::2]/hook", "non-public address"),
        ("https://[fe80::1]/hook", "non-public address"),
        ("https://[::ffff:127.0.0.1]/hook", "non-public address"),
        # inet_aton's shorthands name the same addresses, in the same words.
        ("https://127.1/hook", "non-public address 127.0.0.1 "),
        ("https://0x7f000001/hook", "non-public address 127.0.0.1 "),
        ("https://2130706433/hook", "non-public address 127.0.0.1 "),
        ("https://0177.0.0.1/hook", "non-public address 127.0.0.1 "),
        ("https://2852039166/latest/meta-data/", "non-public address 169.254.169.254 "),
        ("https://10.1/hook", "non-public address 10.0.0.1 "),
        ("https://localhost/hook", "points at this host"),
        ("https://LOCALHOST:8443/hook", "points at this host"),
        ("ftp://example.com/hook", "http(s)"),
        ("file:///etc/passwd", "http(s)"),
        ("gopher://example.com/", "http(s)"),
        ("http://example.com/hook", "must use https"),
        ("https://user:secret@example.com/hook", "credentials"),
        ("https://:secret@example.com/hook", "credentials"),
        ("https:///hook", "no host"),
        ("https://example.com:99999/hook", "not a valid URL"),
    ],
)
def test_check_url_refuses_what_the_configuration_does_not_allow(url: str, reason: str) -> None:
    with pytest.raises(URLRejectedError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        check_url(url, allow_http=False, allow_private=False)


def test_check_url_accepts_public_https_and_what_the_configuration_allows() -> None:
    check_url("https://example.com/hook", allow_http=False, allow_private=False)
    check_url("https://8.8.8.8/hook", allow_http=False, allow_private=False)
    check_url("https://[2606:4700:4700::1111]/hook", allow_http=False, allow_private=False)
    check_url("http://example.com/hook", allow_http=True, allow_private=False)
    check_url("https://127.0.0.1:8443/hook", allow_http=False, allow_private=True)
    check_url("https://localhost/hook", allow_http=False, allow_private=True)
    # Credentials stay refused whatever else is allowed.
    with pytest.raises(URLRejectedError, match="credentials"):
        check_url("http://u:p@127.0.0.1/", allow_http=True, allow_private=True)
    # http stays refused with private networks allowed.
    with pytest.raises(URLRejectedError, match="https"):
        check_url("http://127.0.0.1/", allow_http=False, allow_private=True)


def test_allow_loopback_opens_loopback_only() -> None:
    loopback = {"allow_http": True, "allow_private": False, "allow_loopback": True}
    for url in (
        "http://127.0.0.1:9000/hook",
        "http://127.1:9000/hook",
        "http://127.8.9.10/hook",
        "http://[::1]:9000/hook",
        "http://localhost:9000/hook",
    ):
        check_url(url, **loopback)
    for url, address in (
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("http://2852039166/", "169.254.169.254"),
        ("http://10.0.0.1/", "10.0.0.1"),
        ("http://192.168.1.1/", "192.168.1.1"),
        ("http://[fe80::1]/", "fe80::1"),
    ):
        with pytest.raises(URLRejectedError, match=rf"{address} \(\[security\] allow_private"):
            check_url(url, **loopback)


async def test_the_guarded_resolver_with_allow_loopback_keeps_loopback_only() -> None:
    resolver = GuardedResolver(
        allow_private=False, lookup=fixed_lookup("127.0.0.1"), allow_loopback=True
    )
    assert await resolver.resolve("receiver.test", 443) == [(socket.AF_INET, "127.0.0.1")]
    metadata = GuardedResolver(
        allow_private=False, lookup=fixed_lookup("169.254.169.254"), allow_loopback=True
    )
    with pytest.raises(BlockedAddressError, match="non-public"):
        await metadata.resolve("metadata.test", 443)


async def test_the_guarded_resolver_refuses_a_name_that_resolves_to_loopback() -> None:
    # localhost comes from /etc/hosts: no DNS query leaves the machine.
    guarded = GuardedResolver(allow_private=False)
    with pytest.raises(BlockedAddressError, match="localhost"):
        await guarded.resolve("localhost", 443)
    results = await GuardedResolver(allow_private=True).resolve("localhost", 443)
    assert results
    assert {address for _, address in results} <= {"127.0.0.1", "::1"}


async def test_the_http_client_refuses_a_name_for_loopback_before_connecting(
    receiver: Receiver,
) -> None:
    endpoint = resolve("standard", {})
    async with http_client(allow_private=False) as client:
        outcome = await Sender(client, 100, time.time, allow_http=True, allow_private=False).post(
            f"http://localhost:{receiver.port}/hook", b"{}", {}, endpoint
        )
    assert outcome.error is ErrorKind.BLOCKED
    assert receiver.requests == []


# -- bodies and heads that are not text or not HTTP ------------------------------------


# Without the fix, the write of the batch failed and was retried forever: the test hangs.
@pytest.mark.timeout(30)
async def test_a_response_body_with_nul_bytes_is_recorded_and_blocks_nothing(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    async def binary(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"bad\x00body\xff\xfe")

    receiver.plan("/binary", then=binary)
    await subscribe(db, receiver.url("/binary"), ["products.*"], settings=ONE_SHOT)
    await subscribe(db, receiver.url("/fine"), ["products.*"], settings=ONE_SHOT)
    async with daemon(settings_for(database)):
        await publish(db, count=5)
        await wait_done(db, 10)
    attempts = await attempts_of(db)
    assert [a["outcome"] for a in attempts] == ["delivered"] * 10
    excerpts = {a["response_excerpt"] for a in attempts}
    assert "ok" in excerpts
    [binary_excerpt] = excerpts - {"ok"}
    assert binary_excerpt.startswith("bad")
    assert "\x00" not in binary_excerpt


def answer(raw: bytes) -> Handler:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(raw)
        await conn.writer.drain()
        conn.writer.close()  # a clean FIN: the request was read in full

    return handler


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", id="not-http"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 1024 * 1024 + b"\r\n\r\n", id="huge-header"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 100_000 + b"\r\n", id="many-headers"
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", id="short-body"),
    ],
)
async def test_a_malformed_or_cut_off_answer_is_a_network_error(
    database: str, db: asyncpg.Connection, raw: bytes
) -> None:
    async with raw_server(answer(raw)) as server:
        settings = {"timeout": 2, **ONE_SHOT}
        await subscribe(db, f"http://127.0.0.1:{server.port}/hook", settings=settings)
        async with daemon(settings_for(database)):
            await publish(db)
            await wait_done(db, 1)
    [attempt] = await attempts_of(db)
    assert attempt["outcome"] == "failed"
    assert attempt["error"].startswith("network"), attempt["error"]
    assert attempt["duration_ms"] < 2000, attempt["error"]


# -- the HTTP client's own paths: answers that end with the connection, interim answers, -----
# -- a kept-alive connection the receiver closed ---------------------------------------


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def post_local(client: http1.Client, port: int) -> Outcome:
    sender = Sender(client, 100, time.time, allow_http=True, allow_private=True)
    return await sender.post(
        f"http://127.0.0.1:{port}/hook", b"{}", {}, resolve("standard", {"timeout": 5})
    )


@pytest.mark.parametrize(
    ("raw", "status", "excerpt"),
    [
        pytest.param(
            b"HTTP/1.1 202 Accepted\r\nConnection: close\r\n\r\nthanks",
            202,
            "thanks",
            id="body-ends-at-close",
        ),
        pytest.param(b"HTTP/1.1 100 Continue\r\n\r\n" + OK, 200, "ok", id="interim-100"),
        pytest.param(b"HTTP/1.0 200 OK\r\n\r\nold", 200, "old", id="http-1.0"),
    ],
)
async def test_answers_the_client_must_read_to_their_end(
    raw: bytes, status: int, excerpt: str
) -> None:
    async with raw_server(answer(raw)) as server, http_client(allow_private=True) as client:
        outcome = await post_local(client, server.port)
    assert (outcome.status, outcome.error, outcome.body_excerpt) == (status, None, excerpt)


async def test_a_kept_alive_connection_closed_by_the_receiver_is_replaced_once() -> None:
    # The first connection answers one request, then reads the next and hangs up without
    # answering (a receiver's idle timeout racing our reuse): the request goes out again on
    # a new connection, which answers it.
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        if len(server.conns) == 1:
            await conn.send(OK)
            await conn.read_request()
            return  # RawServer closes the connection
        await conn.send(OK)

    async with raw_server(handler) as server, http_client(allow_private=True) as client:
        first = await post_local(client, server.port)
        second = await post_local(client, server.port)
        assert len(server.conns) == 2
    assert (first.status, second.status) == (200, 200)
    assert second.error is None


async def test_a_fresh_connection_closed_without_an_answer_is_not_sent_again() -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()

    async with raw_server(handler) as server, http_client(allow_private=True) as client:
        outcome = await post_local(client, server.port)
        assert len(server.conns) == 1
    assert outcome.error is ErrorKind.NETWORK
    assert "DisconnectedError" in outcome.detail
