"""Where deliveries leave from: the proxy a request goes through and the TLS it uses.

Pure values, resolved once. `Route` is what one request needs (a proxy or none, a TLS
config); the HTTP client pools connections and caches SSL contexts by it. `Egress` picks the
Route for a URL: the daemon's default comes from `[egress]` and the standard proxy
environment variables; a subscription's own settings make another Egress with
`Egress.override` (the per-subscription phase only calls that, never the transport).
"""

from __future__ import annotations

import base64
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit


class EgressError(ValueError):
    """A proxy URL or TLS material that cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP forward proxy: CONNECT for https targets, absolute-form for http ones."""

    host: str  # name or literal address (IPv6 without brackets)
    port: int
    # The whole `Proxy-Authorization` value ("Basic ..."), or None without credentials.
    authorization: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """TLS material beyond the daemon's trust store, as PEM text (hashable: the client
    caches one SSLContext per TLSConfig and verify flag)."""

    ca: str | None = field(default=None, repr=False)  # extra trusted CA(s)
    client_cert: str | None = field(default=None, repr=False)  # chain, leaf first
    client_key: str | None = field(default=None, repr=False)


NO_TLS = TLSConfig()


@dataclass(frozen=True, slots=True)
class Route:
    """How one request leaves: through `proxy` (or directly) with `tls`."""

    proxy: Proxy | None = None
    tls: TLSConfig = NO_TLS


DIRECT = Route()


@dataclass(frozen=True, slots=True)
class NoProxy:
    """NO_PROXY entries: `*`, a domain (`example.com`, `.example.com`: it and its
    subdomains), an address or a CIDR block, each optionally with `:port`."""

    everything: bool = False
    domains: tuple[tuple[str, int | None], ...] = ()
    networks: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None], ...] = ()

    @classmethod
    def parse(cls, text: str) -> NoProxy:
        domains: list[tuple[str, int | None]] = []
        networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]] = []
        for raw in text.replace(" ", ",").split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "*":
                return cls(everything=True)
            port: int | None = None
            host = entry
            if entry.startswith("["):  # [::1]:8080
                host, _, rest = entry[1:].partition("]")
                if rest.startswith(":") and rest[1:].isdigit():
                    port = int(rest[1:])
            elif entry.count(":") == 1:
                name, _, number = entry.partition(":")
                if number.isdigit():
                    host, port = name, int(number)
            try:
                networks.append((ipaddress.ip_network(host, strict=False), port))
            except ValueError:
                domains.append((host.lstrip(".").rstrip("."), port))
        return cls(domains=tuple(domains), networks=tuple(networks))

    def bypasses(self, host: str, port: int) -> bool:
        if self.everything:
            return True
        host = host.lower().rstrip(".")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return any(
                (host == domain or host.endswith("." + domain)) and wanted in (None, port)
                for domain, wanted in self.domains
            )
        return any(address in net and wanted in (None, port) for net, wanted in self.networks)


@dataclass(frozen=True, slots=True)
class Egress:
    """Picks the Route of each URL: a proxy per scheme, NO_PROXY exceptions, one TLS config.

    With no NO_PROXY entries (a configured proxy, a subscription's, or none at all) the
    choice is made here once, so the send path only reads a field.
    """

    http_proxy: Proxy | None = None
    https_proxy: Proxy | None = None
    no_proxy: NoProxy = field(default_factory=NoProxy)
    tls: TLSConfig = NO_TLS
    _http: Route = field(init=False, repr=False, compare=False)
    _https: Route = field(init=False, repr=False, compare=False)
    _direct: Route = field(init=False, repr=False, compare=False)
    _simple: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Routes are shared, not rebuilt per request: pool keys hash the same object.
        object.__setattr__(self, "_http", Route(self.http_proxy, self.tls))
        object.__setattr__(self, "_https", Route(self.https_proxy, self.tls))
        object.__setattr__(self, "_direct", Route(None, self.tls))
        no_rules = not (self.no_proxy.everything or self.no_proxy.domains or self.no_proxy.networks)
        object.__setattr__(self, "_simple", no_rules)

    def route(self, scheme: str, host: str, port: int) -> Route:
        route = self._https if scheme == "https" else self._http
        if self._simple or route.proxy is None:
            return route
        return self._direct if self.no_proxy.bypasses(host, port) else route

    def override(
        self, proxy: str | None = None, tls: Mapping[str, str | None] | None = None
    ) -> Egress:
        """This Egress with a subscription's settings: `proxy` "none" (direct), a proxy URL
        (every request through it, NO_PROXY not applied) or None (keep this one's); `tls`
        {"ca", "client_cert", "client_key"} PEM texts (None: keep this one's; the
        daemon-wide `[egress] ca_file` stays trusted either way). EgressError when unusable."""
        result = self
        if proxy is not None:
            chosen = None if proxy.strip().lower() == "none" else parse_proxy(proxy)
            result = Egress(chosen, chosen, NoProxy(), self.tls)
        if tls is not None:
            unknown = set(tls) - {"ca", "client_cert", "client_key"}
            if unknown:
                raise EgressError(f"unknown TLS setting(s): {', '.join(sorted(unknown))}")
            config = TLSConfig(tls.get("ca"), tls.get("client_cert"), tls.get("client_key"))
            validate_tls(config)
            result = Egress(result.http_proxy, result.https_proxy, result.no_proxy, config)
        return result


DIRECT_EGRESS = Egress()


def parse_proxy(url: str) -> Proxy:
    """`http://[user:pass@]host:port` (port defaults to 80); EgressError otherwise."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise EgressError(f"proxy {url!r} is not a valid URL: {exc}") from None
    if parts.scheme != "http":
        # TLS to the proxy itself (https://) would be a second TLS layer; not supported.
        raise EgressError(f"proxy {url!r} must be an http:// URL (http://[user:pass@]host:port)")
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise EgressError(f"proxy {url!r} must be http://[user:pass@]host:port, nothing more")
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode()
    return Proxy(parts.hostname, port or 80, authorization)


def _env(environ: Mapping[str, str], name: str) -> str:
    # Lower case first, as curl and Python's urllib read them.
    return (environ.get(name.lower()) or environ.get(name.upper()) or "").strip()


def from_config(proxy: str, ca_file: str, environ: Mapping[str, str] | None = None) -> Egress:
    """The daemon's default Egress: `[egress] proxy` when set ("none": direct, whatever the
    environment says), else HTTPS_PROXY / HTTP_PROXY / NO_PROXY (lower case forms first).
    `ca_file` is not part of it: the client trusts it for every route."""
    env = os.environ if environ is None else environ
    setting = proxy.strip()
    if setting.lower() == "none":
        return DIRECT_EGRESS
    if setting:
        chosen = parse_proxy(setting)
        return Egress(chosen, chosen)
    http = _env(env, "http_proxy")
    https = _env(env, "https_proxy")
    try:
        return Egress(
            parse_proxy(http) if http else None,
            parse_proxy(https) if https else None,
            NoProxy.parse(_env(env, "no_proxy")),
        )
    except EgressError as exc:
        raise EgressError(f"from the environment: {exc}") from None


# -- TLS material ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """What validate_client_cert found: the leaf's subject and when it expires."""

    subject: str
    not_after: datetime


def describe_client_cert(cert_pem: str) -> ClientCertificate | None:
    """The subject and expiry of a stored client certificate (what the API shows instead of
    the PEM and its key); None when it does not parse."""
    from cryptography import x509

    try:
        leaf = x509.load_pem_x509_certificates(cert_pem.encode())[0]
    except ValueError:
        return None
    return ClientCertificate(leaf.subject.rfc4514_string(), leaf.not_valid_after_utc)


def validate_client_cert(
    cert_pem: str, key_pem: str, *, now: datetime | None = None
) -> ClientCertificate:
    """Check a client certificate and key before they are stored: both parse, the key is the
    certificate's, and the certificate is valid now. EgressError says what is wrong."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        chain = x509.load_pem_x509_certificates(cert_pem.encode())
    except ValueError:
        raise EgressError("client_cert is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError):
        # TypeError: an encrypted key; the daemon has nobody to ask for its password.
        raise EgressError("client_key is not an unencrypted PEM private key") from None
    leaf = chain[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, public) != leaf.public_key().public_bytes(der, public):
        raise EgressError("client_key does not belong to client_cert")
    moment = now or datetime.now(UTC)
    if moment < leaf.not_valid_before_utc:
        raise EgressError(f"client_cert is not valid before {leaf.not_valid_before_utc}")
    if moment >= leaf.not_valid_after_utc:
        raise EgressError(f"client_cert expired at {leaf.not_valid_after_utc}")
    return ClientCertificate(leaf.subject.rfc4514_string(), leaf.not_valid_after_utc)


def validate_tls(config: TLSConfig) -> None:
    """EgressError unless `config` can build an SSLContext (CA parses; cert and key come
    together and match). The CA is parsed into a bare context: a default one loads the
    system store first (about 30 ms of CPU, on the event loop of every subscription write
    and every new subscription version the worker builds)."""
    if config.ca is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=config.ca)
        except (ssl.SSLError, ValueError, TypeError) as exc:  # TypeError: not ASCII
            raise EgressError(f"ca is not a PEM certificate bundle: {exc}") from None
    if (config.client_cert is None) != (config.client_key is None):
        raise EgressError("client_cert and client_key go together: set both or neither")
    if config.client_cert is not None and config.client_key is not None:
        validate_client_cert(config.client_cert, config.client_key)


def ssl_context(config: TLSConfig, *, verify: bool, ca_file: str | None = None) -> ssl.SSLContext:
    """An SSLContext for `config`: the system store, plus `ca_file` and the config's CA;
    the client certificate loaded when there is one. Built once per config by the client."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    if config.ca:
        context.load_verify_locations(cadata=config.ca)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    if config.client_cert and config.client_key:
        _load_chain(context, config.client_cert, config.client_key)
    return context


def _load_chain(context: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """load_cert_chain reads only files (Python's ssl has no in-memory form for a chain and
    key), so the PEM goes to a file only this user can read (mkstemp: 0600, in a fresh 0700
    directory), removed as soon as OpenSSL has read it."""
    with tempfile.TemporaryDirectory(prefix="dispatcher-tls-") as folder:
        fd, path = tempfile.mkstemp(dir=folder, suffix=".pem")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(cert_pem.strip() + "\n" + key_pem.strip() + "\n")
            context.load_cert_chain(path)
        finally:
            os.unlink(path)
