"""The HTTP edge: one POST becomes an Outcome. Never raises for anything the receiver does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
from yarl import URL

from .netguard import BlockedAddressError, GuardedResolver, URLRejectedError, check_url
from .policy import ErrorKind, Outcome
from .profiles import EndpointSettings

Clock = Callable[[], float]
_NO_CEILING = 1e9
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@asynccontextmanager
async def client_session(
    max_connections: int, allow_private: bool
) -> AsyncIterator[aiohttp.ClientSession]:
    """The one ClientSession of the daemon; its resolver refuses non-public addresses."""
    connector = aiohttp.TCPConnector(
        limit=max_connections,
        limit_per_host=0,
        ttl_dns_cache=60,
        resolver=GuardedResolver(allow_private),
        enable_cleanup_closed=False,
    )
    async with aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        # No skip_auto_headers: aiohttp rebuilds a header set from it on every request
        # (about 5% of a delivery's CPU); Sender.post sets both headers itself instead.
        raise_for_status=False,
    ) as session:
        yield session


class Sender:
    """Posts bodies and follows redirects itself: each redirect target passes the same
    check as a subscription URL before it is requested (the connector never asks the
    resolver about a literal IP, so a redirect to http://169.254.169.254/ would otherwise
    bypass the SSRF guard)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        capture_bytes: int,
        clock: Clock,
        *,
        allow_http: bool,
        allow_private: bool,
    ) -> None:
        self._session = session
        self._capture = capture_bytes
        self._clock = clock
        self._allow_http = allow_http
        self._allow_private = allow_private
        # One ClientTimeout per distinct setting, not one per request.
        self._timeouts: dict[tuple[float, float], aiohttp.ClientTimeout] = {}

    def _timeout(self, endpoint: EndpointSettings) -> aiohttp.ClientTimeout:
        key = (endpoint.timeout, endpoint.connect_timeout)
        timeout = self._timeouts.get(key)
        if timeout is None:
            if len(self._timeouts) > 1000:
                self._timeouts.clear()
            # aiohttp rounds timeouts of 5 s and more up to the next whole second;
            # "an answer slower than 5 s fails" must mean 5 s.
            timeout = aiohttp.ClientTimeout(
                total=endpoint.timeout,
                connect=endpoint.connect_timeout,
                ceil_threshold=_NO_CEILING,
            )
            self._timeouts[key] = timeout
        return timeout

    async def post(
        self, url: str, body: bytes, headers: dict[str, str], endpoint: EndpointSettings
    ) -> Outcome:
        """POST `body`; `headers` should carry Content-Type and User-Agent (else defaults)."""
        if "Content-Type" not in headers or "User-Agent" not in headers:
            headers = {
                "Content-Type": "application/json",
                "User-Agent": endpoint.user_agent,
                **headers,
            }
        started = self._clock()
        t0 = time.perf_counter()
        status: int | None = None
        excerpt = ""
        error: ErrorKind | None = None
        detail = ""
        try:
            status, excerpt = await self._exchange(url, body, headers, endpoint, t0)
        except Exception as exc:  # every failure of the exchange becomes an outcome
            status = None
            error, detail = classify(exc)
        duration = time.perf_counter() - t0
        return Outcome(
            started_at=started,
            duration=duration,
            status=status,
            error=error,
            detail=_storable(detail[:500]),
            body_excerpt=excerpt,
        )

    async def _exchange(
        self,
        url: str,
        body: bytes,
        headers: dict[str, str],
        endpoint: EndpointSettings,
        t0: float,
    ) -> tuple[int, str]:
        """The request and the redirects it is allowed to follow, within one total timeout."""
        method, target = "POST", url
        data: bytes | None = body
        timeout = self._timeout(endpoint)
        for hop in range(endpoint.max_redirects + 1):
            async with self._session.request(
                method,
                target,
                data=data,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
                ssl=bool(endpoint.verify_tls),
            ) as response:
                location = response.headers.get("Location")
                if not (endpoint.follow_redirects and response.status in _REDIRECTS and location):
                    return response.status, await self._read_capped(response)
                if hop == endpoint.max_redirects:
                    raise aiohttp.TooManyRedirects(response.request_info, response.history)
                target = str(response.url.join(URL(location)))
                response.close()
            check_url(target, allow_http=self._allow_http, allow_private=self._allow_private)
            if response.status in (301, 302, 303):
                # As browsers and aiohttp do: the body is not sent again to the new place.
                method, data = "GET", None
            remaining = endpoint.timeout - (time.perf_counter() - t0)
            if remaining <= 0:
                raise TimeoutError("redirects took the whole timeout")
            timeout = aiohttp.ClientTimeout(
                total=remaining, connect=endpoint.connect_timeout, ceil_threshold=_NO_CEILING
            )
        raise AssertionError("unreachable: the loop returns or raises")

    async def _read_capped(self, response: aiohttp.ClientResponse) -> str:
        """At most `capture_bytes` of the body; the rest is never read (memory stays bounded)."""
        chunks: list[bytes] = []
        remaining = self._capture
        while remaining > 0:
            chunk = await response.content.read(remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        if not response.content.at_eof():
            # An unread remainder would make aiohttp drain it to reuse the connection.
            response.close()
        return _storable(b"".join(chunks).decode("utf-8", errors="replace"))


def _storable(text: str) -> str:
    """Postgres text cannot hold NUL: one in a receiver's answer would fail the whole
    batch of outcomes it is written with, again at every retry of the write."""
    return text.replace("\x00", "\ufffd")


def classify(exc: BaseException) -> tuple[ErrorKind, str]:
    """Map a client exception to an ErrorKind and a short description."""
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return ErrorKind.TIMEOUT, detail
    if isinstance(exc, URLRejectedError):  # a redirect to a destination we may not send to
        return ErrorKind.BLOCKED, f"redirect {exc}"
    if isinstance(exc, aiohttp.ClientSSLError):
        return ErrorKind.TLS, detail
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, BlockedAddressError):
            return ErrorKind.BLOCKED, str(exc.os_error)
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            return ErrorKind.DNS, detail
        return ErrorKind.CONNECT, detail
    if isinstance(exc, aiohttp.TooManyRedirects):
        return ErrorKind.REDIRECTS, detail
    if isinstance(exc, aiohttp.InvalidURL | ValueError):
        return ErrorKind.INVALID_URL, detail
    return ErrorKind.NETWORK, detail
