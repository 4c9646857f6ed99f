"""SSRF guard: destinations on loopback, private, link-local or metadata addresses are refused.

The check runs where the address is final: on the URL for literal IPs, and inside the
HTTP client's resolver for names, so the connection goes to the address that was checked
(no second lookup an attacker's DNS could answer differently).
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver


class BlockedAddressError(OSError):
    """Every address of a destination is one we may not send to."""


class URLRejectedError(ValueError):
    """A destination URL the configuration does not allow; the message says why."""


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


@functools.lru_cache(maxsize=4096)
def check_url(url: str, *, allow_http: bool, allow_private: bool) -> None:
    """Refuse what can be refused without a DNS lookup: scheme, form, literal addresses.

    Cached: the send path checks every request, and a URL's verdict never changes. (Only
    accepted URLs are cached; a refusal raises.)
    """
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise URLRejectedError(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise URLRejectedError("must be an http(s) URL")
    if parts.scheme == "http" and not allow_http:
        raise URLRejectedError("must use https (plain http is off: [security] allow_http)")
    if not parts.hostname:
        raise URLRejectedError("has no host")
    if parts.username or parts.password:
        raise URLRejectedError("must not carry credentials; use the subscription's auth")
    try:
        literal = ipaddress.ip_address(parts.hostname)
    except ValueError:
        if parts.hostname.lower() in ("localhost", "localhost.localdomain") and not allow_private:
            raise URLRejectedError(
                "points at this host ([security] allow_private_networks)"
            ) from None
        return
    if not allow_private and not is_public(str(literal)):
        raise URLRejectedError(
            f"points at a non-public address {literal} ([security] allow_private_networks)"
        )


class GuardedResolver(AbstractResolver):
    """Resolves with the default resolver, then drops every non-public address."""

    def __init__(self, allow_private: bool) -> None:
        self._inner = DefaultResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self._allow_private:
            return results
        allowed = [r for r in results if is_public(r["host"])]
        if not allowed:
            raise BlockedAddressError(f"{host} resolves only to non-public addresses")
        return allowed

    async def close(self) -> None:
        await self._inner.close()
