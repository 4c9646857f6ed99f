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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .envelope import ENVELOPES
from .policy import DeliveryPolicy, RetryOn, RetryPolicy, SuccessRule
from .signing import SIGNERS

DEFAULT_USER_AGENT = "webhook-dispatcher/0.1"


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
    "tilby": {
        "success": "exactly_200",
        "retry": {"delays": [900, 900, 900]},
        "envelope": "tilby",
        "signature": "tilby",
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
    },
    # Tilia: anything below 400 is success; 400 and up is retried.
    "tilia": {
        "success": "below_400",
        "retry": {"initial": 60, "factor": 2, "growth_limit": 8, "max_attempts": 10},
        "envelope": "tilia",
        "signature": "none",
    },
    # The store: exactly 200 within 5 s; 6 attempts, then 60..300 s after the previous one.
    "store": {
        "success": "exactly_200",
        "retry": {"delays": [60, 120, 180, 240, 300], "max_attempts": 6},
        "timeout": 5,
        "envelope": "store",
        "signature": "none",
    },
}

_RETRY_KEYS = {"delays", "initial", "factor", "growth_limit", "max_attempts", "max_age"}
_RETRY_ON_KEYS = {f for f in RetryOn.__dataclass_fields__}
SETTING_KEYS = {
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
            retry=_retry(_mapping(merged.get("retry", {}), "retry")),
            retry_on=_retry_on(merged["retry_on"]),
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
