"""The HTTP edge: one POST becomes an Outcome. Never raises for anything the receiver does."""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from yarl import URL

from . import http1
from .egress import DIRECT_EGRESS, Egress
from .netguard import BlockedAddressError, URLRejectedError, check_url
from .policy import ErrorKind, Outcome
from .profiles import EndpointSettings

Clock = Callable[[], float]
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@asynccontextmanager
async def http_client(
    allow_private: bool, *, allow_loopback: bool = False, ca_file: str = ""
) -> AsyncIterator[http1.Client]:
    """The one HTTP client of the daemon; its resolver refuses non-public addresses, and it
    trusts `ca_file` ([egress] ca_file) beside the system store."""
    client = http1.Client(allow_private, allow_loopback=allow_loopback, ca_file=ca_file)
    try:
        yield client
    finally:
        await client.close()


class Sender:
    """Posts bodies and follows redirects itself: each redirect target passes the same
    check as a subscription URL before it is requested (a literal IP is never asked of a
    resolver, so a redirect to http://169.254.169.254/ would otherwise bypass the SSRF
    guard).

    Every redirect (301, 302, 303, 307, 308) sends the same POST again, body and signature
    headers included: a webhook turned into a bodiless GET would be recorded delivered
    while the receiver never saw it. The chain of locations is kept on the Outcome.
    """

    def __init__(
        self,
        client: http1.Client,
        capture_bytes: int,
        clock: Clock,
        *,
        allow_http: bool,
        allow_private: bool,
        allow_loopback: bool = False,
        egress: Egress = DIRECT_EGRESS,
    ) -> None:
        self._client = client
        self._egress = egress
        self._capture = capture_bytes
        self._clock = clock
        self._allow_http = allow_http
        self._allow_private = allow_private
        self._allow_loopback = allow_loopback

    async def post(
        self,
        url: str,
        body: bytes,
        headers: dict[str, str],
        endpoint: EndpointSettings,
        *,
        egress: Egress | None = None,
    ) -> Outcome:
        """POST `body`; `headers` should carry Content-Type and User-Agent (else defaults).
        `egress` (a subscription's proxy and TLS) defaults to the daemon's."""
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
        retry_after = None
        redirects: list[str] = []
        try:
            status, excerpt, retry_after = await self._exchange(
                url, body, headers, endpoint, egress or self._egress, redirects
            )
        except Exception as exc:  # every failure of the exchange becomes an outcome
            status = None
            error, detail = classify(exc)
        duration = time.perf_counter() - t0
        return Outcome(
            started_at=started,
            finished_at=self._clock(),
            duration=duration,
            status=status,
            error=error,
            detail=_storable(detail[:500]),
            body_excerpt=excerpt,
            retry_after=parse_retry_after(retry_after, time.time()) if retry_after else None,
            redirects=tuple(redirects),
        )

    async def _exchange(
        self,
        url: str,
        body: bytes,
        headers: dict[str, str],
        endpoint: EndpointSettings,
        egress: Egress,
        redirects: list[str],
    ) -> tuple[int, str, str | None]:
        """The request and the redirects it is allowed to follow, within one total timeout:
        the final answer's status, the start of its body and its Retry-After header; each
        hop's location is appended to `redirects` (also when a later hop fails)."""
        target = self._client.target(url)
        deadline = asyncio.get_running_loop().time() + endpoint.timeout
        for hop in range(endpoint.max_redirects + 1):
            parts = target.url
            response = await self._client.request(
                "POST",
                target,
                headers,
                body,
                deadline=deadline,
                connect_timeout=endpoint.connect_timeout,
                verify_tls=endpoint.verify_tls,
                capture=self._capture,
                route=egress.route(parts.scheme, parts.raw_host or "", parts.port or 0),
            )
            location = response.location
            if not (endpoint.follow_redirects and response.status in _REDIRECTS and location):
                text = _storable(response.body.decode("utf-8", "replace"))
                return response.status, text, response.retry_after
            if hop == endpoint.max_redirects:
                raise http1.TooManyRedirectsError(
                    f"more than {endpoint.max_redirects} redirects (last to {location})"
                )
            next_url = str(target.url.join(URL(location)))
            redirects.append(f"{response.status} {next_url}")
            check_url(
                next_url,
                allow_http=self._allow_http,
                allow_private=self._allow_private,
                allow_loopback=self._allow_loopback,
            )
            target = self._client.target(next_url)
        raise AssertionError("unreachable: the loop returns or raises")


def parse_retry_after(value: str, now: float) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date (RFC 9110
    10.2.3), measured from `now` (unix time); None when it is neither. A date in the past
    means no wait."""
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # "-0000" or a date without a zone: taken as UTC
        moment = moment.replace(tzinfo=datetime.UTC)
    return max(moment.timestamp() - now, 0.0)


def _storable(text: str) -> str:
    """Postgres text cannot hold NUL: one in a receiver's answer would fail the whole
    batch of outcomes it is written with, again at every retry of the write."""
    return text.replace("\x00", "\ufffd")


def classify(exc: BaseException) -> tuple[ErrorKind, str]:
    """Map a failed exchange's exception to an ErrorKind and a short description."""
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TimeoutError):
        return ErrorKind.TIMEOUT, detail
    if isinstance(exc, URLRejectedError):  # a redirect to a destination we may not send to
        return ErrorKind.BLOCKED, f"redirect {exc}"
    if isinstance(exc, BlockedAddressError):
        return ErrorKind.BLOCKED, str(exc)
    if isinstance(exc, http1.ProxyError):
        return ErrorKind.PROXY, detail
    if isinstance(exc, http1.TLSError):
        return ErrorKind.TLS, detail
    if isinstance(exc, http1.DNSError):
        return ErrorKind.DNS, detail
    if isinstance(exc, http1.ConnectError):
        return ErrorKind.CONNECT, detail
    if isinstance(exc, http1.InvalidHeaderError):
        return ErrorKind.SETTINGS, detail
    if isinstance(exc, http1.TooManyRedirectsError):
        return ErrorKind.REDIRECTS, detail
    if isinstance(exc, ValueError):
        return ErrorKind.INVALID_URL, detail
    return ErrorKind.NETWORK, detail
