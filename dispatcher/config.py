"""Settings: config.toml, each key overridable by DISPATCHER_<SECTION>_<KEY>."""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from .egress import EgressError, parse_proxy


class ConfigError(ValueError):
    """A config file or environment variable that cannot be used, named in the message."""


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    url: str = ""
    pool_min: int = 2
    pool_max: int = 8


@dataclass(frozen=True, slots=True)
class EmbeddedSettings:
    data_dir: str = ""


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: str = "127.0.0.1:8080"
    token: str = ""


@dataclass(frozen=True, slots=True)
class SecuritySettings:
    allow_private_networks: bool = False
    allow_loopback: bool = False
    allow_http: bool = False


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    max_in_flight: int = 512
    max_per_endpoint: int = 64
    claim_batch: int = 500
    # The most payload bytes claimed and not yet sent (or given up) at once; a payload
    # larger than it goes out alone.
    claim_bytes: int = 32 * 1024 * 1024
    # The largest payload a publish may carry, in SQL and over HTTP (sql/0012).
    max_payload_bytes: int = 1024 * 1024
    lease_seconds: float = 90.0
    poll_interval: float = 5.0
    flush_interval: float = 0.02
    flush_max: int = 500
    grace_period: float = 10.0
    timeout: float = 30.0
    connect_timeout: float = 5.0
    response_capture_bytes: int = 4096


@dataclass(frozen=True, slots=True)
class EgressSettings:
    # http://[user:pass@]host:port; "" = HTTPS_PROXY/HTTP_PROXY/NO_PROXY; "none" = direct.
    proxy: str = ""
    # A PEM bundle trusted in addition to the system store, for every delivery.
    ca_file: str = ""


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    days: int = 14


@dataclass(frozen=True, slots=True)
class LogSettings:
    format: str = "auto"
    level: str = "info"


@dataclass(frozen=True, slots=True)
class EmailSettings:
    smtp_host: str = ""
    smtp_port: int = 25
    sender: str = "dispatcher@localhost"
    starttls: bool = False
    tls: bool = False
    username: str = ""
    password: str = ""
    timeout: float = 10.0
    max_tries: int = 10
    poll_interval: float = 2.0


@dataclass(frozen=True, slots=True)
class Settings:
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    embedded: EmbeddedSettings = field(default_factory=EmbeddedSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    egress: EgressSettings = field(default_factory=EgressSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    log: LogSettings = field(default_factory=LogSettings)
    email: EmailSettings = field(default_factory=EmailSettings)


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (when given), then apply DISPATCHER_<SECTION>_<KEY> overrides."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    sections: dict[str, Any] = {}
    for section in dataclasses.fields(Settings):
        cls = section.default_factory
        values = raw.pop(section.name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"[{section.name}] must be a table")
        sections[section.name] = _section(section.name, cls, values, env)
    if raw:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(raw))}")
    settings = Settings(**sections)
    _validate(settings)
    return settings


def _section(name: str, cls: Any, values: dict[str, Any], env: Mapping[str, str]) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown key(s) in [{name}]: {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for key in known:
        var = f"DISPATCHER_{name}_{key}".upper()
        if var in env:
            kwargs[key] = _coerce(var, hints[key], env[var])
        elif key in values:
            kwargs[key] = _check_type(f"[{name}] {key}", hints[key], values[key])
    return cls(**kwargs)


def _coerce(where: str, kind: Any, text: str) -> Any:
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(text)
        if kind in (int, float):
            return kind(text)
    except ValueError:
        raise ConfigError(f"{where}: expected {kind.__name__}, got {text!r}") from None
    return text


def _check_type(where: str, kind: Any, value: Any) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (
        isinstance(kind, types.GenericAlias)
        or not isinstance(value, kind)
        or (kind is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def _validate(settings: Settings) -> None:
    d = settings.delivery
    positive = {
        "max_in_flight": d.max_in_flight,
        "max_per_endpoint": d.max_per_endpoint,
        "claim_batch": d.claim_batch,
        "claim_bytes": d.claim_bytes,
        "max_payload_bytes": d.max_payload_bytes,
        "lease_seconds": d.lease_seconds,
        "poll_interval": d.poll_interval,
        "flush_interval": d.flush_interval,
        "flush_max": d.flush_max,
        "timeout": d.timeout,
        "connect_timeout": d.connect_timeout,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"[delivery] {key} must be positive, got {value}")
    if d.grace_period < 0:
        raise ConfigError(f"[delivery] grace_period must not be negative, got {d.grace_period}")
    if d.max_payload_bytes > 1024 * 1024 * 1024:
        raise ConfigError(
            f"[delivery] max_payload_bytes must be at most 1 GiB (a jsonb value's limit), "
            f"got {d.max_payload_bytes}"
        )
    if d.response_capture_bytes < 0:
        raise ConfigError("[delivery] response_capture_bytes must not be negative")
    if d.lease_seconds <= d.timeout + 5:
        raise ConfigError(
            f"[delivery] lease_seconds ({d.lease_seconds}) must exceed timeout ({d.timeout}) "
            "by more than 5 s, or a slow request could be sent twice"
        )
    if settings.retention.days < 1:
        raise ConfigError(f"[retention] days must be at least 1, got {settings.retention.days}")
    if settings.log.format not in {"auto", "json", "console"}:
        raise ConfigError(
            f"[log] format must be auto, json or console, got {settings.log.format!r}"
        )
    parse_listen(settings.admin.listen)
    _validate_email(settings.email)
    _validate_egress(settings.egress)


def _validate_egress(e: EgressSettings) -> None:
    if e.proxy.strip() and e.proxy.strip().lower() != "none":
        try:
            parse_proxy(e.proxy)
        except EgressError as exc:
            raise ConfigError(f"[egress] proxy: {exc}") from None
    if e.ca_file and not Path(e.ca_file).is_file():
        raise ConfigError(f"[egress] ca_file: no such file {e.ca_file!r}")


def _validate_email(e: EmailSettings) -> None:
    if not 1 <= e.smtp_port <= 65535:
        raise ConfigError(f"[email] smtp_port must be 1 to 65535, got {e.smtp_port}")
    if e.starttls and e.tls:
        raise ConfigError("[email] starttls and tls exclude each other: tls is TLS from the start")
    if "@" not in e.sender or any(c in e.sender for c in "\r\n<>"):
        raise ConfigError(
            f"[email] sender must be an address like name@example.com, got {e.sender!r}"
        )
    if bool(e.username) != bool(e.password):
        raise ConfigError("[email] username and password go together: set both or neither")
    for key, value in {
        "timeout": e.timeout,
        "max_tries": e.max_tries,
        "poll_interval": e.poll_interval,
    }.items():
        if value <= 0:
            raise ConfigError(f"[email] {key} must be positive, got {value}")


def parse_listen(listen: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:8080")."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"[admin] listen must be host:port, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)
