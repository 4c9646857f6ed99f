"""Profiles: named bundles of delivery settings; a subscription stores a name plus overrides.

A profile and a subscription's overrides share one JSON shape:

    {"success": "2xx", "retry": {"delays": [60, 120]} | {"initial": 30, "factor": 2.718,
     "growth_limit": 10}, plus optional "max_attempts", "max_age",
     "retry_on": {"client_errors": false, ...}, "timeout": 30, "connect_timeout": 5,
     "follow_redirects": true, "max_redirects": 20, "verify_tls": true,
     "user_agent": "...", "envelope": "standard", "signature": "standard",
     "max_in_flight": 16}

An override's "retry" block replaces the profile's whole (delays and exponential settings
do not mix); "retry_on" is merged key by key; every other key replaces the profile's.
Adding a product is adding a bundle here, not a branch in the send loop.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .envelope import ENVELOPES
from .policy import DeliveryPolicy, RetryOn, RetryPolicy, SuccessRule
from .signing import SIGNERS

DEFAULT_USER_AGENT = "webhook-dispatcher/0.1"


class EmailOn(StrEnum):
    """When the subscription's failure address is mailed."""

    EVERY_FAILURE = "every_failure"  # each failed attempt, and once more when it gives up
    FINAL = "final"  # when a delivery gives up
    NEVER = "never"


class SettingsError(ValueError):
    """A setting that cannot be used; `field` names it as a dotted path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class EndpointSettings:
    """Everything the send loop needs to know about one subscription's endpoint."""

    policy: DeliveryPolicy
    timeout: float
    connect_timeout: float
    follow_redirects: bool
    max_redirects: int
    verify_tls: bool
    user_agent: str
    envelope: str
    signature: str
    max_in_flight: int | None
    signature_header: str | None = None
    email_on: EmailOn = EmailOn.FINAL
    error_rate: ErrorRateLimit | None = None
    verify_on_create: bool = False


@dataclass(frozen=True, slots=True)
class ErrorRateLimit:
    """Deactivate a subscription whose share of failed attempts over `window` seconds stays at
    or above `threshold`, once it has at least `min_attempts` attempts there."""

    threshold: float
    min_attempts: int
    window: float


_DAY = 86_400.0

PROFILES: dict[str, dict[str, Any]] = {
    # Standard Webhooks: 2xx is success, exponential backoff over about three days.
    "standard": {
        "success": "2xx",
        "retry": {
            "initial": 5,
            "factor": 2,
            "growth_limit": 14,
            "max_attempts": 15,
            "max_age": 3 * _DAY,
        },
        "envelope": "standard",
        "signature": "standard",
    },
    # Tilby: exactly 200; at least 3 retries, 15 minutes apart.
    # Mails the failure address on every failed retry (with the request body) and once more
    # when the limit is reached; a new subscription must answer a SUBSCRIBED test with 200.
    "tilby": {
        "success": "exactly_200",
        "retry": {"delays": [900, 900, 900]},
        "envelope": "tilby",
        "signature": "tilby",
        "signature_header": "X-Tilby-Signature",
        "email_on": "every_failure",
        "verify_on_create": True,
    },
    # Tillhub: 2xx after up to 20 redirects; 30 s x e^n, growth stops after 10; kept 7 days;
    # TLS errors are not retried. The guide says both "4xx retried" and "no automatic
    # retries" for 4xx: we default to not retrying them (a client error rarely heals by
    # itself), and retry_on.client_errors turns it on per subscription.
    "tillhub": {
        "success": "2xx",
        "retry": {"initial": 30, "factor": math.e, "growth_limit": 10, "max_age": 7 * _DAY},
        "retry_on": {"client_errors": False, "tls": False},
        "follow_redirects": True,
        "max_redirects": 20,
        "user_agent": "Tillhub HTTP Connector/2.1.0",
        "envelope": "tillhub",
        "signature": "tillhub",
        # "A high error rate deactivates": 95 % of at least 50 attempts over a day.
        "deactivate_on_error_rate": {"threshold": 0.95, "min_attempts": 50, "window": _DAY},
    },
    # Tilia: anything below 400 is success; 400 and up is retried, with the retry policy
    # chosen per destination (a preset name or explicit settings).
    "tilia": {
        "success": "below_400",
        "retry": "exponential",
        "envelope": "tilia",
        "signature": "none",
        "email_on": "final",
    },
    # The store: exactly 200 within 5 s; 6 attempts, then 60..300 s after the previous one.
    # Eight 4xx statuses deactivate the webhook; "please unsubscribe me" in a body deletes it.
    "store": {
        "success": "exactly_200",
        "retry": {"delays": [60, 120, 180, 240, 300], "max_attempts": 6},
        "timeout": 5,
        "envelope": "store",
        "signature": "none",
        "deactivate_on": [400, 401, 403, 404, 405, 406, 410, 411],
        "delete_on_body": "please unsubscribe me",
    },
}

# Named retry policies a subscription may pick with "retry": "<name>".
RETRY_PRESETS: dict[str, dict[str, Any]] = {
    "exponential": {"initial": 60, "factor": 2, "growth_limit": 8, "max_attempts": 10},
    "linear": {"delays": [300], "max_attempts": 12},
    "aggressive": {"initial": 5, "factor": 2, "growth_limit": 6, "max_attempts": 8},
    "none": {"max_attempts": 1},
}

_RETRY_KEYS = {"delays", "initial", "factor", "growth_limit", "max_attempts", "max_age"}
_RETRY_ON_KEYS = {f for f in RetryOn.__dataclass_fields__}
SETTING_KEYS = {
    "signature_header",
    "email_on",
    "deactivate_on",
    "delete_on_body",
    "deactivate_on_error_rate",
    "verify_on_create",
    "success",
    "retry",
    "retry_on",
    "timeout",
    "connect_timeout",
    "follow_redirects",
    "max_redirects",
    "verify_tls",
    "user_agent",
    "envelope",
    "signature",
    "max_in_flight",
}


def resolve(
    profile: str,
    overrides: Mapping[str, Any],
    *,
    timeout: float = 30.0,
    connect_timeout: float = 5.0,
) -> EndpointSettings:
    """Merge a profile with overrides; `timeout`/`connect_timeout` are the config defaults."""
    if profile not in PROFILES:
        raise SettingsError("profile", f"unknown profile {profile!r}; one of {sorted(PROFILES)}")
    if not isinstance(overrides, Mapping):
        raise SettingsError("settings", "must be an object")
    unknown = set(overrides) - SETTING_KEYS
    if unknown:
        raise SettingsError(sorted(unknown)[0], "unknown setting")
    merged: dict[str, Any] = {**PROFILES[profile], **overrides}
    merged["retry_on"] = {
        **_mapping(PROFILES[profile].get("retry_on", {}), "retry_on"),
        **_mapping(overrides.get("retry_on", {}), "retry_on"),
    }
    return EndpointSettings(
        policy=DeliveryPolicy(
            success=_success(merged.get("success", "2xx")),
            retry=_retry(_retry_block(merged.get("retry", {}))),
            retry_on=_retry_on(merged["retry_on"]),
            deactivate_on=_statuses(merged.get("deactivate_on", [])),
            delete_on_body=_optional_text(merged, "delete_on_body"),
        ),
        timeout=_number(merged, "timeout", timeout, minimum=0.001, maximum=300),
        connect_timeout=_number(
            merged, "connect_timeout", connect_timeout, minimum=0.001, maximum=300
        ),
        follow_redirects=_bool(merged, "follow_redirects", False),
        max_redirects=int(
            _number(merged, "max_redirects", 20, minimum=0, maximum=50, integer=True)
        ),
        verify_tls=_bool(merged, "verify_tls", True),
        user_agent=_text(merged, "user_agent", DEFAULT_USER_AGENT),
        envelope=_choice(merged, "envelope", "standard", ENVELOPES),
        signature=_choice(merged, "signature", "standard", SIGNERS),
        max_in_flight=(
            None
            if merged.get("max_in_flight") is None
            else int(_number(merged, "max_in_flight", 1, minimum=1, maximum=10_000, integer=True))
        ),
        signature_header=_header_name(merged),
        email_on=_email_on(merged.get("email_on", "final")),
        error_rate=_error_rate(merged.get("deactivate_on_error_rate")),
        verify_on_create=_bool(merged, "verify_on_create", False),
    )


def _retry_block(value: Any) -> Mapping[str, Any]:
    if isinstance(value, str):
        if value not in RETRY_PRESETS:
            raise SettingsError("retry", f"unknown preset; one of {sorted(RETRY_PRESETS)}")
        return RETRY_PRESETS[value]
    return _mapping(value, "retry")


def _statuses(value: Any) -> frozenset[int]:
    if (
        not isinstance(value, list)
        or len(value) > 100
        or not all(
            isinstance(v, int) and not isinstance(v, bool) and 100 <= v <= 599 for v in value
        )
    ):
        raise SettingsError("deactivate_on", "must be a list of HTTP status codes")
    return frozenset(value)


def _optional_text(block: Mapping[str, Any], key: str) -> str | None:
    if block.get(key) is None:
        return None
    return _text(block, key, "").lower()


def _header_name(block: Mapping[str, Any]) -> str | None:
    value = block.get("signature_header")
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9-]{1,100}", value):
        raise SettingsError("signature_header", "must be an HTTP header name")
    return value


def _email_on(value: Any) -> EmailOn:
    try:
        return EmailOn(value)
    except ValueError:
        raise SettingsError("email_on", f"must be one of {[e.value for e in EmailOn]}") from None


def _error_rate(value: Any) -> ErrorRateLimit | None:
    if value is None:
        return None
    block = _mapping(value, "deactivate_on_error_rate")
    unknown = set(block) - {"threshold", "min_attempts", "window"}
    if unknown:
        raise SettingsError(f"deactivate_on_error_rate.{sorted(unknown)[0]}", "unknown setting")
    where = "deactivate_on_error_rate."
    return ErrorRateLimit(
        threshold=_number(block, "threshold", 0.95, minimum=0.01, maximum=1, where=where),
        min_attempts=int(
            _number(
                block, "min_attempts", 50, minimum=1, maximum=1_000_000, integer=True, where=where
            )
        ),
        window=_number(block, "window", _DAY, minimum=60, maximum=30 * _DAY, where=where),
    )


def _success(value: Any) -> SuccessRule:
    try:
        return SuccessRule(value)
    except ValueError:
        raise SettingsError("success", f"must be one of {[r.value for r in SuccessRule]}") from None


def _retry(block: Mapping[str, Any]) -> RetryPolicy:
    unknown = set(block) - _RETRY_KEYS
    if unknown:
        raise SettingsError(f"retry.{sorted(unknown)[0]}", "unknown setting")
    delays = block.get("delays", [])
    if not isinstance(delays, list) or not all(
        isinstance(d, int | float) and not isinstance(d, bool) and 0 <= d <= 30 * _DAY
        for d in delays
    ):
        raise SettingsError("retry.delays", "must be a list of seconds between 0 and 30 days")
    if len(delays) > 100:
        raise SettingsError("retry.delays", "at most 100 delays")
    max_attempts = block.get("max_attempts")
    max_age = block.get("max_age")
    return RetryPolicy(
        delays=tuple(float(d) for d in delays),
        initial=_number(block, "initial", 30.0, minimum=0, maximum=30 * _DAY, where="retry."),
        factor=_number(block, "factor", math.e, minimum=1, maximum=100, where="retry."),
        growth_limit=int(
            _number(block, "growth_limit", 10, minimum=1, maximum=100, integer=True, where="retry.")
        ),
        max_attempts=None
        if max_attempts is None
        else int(
            _number(block, "max_attempts", 1, minimum=1, maximum=1000, integer=True, where="retry.")
        ),
        max_age=None
        if max_age is None
        else _number(block, "max_age", 0, minimum=0, maximum=90 * _DAY, where="retry."),
    )


def _retry_on(block: Mapping[str, Any]) -> RetryOn:
    unknown = set(block) - _RETRY_ON_KEYS
    if unknown:
        raise SettingsError(f"retry_on.{sorted(unknown)[0]}", "unknown setting")
    return RetryOn(**{k: _bool(block, k, True, where="retry_on.") for k in _RETRY_ON_KEYS})


def _mapping(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SettingsError(name, "must be an object")
    return value


def _number(
    block: Mapping[str, Any],
    key: str,
    default: float,
    *,
    minimum: float,
    maximum: float,
    integer: bool = False,
    where: str = "",
) -> float:
    value = block.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not float(value).is_integer())
    ):
        kind = "an integer" if integer else "a number"
        raise SettingsError(where + key, f"must be {kind}")
    if not minimum <= value <= maximum:
        raise SettingsError(where + key, f"must be between {minimum} and {maximum}")
    return float(value)


def _bool(block: Mapping[str, Any], key: str, default: bool, where: str = "") -> bool:
    value = block.get(key, default)
    if not isinstance(value, bool):
        raise SettingsError(where + key, "must be true or false")
    return value


def _choice(block: Mapping[str, Any], key: str, default: str, known: Iterable[str]) -> str:
    value = block.get(key, default)
    if value not in known:
        raise SettingsError(key, f"must be one of {sorted(known)}")
    return str(value)


def _text(block: Mapping[str, Any], key: str, default: str) -> str:
    value = block.get(key, default)
    if not isinstance(value, str) or not value or len(value) > 200:
        raise SettingsError(key, "must be a non-empty string of at most 200 characters")
    return value
