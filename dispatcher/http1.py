"""A lean HTTP/1.1 client for webhook requests: pooled keep-alive connections on asyncio
protocols, answers parsed by llhttp (httptools), one deadline per exchange, and at most
`capture` bytes of an answer kept.

A general client (aiohttp) spends about 130-190 us of CPU per POST here, mostly building
and tearing down request/response objects a webhook never needs; this one writes one
preformatted buffer and reads the status, `Location` and the start of the body, for about
25 us. Names are resolved through the SSRF guard (netguard) and the connection goes to
exactly the address that was checked.

Through a forward proxy (an egress.Route with a proxy) the destination is still resolved
and checked here first, so a refused destination never reaches the proxy; then https goes
through a CONNECT tunnel by host name (the proxy may apply its own hostname rules) with TLS
to the receiver inside it (loop.start_tls: SNI and the certificate check use the receiver's
name), and http is sent in absolute form. Connections are pooled per (route, origin).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from typing import cast

import httptools
from yarl import URL

from .egress import DIRECT, NO_TLS, Proxy, Route, TLSConfig, ssl_context
from .netguard import GuardedResolver, Lookup

MAX_HEAD = 64 * 1024  # status line and headers of an answer
MAX_HEADERS = 256
KEEPALIVE = 15.0  # an idle connection is closed after this long
_TARGETS_CACHED = 4096


class HTTPError(Exception):
    """The exchange failed; the subclass says where."""


class ConnectError(HTTPError):
    """No connection could be made (refused, unreachable, reset during connect)."""


class DNSError(HTTPError):
    """The host name did not resolve."""


class TLSError(HTTPError):
    """The TLS handshake failed (untrusted certificate, wrong name, bad protocol)."""


class ProtocolError(HTTPError):
    """The answer is not HTTP/1.1 we accept (malformed, head too large, an upgrade)."""


class ProxyError(HTTPError):
    """The proxy failed: unreachable, refused CONNECT (407, 403, 502, ...), or answered a
    plain-http request with an error page of its own (see Response.from_proxy)."""


class DisconnectedError(HTTPError):
    """The connection closed before the answer was complete."""


class TooManyRedirectsError(HTTPError):
    """The answer redirected more often than the subscription allows."""


class InvalidHeaderError(HTTPError):
    """A request header (from a subscription's settings) that would break the request."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a connection goes; connections are pooled by it."""

    scheme: str
    host: str  # IDNA-encoded name or literal address (IPv6 without brackets)
    port: int
    verify_tls: bool
    route: Route = DIRECT


@dataclass(frozen=True, slots=True)
class Target:
    url: URL
    host_header: str
    path: str  # path and query, percent-encoded


@dataclass(slots=True)  # not frozen: one per delivery (see attempt.py)
class Response:
    status: int
    location: str | None
    body: bytes  # at most `capture` bytes of it
    retry_after: str | None = None  # the header as sent (seconds or an HTTP date)
    # Through a proxy, for a plain-http target: the proxy's own error page, not the
    # receiver's answer. RFC 9110 7.6.3 has a proxy add Via to every answer it forwards
    # (tinyproxy, squid and smokescreen do); its own error pages carry none. So: a 407, a
    # squid error (X-Squid-Error), or a 403 or 5xx without Via is the proxy's.
    from_proxy: bool = False


def parse_target(url: str) -> Target:
    """Split a URL once (cached by the caller); ValueError when it cannot be requested."""
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise ValueError(f"cannot request {url!r}")
    return Target(parsed, parsed.host_port_subcomponent or parsed.raw_host, parsed.raw_path_qs)


def _safe(text: str) -> str:
    if "\r" in text or "\n" in text or "\x00" in text:
        raise InvalidHeaderError(f"header contains a line break or NUL: {text[:40]!r}")
    return text


def request_head(
    method: str,
    target: Target,
    headers: dict[str, str],
    body: bytes | None,
    proxy: Proxy | None = None,
) -> bytes:
    """The request line and headers; absolute-form (with Proxy-Authorization) for a proxy."""
    if proxy is None:
        lines = [f"{method} {target.path} HTTP/1.1\r\nHost: {target.host_header}\r\n"]
    else:
        lines = [
            f"{method} {target.url.scheme}://{target.host_header}{target.path} HTTP/1.1\r\n"
            f"Host: {target.host_header}\r\n"
        ]
        if proxy.authorization is not None:
            lines.append(f"Proxy-Authorization: {_safe(proxy.authorization)}\r\n")
    for name, value in headers.items():
        lines.append(f"{_safe(name)}: {_safe(value)}\r\n")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode()


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; at most one exchange at a time."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[Response] | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._capture = 0
        # Only a plain-http request through a proxy can get the proxy's own error page.
        self._watch_proxy = origin.route.proxy is not None and origin.scheme == "http"
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._location: str | None = None
        self._retry_after: str | None = None
        self._chunks: list[bytes] = []
        self._kept = 0
        self._overflow = False
        self._head_bytes = 0
        self._headers = 0
        self._headers_done = False
        self._framed = False  # Content-Length or chunked: the answer does not end at close
        self._keep_alive = False
        self._via = False
        self._squid_error = False
        self.got_data = False

    # -- the exchange ------------------------------------------------------------------

    def start(self, data: bytes, capture: int) -> asyncio.Future[Response]:
        assert self.transport is not None
        assert self._waiter is None
        self._reset()
        self._capture = capture
        self._parser = httptools.HttpResponseParser(self)
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return waiter

    def reusable(self) -> bool:
        return not self.closed and self._waiter is None and self._keep_alive

    def expired(self, now: float) -> bool:
        """Closed by the peer, or idle for KEEPALIVE seconds: not to be used again."""
        return self.closed or now - self.idle_since >= KEEPALIVE

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def timed_out(self) -> None:
        self._fail(TimeoutError("no complete answer within the timeout"))

    def _fail(self, exc: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        self.abort()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _finish(self, complete: bool) -> None:
        waiter, self._waiter = self._waiter, None
        if not complete:
            self._keep_alive = False
            self.abort()
        if waiter is not None and not waiter.done():
            status = self._status
            from_proxy = self._watch_proxy and (
                status == 407
                or self._squid_error
                or ((status == 403 or status >= 500) and not self._via)
            )
            waiter.set_result(
                Response(
                    status,
                    self._location,
                    b"".join(self._chunks),
                    self._retry_after,
                    from_proxy,
                )
            )

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._parser is None:
            self.abort()  # an idle connection has nothing to say
            return
        self.got_data = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("the receiver switched protocols"))
            return
        except Exception as exc:  # httptools' parse errors, and ours raised from callbacks
            cause = exc.__context__ if isinstance(exc.__context__, HTTPError) else exc
            self._fail(ProtocolError(f"malformed answer: {cause}"))
            return
        if self._waiter is None:
            return
        if not self._headers_done:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._fail(ProtocolError(f"answer head larger than {MAX_HEAD} bytes"))
        elif self._overflow:
            self._finish(complete=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is None:
            return
        if self._headers_done and not self._framed and self._status >= 200:
            self._finish(complete=True)  # an answer that ends with its connection
        elif exc is None and self.origin.scheme == "https" and not (self.reused or self.got_data):
            # TLS 1.3 finishes the client's handshake before the server has judged the
            # client certificate; a refusal arrives as an alert that asyncio's SSL layer
            # reports as a plain close (no error, no byte of an answer). On a fresh
            # connection that is the likely cause, and retrying will not change it.
            self._fail(
                TLSError(
                    "the receiver closed the TLS connection without answering (how TLS 1.3 "
                    "shows a missing or refused client certificate)"
                )
            )
        elif exc is not None:
            self._fail(DisconnectedError(f"connection lost: {exc}"))
        else:
            self._fail(DisconnectedError("connection closed before the answer was complete"))

    # -- httptools callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers += 1
        if self._headers > MAX_HEADERS:
            raise ProtocolError(f"more than {MAX_HEADERS} header fields")
        lowered = name.lower()
        if lowered == b"location":
            self._location = value.decode("latin-1")
        elif lowered == b"retry-after":
            self._retry_after = value.decode("latin-1")[:100]
        elif lowered in (b"content-length", b"transfer-encoding"):
            self._framed = True
        elif self._watch_proxy:
            if lowered == b"via":
                self._via = True
            elif lowered == b"x-squid-error":
                self._squid_error = True

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self._headers_done = True
        self._status = self._parser.get_status_code()
        self._keep_alive = self._parser.should_keep_alive()
        if self._status in (204, 304):
            self._framed = True

    def on_body(self, body: bytes) -> None:
        room = self._capture - self._kept
        if len(body) > room:
            self._overflow = True
            body = body[:room]
        if body:
            self._chunks.append(body)
            self._kept += len(body)

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self._reset()
            self.got_data = True
            return
        self._finish(complete=True)


class _Tunnel(asyncio.Protocol):
    """A connection to a proxy until its answer to CONNECT; then TLS takes it over."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._head = bytearray()
        self._answer: asyncio.Future[bytes] | None = None

    def open(self, authority: str, proxy: Proxy) -> asyncio.Future[bytes]:
        """Send CONNECT; the future gets what the proxy sent up to the end of its answer's
        head (and any bytes that came with it)."""
        assert self.transport is not None
        lines = [f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"]
        if proxy.authorization is not None:
            lines.append(f"Proxy-Authorization: {_safe(proxy.authorization)}\r\n")
        lines.append("\r\n")
        self._answer = asyncio.get_running_loop().create_future()
        self.transport.write("".join(lines).encode())
        return self._answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        answer = self._answer
        if answer is None or answer.done():
            # Bytes after the head: the receiver speaks before our TLS hello, or the proxy
            # sent a body with a refusal we already read. Either way the tunnel is unusable.
            if self.transport is not None:
                self.transport.abort()
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end >= 0:
            answer.set_result(bytes(self._head))  # the head, and whatever came after it
        elif len(self._head) > MAX_HEAD:
            answer.set_exception(ProxyError(f"CONNECT answer head larger than {MAX_HEAD} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(
                ProxyError(f"the proxy closed the connection before answering CONNECT: {exc}")
            )


def _connect_status(head: bytes) -> tuple[int, str]:
    """The status and reason of a CONNECT answer's status line; ProxyError if malformed."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    version, _, rest = line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not code.isdigit() or len(code) != 3:
        raise ProxyError(f"the proxy's answer to CONNECT is not HTTP: {line[:80]!r}")
    return int(code), reason.strip()


class Client:
    """Connection pools by (route, origin), SSL contexts by TLS config, the guarded resolver."""

    def __init__(
        self,
        allow_private: bool,
        *,
        max_idle_per_origin: int = 512,
        lookup: Lookup | None = None,
        allow_loopback: bool = False,
        ca_file: str | None = None,
    ) -> None:
        self._resolver = GuardedResolver(allow_private, lookup, allow_loopback=allow_loopback)
        self._idle: dict[Origin, list[_Connection]] = {}
        self._max_idle = max_idle_per_origin
        self._targets: dict[str, Target] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._ca_file = ca_file or None
        # Built once per (TLS config, verify): a handshake reuses its context, and a
        # subscription's client certificate is read from its temp file only once.
        self._tls: dict[tuple[TLSConfig, bool], ssl.SSLContext] = {}
        for verify in (True, False):
            self._tls_context(NO_TLS, verify)  # a bad ca_file fails at start, not at a send

    def _tls_context(self, config: TLSConfig, verify: bool) -> ssl.SSLContext:
        context = self._tls.get((config, verify))
        if context is None:
            if len(self._tls) >= _TARGETS_CACHED:
                self._tls.clear()
            context = ssl_context(config, verify=verify, ca_file=self._ca_file)
            self._tls[config, verify] = context
        return context

    def target(self, url: str) -> Target:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) >= _TARGETS_CACHED:
                self._targets.clear()
            target = self._targets[url] = parse_target(url)
        return target

    async def request(
        self,
        method: str,
        target: Target,
        headers: dict[str, str],
        body: bytes | None,
        *,
        deadline: float,
        connect_timeout: float,
        verify_tls: bool,
        capture: int,
        route: Route = DIRECT,
    ) -> Response:
        """One exchange, finished by `deadline` (loop time) or TimeoutError; ProxyError when
        the proxy of `route`, not the receiver, produced the answer."""
        url = target.url
        origin = Origin(url.scheme, url.raw_host or "", url.port or 0, verify_tls, route)
        absolute = route.proxy if route.proxy is not None and url.scheme == "http" else None
        data = request_head(method, target, headers, body, absolute)
        if body:
            data += body
        loop = asyncio.get_running_loop()
        for fresh in (False, True):
            conn = None if fresh else self._take(origin, loop.time())
            if conn is None:
                conn = await self._connect(origin, deadline, connect_timeout)
            timer = loop.call_at(deadline, conn.timed_out)
            try:
                response = await conn.start(data, capture)
            except DisconnectedError:
                # A kept-alive connection the receiver closed while idle: once, on a new one.
                if conn.reused and not conn.got_data and loop.time() < deadline:
                    continue
                raise
            except BaseException:
                conn.abort()  # cancelled or failed mid-exchange: its state is unknown
                raise
            finally:
                timer.cancel()
            self._give_back(conn, loop.time())
            if response.from_proxy:
                excerpt = response.body[:200].decode("utf-8", "replace")
                raise ProxyError(f"the proxy answered {response.status}: {excerpt}")
            return response
        raise AssertionError("unreachable: the second try returns or raises")

    # -- the pool --------------------------------------------------------------------------

    def _take(self, origin: Origin, now: float) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.expired(now):
                conn.reused = True
                return conn
            conn.abort()
        return None

    def _give_back(self, conn: _Connection, now: float) -> None:
        if not conn.reusable():
            conn.abort()
            return
        conn.idle_since = now
        idle = self._idle.setdefault(conn.origin, [])
        idle.append(conn)
        if len(idle) > self._max_idle:
            idle.pop(0).abort()
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(KEEPALIVE / 3, self._expire)

    def _expire(self) -> None:
        """Close connections idle for longer than KEEPALIVE; forget origins with none."""
        self._sweep = None
        now = asyncio.get_running_loop().time()
        for origin in list(self._idle):
            kept = []
            for conn in self._idle[origin]:
                if conn.expired(now):
                    conn.abort()
                else:
                    kept.append(conn)
            if kept:
                self._idle[origin] = kept
            else:
                del self._idle[origin]
        if self._idle:
            self._sweep = asyncio.get_running_loop().call_later(KEEPALIVE / 3, self._expire)

    async def _connect(
        self, origin: Origin, deadline: float, connect_timeout: float
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        limit = min(deadline, loop.time() + connect_timeout)
        tls = None
        if origin.scheme == "https":
            tls = self._tls_context(origin.route.tls, origin.verify_tls)
        try:
            async with asyncio.timeout_at(limit):
                try:
                    # Through a proxy too: a destination we would refuse never reaches it.
                    addresses = await self._resolver.resolve(origin.host, origin.port)
                except socket.gaierror as exc:
                    raise DNSError(f"cannot resolve {origin.host}: {exc}") from None
                proxy = origin.route.proxy
                if proxy is not None:
                    return await self._through(proxy, origin, tls)
                last: Exception | None = None
                for family, address in addresses:
                    try:
                        _, conn = await loop.create_connection(
                            lambda: _Connection(origin),
                            address,
                            origin.port,
                            family=family,
                            ssl=tls,
                            server_hostname=origin.host if tls is not None else None,
                        )
                        return conn
                    except ssl.SSLError as exc:
                        raise TLSError(f"{type(exc).__name__}: {exc}") from None
                    except OSError as exc:
                        last = exc
                raise ConnectError(
                    f"cannot connect to {origin.host}:{origin.port}: {last}"
                ) from None
        except TimeoutError:
            via = "" if origin.route.proxy is None else f" through {origin.route.proxy}"
            raise TimeoutError(
                f"no connection to {origin.host}:{origin.port}{via} in time"
            ) from None

    async def _through(
        self, proxy: Proxy, origin: Origin, tls: ssl.SSLContext | None
    ) -> _Connection:
        """A connection to the proxy: as is for http, a CONNECT tunnel with TLS for https."""
        loop = asyncio.get_running_loop()
        try:
            # The operator's proxy: its address is not subject to the SSRF guard.
            infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ProxyError(f"cannot resolve the proxy {proxy}: {exc}") from None
        last: Exception | None = None
        for family, _, _, _, sockaddr in infos:
            try:
                if tls is None:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(origin), str(sockaddr[0]), proxy.port, family=family
                    )
                    return conn
                transport, tunnel = await loop.create_connection(
                    _Tunnel, str(sockaddr[0]), proxy.port, family=family
                )
                break
            except OSError as exc:
                last = exc
        else:
            raise ProxyError(f"cannot connect to the proxy {proxy}: {last}") from None
        host = f"[{origin.host}]" if ":" in origin.host else origin.host
        try:
            answer = await tunnel.open(f"{host}:{origin.port}", proxy)
            head, _, extra = answer.partition(b"\r\n\r\n")
            status, reason = _connect_status(head)
            if not 200 <= status < 300:
                raise ProxyError(f"the proxy answered CONNECT with {status} {reason}")
            if extra:
                # The receiver cannot speak before our TLS hello: not a tunnel we can use.
                raise ProxyError("the proxy sent data after its answer to CONNECT")
            conn = _Connection(origin)
            try:
                secured = await loop.start_tls(transport, conn, tls, server_hostname=origin.host)
            except ssl.SSLError as exc:
                raise TLSError(f"{type(exc).__name__}: {exc}") from None
            except OSError as exc:
                raise ConnectError(f"the tunnel to {origin.host} closed: {exc}") from None
            if secured is None:
                raise ConnectError(f"the tunnel to {origin.host} closed during the handshake")
        except BaseException:
            transport.abort()
            raise
        # start_tls hands the protocol its transport without calling connection_made.
        conn.connection_made(secured)
        return conn

    async def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()
