"""Profiles: named bundles of delivery settings; a subscription stores a name plus overrides.

A profile and a subscription's overrides share one shape, `models.Settings`, which the API
also documents. An override's "retry" block (or preset name) replaces the profile's whole
(delays and exponential settings do not mix); "retry_on" is merged key by key; every other
key replaces the profile's. Adding a product is adding a bundle here, not a branch in the
send loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from msgspec import UNSET

from .models import (
    RETRY_PRESETS,
    EmailOn,
    Invalid,
    Ordering,
    Retry,
    Settings,
    TLSSettings,
    decode,
)
from .models import RetryOn as RetryOnSettings
from .policy import DeliveryPolicy, RetryOn, RetryPolicy, SuccessRule

__all__ = ["DEFAULT_USER_AGENT", "PROFILES", "EmailOn", "EndpointSettings", "resolve"]

# A setting that cannot be used; `field` names it as a dotted path.
SettingsError = Invalid

DEFAULT_USER_AGENT = "webhook-dispatcher/0.1"


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
    # The subscription's own egress: "none" or a proxy URL, and TLS PEM texts by name
    # ("ca", "client_cert", "client_key"); None: the daemon's [egress].
    proxy: str | None = None
    tls: Mapping[str, str] | None = None
    # Consecutive failed attempts that publish dispatcher.delivery_failing.v1; None: never.
    failing_threshold: int | None = 5
    # Sent in publish order per key (the fan-out and the recorder do it: sql/0010).
    ordering: Ordering = Ordering.NONE


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
        # The spec: a 410 Gone means the endpoint is gone for good.
        "deactivate_on": [410],
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

# Checked once, at import: a bundle is a Settings value like any override.
_BUNDLES: dict[str, Settings] = {name: decode(raw, Settings) for name, raw in PROFILES.items()}


def resolve(
    profile: str,
    overrides: Mapping[str, Any],
    *,
    timeout: float = 30.0,
    connect_timeout: float = 5.0,
) -> EndpointSettings:
    """Merge a profile with overrides; `timeout`/`connect_timeout` are the config defaults."""
    if profile not in _BUNDLES:
        raise SettingsError("profile", f"unknown profile {profile!r}; one of {sorted(PROFILES)}")
    if not isinstance(overrides, Mapping):
        raise SettingsError("settings", "must be an object")
    base, given = _BUNDLES[profile], decode(dict(overrides), Settings)

    def pick(name: str, default: Any) -> Any:
        value = getattr(given, name)
        if value is UNSET:
            value = getattr(base, name)
        return default if value is UNSET else value

    retry_on = {
        k: v
        for block in (base.retry_on, given.retry_on)
        if isinstance(block, RetryOnSettings)
        for k in block.__struct_fields__
        if (v := getattr(block, k)) is not UNSET
    }
    retry = pick("retry", Retry())
    limit = pick("deactivate_on_error_rate", None)
    delete_on_body = pick("delete_on_body", None)
    return EndpointSettings(
        policy=DeliveryPolicy(
            success=pick("success", SuccessRule.ANY_2XX),
            retry=_retry(RETRY_PRESETS[retry] if isinstance(retry, str) else retry),
            retry_on=RetryOn(**retry_on),
            deactivate_on=frozenset(pick("deactivate_on", [])),
            retry_after_on=frozenset(pick("retry_after_on", [429, 503])),
            delete_on_body=None if delete_on_body is None else delete_on_body.lower(),
        ),
        timeout=float(pick("timeout", timeout)),
        connect_timeout=float(pick("connect_timeout", connect_timeout)),
        follow_redirects=pick("follow_redirects", False),
        max_redirects=pick("max_redirects", 20),
        verify_tls=pick("verify_tls", True),
        user_agent=pick("user_agent", DEFAULT_USER_AGENT),
        envelope=pick("envelope", "standard"),
        signature=pick("signature", "standard"),
        max_in_flight=pick("max_in_flight", None),
        signature_header=pick("signature_header", None),
        email_on=pick("email_on", EmailOn.FINAL),
        error_rate=None
        if limit is None
        else ErrorRateLimit(
            threshold=_or(limit.threshold, 0.95),
            min_attempts=_or(limit.min_attempts, 50),
            window=_or(limit.window, _DAY),
        ),
        verify_on_create=pick("verify_on_create", False),
        proxy=pick("proxy", None),
        tls=_tls(pick("tls", None)),
        failing_threshold=pick("failing_threshold", 5),
        ordering=pick("ordering", Ordering.NONE),
    )


def _tls(block: TLSSettings | None) -> dict[str, str] | None:
    if block is None:
        return None
    return {k: v for k in block.__struct_fields__ if isinstance(v := getattr(block, k), str)}


def _or(value: Any, default: Any) -> Any:
    return default if value is UNSET else value


def _retry(block: Retry) -> RetryPolicy:
    return RetryPolicy(
        delays=tuple(float(d) for d in _or(block.delays, [])),
        initial=float(_or(block.initial, 30.0)),
        factor=float(_or(block.factor, math.e)),
        growth_limit=_or(block.growth_limit, 10),
        max_attempts=_or(block.max_attempts, None),
        max_age=None if block.max_age is UNSET else float(block.max_age),
        jitter=None if block.jitter is UNSET else float(block.jitter),
    )
