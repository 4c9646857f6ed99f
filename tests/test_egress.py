"""Egress: a real forward proxy (tinyproxy), private CAs, client certificates, redirects
that keep the webhook whole, and the SSRF guard in front of the proxy."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trustme
from aiohttp import web

from dispatcher import config, http1, queries
from dispatcher.egress import (
    DIRECT_EGRESS,
    Egress,
    EgressError,
    NoProxy,
    TLSConfig,
    from_config,
    parse_proxy,
    validate_client_cert,
)
from dispatcher.netguard import Lookup
from dispatcher.policy import DeliveryPolicy, ErrorKind, Verdict, decide
from dispatcher.profiles import PROFILES, resolve
from dispatcher.send import Sender

from .helpers import (
    SECRET,
    Receiver,
    TLSReceiver,
    attempts_of,
    daemon,
    free_port,
    missing_system_package,
    publish,
    settings_for,
    subscribe,
    verify_standard,
    wait_done,
)

ONE_SHOT = {"retry": {"max_attempts": 1}}
SIGNED = {"webhook-id": "msg_1", "webhook-signature": "v1,abc", "Content-Type": "application/json"}


# -- parts ------------------------------------------------------------------------------


@dataclass
class Tinyproxy:
    port: int
    log: Path
    proc: subprocess.Popen[bytes]

    def url(self, credentials: str = "") -> str:
        return f"http://{credentials}127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        """The request lines tinyproxy logged ("POST http://..." or "CONNECT host:port")."""
        lines = self.log.read_text(errors="replace").splitlines()
        return [line.split("): ", 1)[1] for line in lines if "]: Request (file descriptor" in line]


@contextlib.asynccontextmanager
async def tinyproxy(
    folder: Path, *connect_ports: int, auth: tuple[str, str] | None = None
) -> AsyncIterator[Tinyproxy]:
    """tinyproxy in the foreground on a free loopback port; stopped by its pid."""
    exe = shutil.which("tinyproxy")
    if exe is None:
        missing_system_package(
            "tinyproxy is not installed: apt-get install -y --no-install-recommends tinyproxy"
        )
    port = free_port()
    conf = folder / f"tinyproxy-{port}.conf"
    lines = [
        f"Port {port}",
        "Listen 127.0.0.1",
        "Timeout 10",
        "Allow 127.0.0.1",
        "LogLevel Info",
        "MaxClients 64",
        *(f"ConnectPort {p}" for p in connect_ports),
    ]
    if auth is not None:
        lines.append(f"BasicAuth {auth[0]} {auth[1]}")
    conf.write_text("\n".join(lines) + "\n")
    log = folder / f"tinyproxy-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([exe, "-d", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "tinyproxy did not start"
            await asyncio.sleep(0.02)
        yield Tinyproxy(port, log, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(
    ca: trustme.CA, *names: str, client_ca: trustme.CA | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        client_ca.configure_trust(context)
    return context


def ca_egress(ca: trustme.CA, base: Egress = DIRECT_EGRESS) -> Egress:
    return base.override(tls={"ca": ca.cert_pem.bytes().decode()})


def sender(
    client: http1.Client, egress: Egress = DIRECT_EGRESS, *, allow_private: bool = True
) -> Sender:
    return Sender(
        client,
        4096,
        time.time,
        allow_http=True,
        allow_private=allow_private,
        allow_loopback=True,
        egress=egress,
    )


def closed_port() -> int:
    return free_port()  # bound, then released: nothing listens there


async def post(
    url: str,
    egress: Egress = DIRECT_EGRESS,
    *,
    profile: str = "standard",
    settings: dict[str, Any] | None = None,
    allow_private: bool = True,
    lookup: Lookup | None = None,
) -> Any:
    client = http1.Client(allow_private, allow_loopback=True, lookup=lookup)
    try:
        endpoint = resolve(profile, settings or {})
        return await sender(client, egress, allow_private=allow_private).post(
            url, b'{"sku": "A-1"}', dict(SIGNED), endpoint
        )
    finally:
        await client.close()


# -- through a forward proxy ------------------------------------------------------------


async def test_a_webhook_to_an_http_receiver_goes_through_the_configured_proxy_once_and_whole(
    database: str, db: asyncpg.Connection, receiver: Receiver, tmp_path: Path
) -> None:
    async with tinyproxy(tmp_path) as proxy:
        settings = settings_for(database)
        settings = replace(settings, egress=config.EgressSettings(proxy=proxy.url()))
        await subscribe(db, receiver.url(), settings=ONE_SHOT)
        async with daemon(settings):
            await publish(db, count=3)
            await wait_done(db, 3)
        assert proxy.requests() == [f"POST {receiver.url()} HTTP/1.1"] * 3
    assert len(receiver.requests) == 3
    for request in receiver.requests:
        assert verify_standard(SECRET, request.headers, request.body)
        assert "tinyproxy" in request.headers["Via"]
    assert [a["outcome"] for a in await attempts_of(db)] == ["delivered"] * 3


async def test_an_https_webhook_is_tunnelled_by_the_https_proxy_variable_and_trusts_ca_file(
    database: str,
    db: asyncpg.Connection,
    tmp_path: Path,
    ca: trustme.CA,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ca_file = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with (
        TLSReceiver(server_context(ca, "127.0.0.1")) as tls,
        tinyproxy(tmp_path, tls.port) as proxy,
    ):
        monkeypatch.setenv("HTTPS_PROXY", proxy.url())
        settings = settings_for(database)
        settings = replace(settings, egress=config.EgressSettings(ca_file=str(ca_file)))
        await subscribe(db, tls.url(), settings=ONE_SHOT)
        async with daemon(settings):
            await publish(db, count=2)
            await wait_done(db, 2)
        # By the receiver's name (here an address); sent at once, they may open two.
        tunnels = proxy.requests()
        assert set(tunnels) == {f"CONNECT 127.0.0.1:{tls.port} HTTP/1.1"}, tunnels
        assert 1 <= len(tunnels) <= 2
    assert len(tls.requests) == 2
    assert all(verify_standard(SECRET, r.headers, r.body) for r in tls.requests)
    assert [a["outcome"] for a in await attempts_of(db)] == ["delivered"] * 2


async def test_connect_names_the_host_so_a_filtering_proxy_can_apply_its_rules() -> None:
    lines: list[bytes] = []

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        egress = from_config(f"http://u%40x:p%3Ass@127.0.0.1:{port}", "")
        outcome = await post("https://localhost:8443/hook", egress)
    finally:
        server.close()
        await server.wait_closed()
    assert outcome.error is ErrorKind.PROXY, outcome
    assert "403" in outcome.detail
    head = lines[0].decode()
    assert head.startswith("CONNECT localhost:8443 HTTP/1.1\r\nHost: localhost:8443\r\n")
    # Percent-decoded credentials: "u@x" / "p:ss".
    assert "Proxy-Authorization: Basic dUB4OnA6c3M=\r\n" in head


async def test_a_proxy_that_refuses_connections_is_a_proxy_error_every_profile_retries(
    receiver: Receiver,
) -> None:
    egress = from_config(f"http://127.0.0.1:{closed_port()}", "")
    for url in (receiver.url(), "https://127.0.0.1:1/hook"):
        outcome = await post(url, egress)
        assert outcome.error is ErrorKind.PROXY, outcome
        assert "cannot connect to the proxy" in outcome.detail
    assert receiver.requests == []
    for profile in PROFILES:
        policy = resolve(profile, {}).policy
        assert decide(policy, 1, outcome, time.time()).verdict is Verdict.RETRY, profile


async def test_a_proxy_demanding_basic_auth_gets_it_from_the_url_and_407_is_a_proxy_error(
    receiver: Receiver, tmp_path: Path, ca: trustme.CA
) -> None:
    async with (
        TLSReceiver(server_context(ca, "127.0.0.1")) as tls,
        tinyproxy(tmp_path, tls.port, auth=("user", "secret")) as proxy,
    ):
        good = ca_egress(ca, from_config(proxy.url("user:secret@"), ""))
        bad = ca_egress(ca, from_config(proxy.url(), ""))
        assert (await post(receiver.url(), good)).status == 200
        assert (await post(tls.url(), good)).status == 200
        refused = [await post(receiver.url(), bad), await post(tls.url(), bad)]
    assert len(receiver.requests) == len(tls.requests) == 1
    for outcome in refused:
        assert (outcome.status, outcome.error) == (None, ErrorKind.PROXY), outcome
        assert "407" in outcome.detail
        # Never the receiver's answer: a rule on 407 does not deactivate, the error retries.
        policy = DeliveryPolicy(deactivate_on=frozenset({407, 500, 502}))
        decision = decide(policy, 1, outcome, time.time())
        assert (decision.verdict, decision.action) == (Verdict.RETRY, None)


async def test_the_proxys_own_error_page_is_a_proxy_error_and_the_receivers_5xx_is_its_answer(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.plan("/down", then=503)
    async with tinyproxy(tmp_path) as proxy:
        egress = from_config(proxy.url(), "")
        forwarded = await post(receiver.url("/down"), egress)
        own = await post(f"http://127.0.0.1:{closed_port()}/hook", egress)
    assert (forwarded.status, forwarded.error) == (503, None)  # it carries tinyproxy's Via
    assert (own.status, own.error) == (None, ErrorKind.PROXY), own
    assert "500" in own.detail  # tinyproxy: "500 Unable to connect", no Via


async def test_no_proxy_sends_matching_destinations_directly(
    receiver: Receiver, tmp_path: Path
) -> None:
    async with tinyproxy(tmp_path) as proxy:
        proxied = from_config("", "", {"http_proxy": proxy.url(), "NO_PROXY": "example.com"})
        bypassed = from_config(
            "", "", {"HTTP_PROXY": proxy.url(), "no_proxy": "localhost, 127.0.0.0/8"}
        )
        assert (await post(receiver.url("/via"), proxied)).status == 200
        assert (await post(receiver.url("/direct"), bypassed)).status == 200
        assert proxy.requests() == [f"POST {receiver.url('/via')} HTTP/1.1"]
    assert [r.path for r in receiver.requests] == ["/via", "/direct"]


async def test_proxy_none_ignores_the_environment(receiver: Receiver) -> None:
    env = {"HTTP_PROXY": f"http://127.0.0.1:{closed_port()}", "HTTPS_PROXY": "http://x:1"}
    assert from_config("none", "", env) == DIRECT_EGRESS
    assert (await post(receiver.url(), from_config("none", "", env))).status == 200
    assert (await post(receiver.url(), from_config("", "", env))).error is ErrorKind.PROXY


async def test_a_blocked_destination_never_reaches_the_proxy() -> None:
    connections = 0

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    async def internal(host: str, port: int, **_: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port))]

    server = await asyncio.start_server(count, "127.0.0.1", 0)
    egress = from_config(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", "")
    try:
        for url in ("http://internal.example/hook", "https://internal.example/hook"):
            outcome = await post(url, egress, allow_private=False, lookup=internal)
            assert outcome.error is ErrorKind.BLOCKED, outcome
    finally:
        server.close()
        await server.wait_closed()
    assert connections == 0  # the proxy itself, on loopback, is allowed: it was just not asked


def test_proxy_settings_parse_and_refuse_what_cannot_be_used() -> None:
    proxy = parse_proxy("http://user:pa%20ss@proxy.corp:3128")
    assert (proxy.host, proxy.port, proxy.authorization) == (
        "proxy.corp",
        3128,
        "Basic dXNlcjpwYSBzcw==",
    )
    assert str(proxy) == "http://proxy.corp:3128"  # no credentials in logs
    assert parse_proxy("http://[::1]:8080").host == "::1"
    for bad in ("https://proxy:443", "socks5://proxy:1080", "http://proxy:3128/path", "proxy"):
        with pytest.raises(EgressError):
            parse_proxy(bad)
    with pytest.raises(config.ConfigError, match=r"\[egress\] proxy"):
        config.load(None, {"DISPATCHER_EGRESS_PROXY": "ftp://x"})
    with pytest.raises(config.ConfigError, match=r"\[egress\] ca_file"):
        config.load(None, {"DISPATCHER_EGRESS_CA_FILE": "/nonexistent/ca.pem"})


def test_the_key_wins_over_the_environment_and_lower_case_over_upper_case() -> None:
    env = {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2"}
    assert from_config("http://key:3", "", env).https_proxy == parse_proxy("http://key:3")
    chosen = from_config("", "", env)
    assert chosen.https_proxy == parse_proxy("http://lower:2")
    assert chosen.http_proxy is None  # HTTPS_PROXY is for https targets only
    assert chosen.route("http", "example.com", 80).proxy is None
    with pytest.raises(EgressError, match="environment"):
        from_config("", "", {"HTTP_PROXY": "https://p:1"})


@pytest.mark.parametrize(
    ("entries", "host", "port", "bypassed"),
    [
        ("example.com", "example.com", 443, True),
        ("example.com", "api.example.com", 443, True),
        (".example.com", "api.example.com", 443, True),
        ("example.com", "notexample.com", 443, False),
        ("example.com:8443", "example.com", 443, False),
        ("example.com:8443", "example.com", 8443, True),
        ("10.0.0.0/8", "10.1.2.3", 80, True),
        ("10.0.0.0/8", "11.1.2.3", 80, False),
        ("::1", "::1", 80, True),
        ("[::1]:8080", "::1", 8080, True),
        ("*", "anything.example", 1, True),
        ("", "example.com", 443, False),
    ],
)
def test_no_proxy_entries(entries: str, host: str, port: int, bypassed: bool) -> None:
    assert NoProxy.parse(entries).bypasses(host, port) is bypassed


# -- private CAs and client certificates ------------------------------------------------


@pytest.fixture
def client_ca() -> trustme.CA:
    return trustme.CA()


def client_tls(ca: trustme.CA, client_ca: trustme.CA, **issue: Any) -> dict[str, str]:
    cert = client_ca.issue_cert("shop-42@dispatcher.example", **issue)
    return {
        "ca": ca.cert_pem.bytes().decode(),
        "client_cert": "".join(p.bytes().decode() for p in cert.cert_chain_pems),
        "client_key": cert.private_key_pem.bytes().decode(),
    }


async def test_a_receiver_demanding_a_client_certificate_gets_it_and_without_it_is_a_tls_error(
    ca: trustme.CA, client_ca: trustme.CA, tmp_path: Path
) -> None:
    async with TLSReceiver(server_context(ca, "127.0.0.1", client_ca=client_ca)) as mtls:
        with_cert = DIRECT_EGRESS.override(tls=client_tls(ca, client_ca))
        assert (await post(mtls.url(), with_cert)).status == 200
        async with tinyproxy(tmp_path, mtls.port) as proxy:
            through = from_config(proxy.url(), "").override(tls=client_tls(ca, client_ca))
            assert (await post(mtls.url(), through)).status == 200
            assert len(proxy.requests()) == 1
        without = await post(mtls.url(), ca_egress(ca))
    assert without.error is ErrorKind.TLS, without
    assert len(mtls.requests) == 2


async def test_without_the_private_ca_the_same_receiver_is_a_tls_error(ca: trustme.CA) -> None:
    async with TLSReceiver(server_context(ca, "127.0.0.1")) as tls:
        assert (await post(tls.url())).error is ErrorKind.TLS
        assert (await post(tls.url(), ca_egress(ca))).status == 200


async def test_ssl_contexts_are_built_once_per_tls_config(
    ca: trustme.CA, client_ca: trustme.CA
) -> None:
    client = http1.Client(True)
    try:
        first = client._tls_context(TLSConfig(**client_tls(ca, client_ca)), True)
        material = client_tls(ca, client_ca)
        same = TLSConfig(**material)
        assert client._tls_context(same, True) is client._tls_context(TLSConfig(**material), True)
        assert first is not client._tls_context(same, True)  # another certificate
    finally:
        await client.close()


def test_a_client_certificate_is_checked_before_it_is_used(
    ca: trustme.CA, client_ca: trustme.CA
) -> None:
    good = client_tls(ca, client_ca)
    found = validate_client_cert(good["client_cert"], good["client_key"])
    assert "shop-42@dispatcher.example" in found.subject or found.subject
    assert found.not_after > datetime.now(UTC)
    other = client_tls(ca, client_ca)
    with pytest.raises(EgressError, match="does not belong"):
        validate_client_cert(good["client_cert"], other["client_key"])
    with pytest.raises(EgressError, match="expired"):
        validate_client_cert(
            good["client_cert"], good["client_key"], now=found.not_after + timedelta(days=1)
        )
    old = client_tls(
        ca,
        client_ca,
        not_after=datetime.now(UTC) - timedelta(days=1),
        not_before=datetime.now(UTC) - timedelta(days=30),
    )
    with pytest.raises(EgressError, match="expired"):
        DIRECT_EGRESS.override(tls=old)
    with pytest.raises(EgressError, match="not a PEM certificate"):
        validate_client_cert("garbage", good["client_key"])
    with pytest.raises(EgressError, match="go together"):
        DIRECT_EGRESS.override(tls={"client_cert": good["client_cert"]})
    with pytest.raises(EgressError, match="ca is not"):
        DIRECT_EGRESS.override(tls={"ca": "not a certificate"})


# -- redirects keep the webhook whole ---------------------------------------------------


def redirect(status: int, location: str) -> Any:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": location})

    return reply


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_every_redirect_sends_the_same_post_again(receiver: Receiver, status: int) -> None:
    receiver.plan("/old", then=redirect(status, "/new"))
    outcome = await post(receiver.url("/old"), profile="tillhub")
    assert (outcome.status, outcome.redirects) == (200, (f"{status} {receiver.url('/new')}",))
    old, new = receiver.requests
    assert new.path == "/new"
    assert new.body == old.body == b'{"sku": "A-1"}'
    assert new.headers["webhook-signature"] == old.headers["webhook-signature"] == "v1,abc"
    assert new.headers["webhook-id"] == "msg_1"


async def test_the_redirect_chain_is_recorded_with_the_attempt(
    database: str, db: asyncpg.Connection, receiver: Receiver
) -> None:
    receiver.plan("/a", then=redirect(302, "/b"))
    receiver.plan("/b", then=redirect(307, receiver.url("/c")))
    await subscribe(db, receiver.url("/a"), profile="tillhub", settings=ONE_SHOT)
    async with daemon(settings_for(database)):
        await publish(db)
        await wait_done(db, 1)
    [attempt] = await attempts_of(db)
    assert (attempt["status_code"], attempt["outcome"]) == (200, "delivered")
    assert attempt["response_excerpt"] == (
        f"redirected: 302 {receiver.url('/b')} -> 307 {receiver.url('/c')}\nok"
    )
    assert [r.path for r in receiver.requests] == ["/a", "/b", "/c"]
    first = receiver.requests[0]
    assert first.headers["Tillhub-Signature"].startswith("t=")
    for hop in receiver.requests:
        assert hop.body == first.body
        assert hop.headers["Tillhub-Signature"] == first.headers["Tillhub-Signature"]


async def test_a_redirect_to_a_blocked_address_is_refused_and_the_chain_kept(
    receiver: Receiver,
) -> None:
    receiver.plan("/first", then=redirect(308, "http://169.254.169.254/latest/meta-data"))
    outcome = await post(receiver.url("/first"), profile="tillhub", allow_private=False)
    assert outcome.error is ErrorKind.BLOCKED, outcome
    assert outcome.redirects == ("308 http://169.254.169.254/latest/meta-data",)
    assert [r.path for r in receiver.requests] == ["/first"]


# -- IPv6 and hosts with both A and AAAA records ----------------------------------------


@contextlib.asynccontextmanager
async def listening(host: str, context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/{tail:.*}", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0, ssl_context=context)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def test_an_ipv6_literal_destination_is_delivered_over_tls(ca: trustme.CA) -> None:
    async with listening("::1", server_context(ca, "::1")) as port:
        assert (await post(f"https://[::1]:{port}/hook", ca_egress(ca))).status == 200


def both_families(v4: int, v6: int) -> Lookup:
    async def lookup(host: str, port: int, **_: Any) -> list[Any]:
        assert host == "dual.example"
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", v6, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", v4)),
        ]

    return lookup


async def test_a_host_with_a_and_aaaa_records_tries_each_allowed_address_in_order() -> None:
    async with listening("127.0.0.1") as port:
        # Nothing on ::1 at that port: the AAAA address is refused, the A address answers.
        client = http1.Client(False, allow_loopback=True, lookup=both_families(port, port))
        try:
            outcome = await sender(client, allow_private=False).post(
                f"http://dual.example:{port}/hook", b"{}", {}, resolve("standard", {})
            )
        finally:
            await client.close()
    assert outcome.status == 200, outcome


@pytest.fixture(autouse=True)
def _no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's own proxy variables must not leak into these tests."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


async def test_proxy_errors_do_not_count_toward_error_rate_deactivation(
    db: asyncpg.Connection, receiver: Receiver
) -> None:
    sid = await subscribe(db, receiver.url(), profile="tillhub")

    async def failures(error: str, count: int) -> None:
        await db.execute(
            "INSERT INTO dispatcher.attempts (delivery_id, subscription_id, attempt, started_at,"
            " duration_ms, error, outcome) SELECT i, $1, 1, now(), 1, $2, 'retry'"
            " FROM generate_series(1, $3) AS i",
            sid,
            error,
            count,
        )

    async def deactivated() -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await db.fetch(
            queries.ERROR_RATE_DEACTIVATE, [sid], [0.9], [5], [3600.0]
        )
        return rows

    await failures("proxy: ProxyError: the proxy answered CONNECT with 502 Bad Gateway", 20)
    assert await deactivated() == []  # the proxy's outage, not the receiver's
    await failures("connect: ConnectError: refused", 5)
    assert [r["id"] for r in await deactivated()] == [sid]
