"""SSRF guard: destinations on loopback, private, link-local or metadata addresses are refused.

The check runs where the address is final: on the URL for literal IPs, and inside the
HTTP client's resolver for names, so the connection goes to the address that was checked
(no second lookup an attacker's DNS could answer differently).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

Address = tuple[socket.AddressFamily, str]
# loop.getaddrinfo's shape, for a resolver that must not ask the network (tests).
Lookup = Callable[..., Awaitable[list[tuple[Any, Any, Any, Any, tuple[Any, ...]]]]]


class BlockedAddressError(OSError):
    """Every address of a destination is one we may not send to."""


class URLRejectedError(ValueError):
    """A destination URL the configuration does not allow; the message says why."""


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_public(address: str) -> bool:
    ip = _ip(address)
    return ip.is_global and not ip.is_multicast


def is_allowed(address: str, *, allow_private: bool, allow_loopback: bool = False) -> bool:
    """Public addresses always; loopback (127.0.0.0/8, ::1) with allow_loopback; everything
    (private, link-local, metadata, ...) with allow_private."""
    if allow_private or is_public(address):
        return True
    return allow_loopback and _ip(address).is_loopback


def ipv4_literal(host: str) -> str | None:
    """The dotted form of a host that the C library reads as an IPv4 address: besides
    `127.0.0.1` also `127.1`, `0x7f000001`, `2130706433` or `0177.0.0.1` (inet_aton's
    shorthands, which getaddrinfo and so every HTTP client accept as addresses)."""
    if not host or not all(c.isalnum() or c == "." for c in host):
        return None
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


@functools.lru_cache(maxsize=4096)
def check_url(
    url: str, *, allow_http: bool, allow_private: bool, allow_loopback: bool = False
) -> None:
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
    host = parts.hostname
    try:
        literal = str(ipaddress.ip_address(host))
    except ValueError:
        numeric = ipv4_literal(host)
        if numeric is None:
            if host.lower() in ("localhost", "localhost.localdomain") and not (
                allow_private or allow_loopback
            ):
                raise URLRejectedError(
                    "points at this host ([security] allow_loopback or allow_private_networks)"
                ) from None
            return
        literal = numeric
    if not is_allowed(literal, allow_private=allow_private, allow_loopback=allow_loopback):
        switch = "allow_loopback or " if _ip(literal).is_loopback else ""
        raise URLRejectedError(
            f"points at a non-public address {literal} ([security] {switch}allow_private_networks)"
        )


class GuardedResolver:
    """Resolves names (results cached for a minute), then drops every non-public address.

    Literal addresses pass through unresolved: check_url has judged them already.
    """

    TTL = 60.0

    def __init__(
        self, allow_private: bool, lookup: Lookup | None = None, *, allow_loopback: bool = False
    ) -> None:
        self._allow_private = allow_private
        self._allow_loopback = allow_loopback
        self._lookup = lookup
        self._cache: dict[tuple[str, int], tuple[float, list[Address]]] = {}

    async def resolve(self, host: str, port: int) -> list[Address]:
        """(family, address) pairs to connect to, in the resolver's order; socket.gaierror when
        the name does not resolve, BlockedAddressError when it resolves only to addresses we
        may not send to."""
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
            return [(family, host)]
        loop = asyncio.get_running_loop()
        now = loop.time()
        cached = self._cache.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1]
        lookup = self._lookup or loop.getaddrinfo
        infos = await lookup(host, port, type=socket.SOCK_STREAM)
        addresses: list[Address] = []
        for family, _, _, _, sockaddr in infos:
            entry = (socket.AddressFamily(family), str(sockaddr[0]))
            if entry not in addresses:
                addresses.append(entry)
        if not self._allow_private:
            addresses = [
                a
                for a in addresses
                if is_allowed(a[1], allow_private=False, allow_loopback=self._allow_loopback)
            ]
            if not addresses:
                raise BlockedAddressError(f"{host} resolves only to non-public addresses")
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[(host, port)] = (now + self.TTL, addresses)
        return addresses
