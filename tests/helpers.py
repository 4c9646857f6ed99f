"""Test parts: a scriptable HTTP receiver, factories, and daemons in-process or as processes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn
from uuid import UUID

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from dispatcher import config
from dispatcher.app import started
from dispatcher.metrics import Metrics
from dispatcher.record import Leasing, Recorder, Result
from dispatcher.schedule import WakeTimer

HANG = "hang"
Reply = int | str | Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Request:
    at: float
    path: str
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class Receiver:
    """An HTTP server on 127.0.0.1 that records every request and answers as scripted.

    `plan(path, 500, 500)` answers the next two requests to `path` with 500, then `then`
    (200 unless set). HANG holds the request open until the receiver closes.
    """

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._plans: dict[str, list[Reply]] = {}
        self._then: dict[str, Reply] = {}
        self._arrived = asyncio.Condition()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self) -> Receiver:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing.set()
        assert self._runner is not None
        await self._runner.cleanup()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def plan(self, path: str, *replies: Reply, then: Reply = 200) -> None:
        self._plans[path] = list(replies)
        self._then[path] = then

    def at(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    async def wait_for(self, count: int, path: str | None = None, timeout: float = 10.0) -> None:
        def enough() -> bool:
            return len(self.requests if path is None else self.at(path)) >= count

        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(enough), timeout)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with self._arrived:
            self.requests.append(Request(time.time(), request.path, dict(request.headers), body))
            self._arrived.notify_all()
        plan = self._plans.get(request.path)
        reply: Reply = plan.pop(0) if plan else self._then.get(request.path, 200)
        if reply == HANG:
            await self._closing.wait()
            return web.Response(status=503)
        if callable(reply):
            return await reply(request)
        assert isinstance(reply, int)
        return web.Response(status=reply, text="ok" if reply == 200 else "nope")


# -- factories --------------------------------------------------------------------------

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


async def subscribe(
    db: asyncpg.Connection,
    url: str,
    events: list[str] | None = None,
    *,
    environment: str = "env-1",
    profile: str = "standard",
    settings: dict[str, Any] | None = None,
    active: bool = True,
    secret: str = SECRET,
) -> UUID:
    sid: UUID = await db.fetchval(
        "INSERT INTO dispatcher.subscriptions "
        "(environment_id, url, events, profile, settings, secret, active) "
        "VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, $7) RETURNING id",
        environment,
        url,
        events or ["products.*"],
        profile,
        orjson.dumps(settings or {}).decode(),
        secret,
        active,
    )
    return sid


async def publish(
    db: asyncpg.Connection,
    payload: Any = None,
    *,
    event: str = "products.create.v0",
    environment: str = "env-1",
    count: int = 1,
) -> list[UUID]:
    """Publish `count` events in one statement (one transaction)."""
    rows = await db.fetch(
        "INSERT INTO dispatcher.events (environment_id, event_name, payload) "
        "SELECT $1, $2, jsonb_set($3::text::jsonb, '{n}', to_jsonb(i)) "
        "FROM generate_series(1, $4) AS i RETURNING id",
        environment,
        event,
        orjson.dumps(payload or {"sku": "A-1"}).decode(),
        count,
    )
    return [r["id"] for r in rows]


def verify_standard(secret: str, headers: Mapping[str, str], body: bytes) -> bool:
    """Standard Webhooks verification, written from the spec (not the dispatcher's code)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    offered = [s.split(",", 1)[1] for s in headers["webhook-signature"].split()]
    return any(hmac.compare_digest(expected, o) for o in offered)


def verify_standard_v1a(public_key: str, headers: Mapping[str, str], body: bytes) -> bool:
    """Standard Webhooks v1a as a receiver checks it: any v1a signature that the whpk_
    public key verifies over "{id}.{timestamp}.{body}" (Ed25519, from `cryptography`)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key.removeprefix("whpk_")))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    for offered in headers["webhook-signature"].split():
        version, _, signature = offered.partition(",")
        if version != "v1a":
            continue
        try:
            key.verify(base64.b64decode(signature), signed)
        except InvalidSignature:
            continue
        return True
    return False


# -- daemons ----------------------------------------------------------------------------


def recorder_for(
    pool: asyncpg.Pool,
    owner: UUID,
    *,
    on_flushed: Callable[[list[Result]], None] = lambda batch: None,
    leasing: Leasing | None = None,
    largest: int | None = None,
) -> Recorder:
    """The daemon's recorder on its own, flushed by the test (a batch's worth: 10)."""
    return Recorder(
        pool,
        owner,
        WakeTimer(),
        Metrics(),
        interval=0.02,
        max_batch=10,
        largest=largest,
        on_flushed=on_flushed,
        leasing=leasing,
    )


def settings_for(dsn: str, **delivery: Any) -> config.Settings:
    """Settings for a daemon against `dsn` that may post to loopback over http."""
    base = config.Settings()
    d = replace(base.delivery, **{"poll_interval": 1.0, "grace_period": 2.0, **delivery})
    return replace(
        base,
        database=replace(base.database, url=dsn),
        admin=replace(base.admin, listen="127.0.0.1:0"),
        security=config.SecuritySettings(allow_private_networks=True, allow_http=True),
        delivery=d,
    )


daemon = started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class DaemonProcess:
    """`python -m dispatcher run` as a child process; stopped by pid, never by name."""

    dsn: str
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def start(self, log_dir: Path) -> None:
        self.log = log_dir / f"daemon-{self.port}-{time.monotonic_ns()}.log"
        env = {
            **os.environ,
            "DISPATCHER_DATABASE_URL": self.dsn,
            "DISPATCHER_ADMIN_LISTEN": f"127.0.0.1:{self.port}",
            "DISPATCHER_SECURITY_ALLOW_HTTP": "true",
            "DISPATCHER_SECURITY_ALLOW_PRIVATE_NETWORKS": "true",
            "DISPATCHER_LOG_FORMAT": "json",
            "DISPATCHER_CONFIG": os.devnull,
            **self.env,
        }
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dispatcher", "run"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"daemon exited early:\n{self.output()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{self.port}/readyz") as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise AssertionError(f"daemon not ready in {timeout}s:\n{self.output()}")

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon still running after {timeout}s")
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log else ""

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


async def poll_until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def wait_on_advisory_lock(db: asyncpg.Connection, pid: int) -> None:
    """Until the backend `pid` waits for an advisory lock."""
    waiting = "SELECT wait_event FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'"

    async def on_the_lock() -> bool:
        event: str | None = await db.fetchval(waiting, pid)
        return event == "advisory"

    await poll_until(on_the_lock, 10.0)


# -- hostile receivers and faults -------------------------------------------------------


class TLSReceiver(Receiver):
    """A Receiver served over HTTPS with `server_context` (e.g. a certificate nobody trusts)."""

    def __init__(self, server_context: ssl.SSLContext) -> None:
        super().__init__()
        self._server_context = server_context

    async def __aenter__(self) -> TLSReceiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._server_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    def url(self, path: str = "/hook") -> str:
        return f"https://127.0.0.1:{self.port}{path}"


def owner_of(proc: DaemonProcess) -> UUID:
    """The lease owner a daemon process announced in its `dispatcher.started` log line."""
    for line in proc.output().splitlines():
        if '"dispatcher.started"' in line:
            return UUID(orjson.loads(line)["owner"])
    raise AssertionError(f"no dispatcher.started line:\n{proc.output()}")


async def http_status(url: str) -> int | None:
    """The status of a GET, or None when nothing answers."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r,
        ):
            return r.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def attempts_of(db: asyncpg.Connection) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        "SELECT attempt, status_code, error, outcome, duration_ms, response_excerpt "
        "FROM dispatcher.attempts ORDER BY delivery_id, attempt"
    )
    return rows


async def wait_done(db: asyncpg.Connection, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while await db.fetchval("SELECT count(*) FROM dispatcher.deliveries_done") < count:
        assert time.monotonic() < deadline, "deliveries did not finish in time"
        await asyncio.sleep(0.02)


def missing_system_package(message: str) -> NoReturn:
    """A Debian package a test needs is absent. CI (CI=true; .ci/run installs them) fails;
    a developer's machine skips with the install command, so the README's test command
    runs on a fresh machine too."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(f"{message} (CI fails here)")
