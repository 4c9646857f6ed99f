"""Every admin API shape, declared once: the handlers decode with these, /openapi.json shows them.

Why msgspec rather than pydantic v2: one small C extension, strict by default (no "5" for
5, no 1 for true) without a strict-mode switch on every model, `UNSET` tells a PATCH's
missing field from an explicit null, and `msgspec.json.schema_components` writes OpenAPI
3.1 components straight from the structs. Its one weakness, an error location that comes
only inside the message ("... - at `$.retry.delays[0]`"), is parsed once, in `decode()`.

Request bodies are parsed by orjson first (a malformed body stays a 400 `bad_json`) and then
converted with `decode()`, which raises `Invalid` naming the field. What a type cannot say
(events or entity + event_type, the URL's SSRF check, the token's environment) stays as
code after decoding; the schema carries the matching rule from `RULES`, or says it in a
`description` where JSON Schema cannot.

Every pattern ends in `(?!\\n)$`: Python's `$`, which msgspec and the schemathesis
generator use, also matches before a final newline, ECMA's does not; the look-ahead makes
both refuse "name\\n".
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, get_args
from uuid import UUID

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from .envelope import ENVELOPES
from .policy import SuccessRule
from .signing import SIGNERS

T = TypeVar("T")
_DAY = 86_400


def _line(body: str) -> str:
    return f"^{body}(?!\n)$"


EVENT_NAME_RE = _line(r"[a-z0-9_-]+\.[a-z0-9_-]+\.v[0-9]+")
EVENT_PATTERN_RE = _line(r"(\*|[a-z0-9_-]+\.\*|[a-z0-9_-]+\.[a-z0-9_-]+\.(\*|v[0-9]+))")
HEADER_NAME_RE = _line("[A-Za-z0-9-]{1,100}")
# What check_url accepts, less what depends on the configuration: http(s), a host, a port
# urlsplit can read, no credentials. The host is an RFC 3986 reg-name in ASCII (an
# internationalised name goes in its xn-- form) or a bracketed IPv6 literal as RFC 3986
# writes it (urlsplit refuses any other bracketed text, e.g. "[b.0]").
_H16 = "[0-9A-Fa-f]{1,4}"
_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_LS32 = rf"({_H16}:{_H16}|{_OCTET}(\.{_OCTET}){{3}})"
IPV6_RE = "|".join(
    [
        rf"({_H16}:){{6}}{_LS32}",
        rf"::({_H16}:){{5}}{_LS32}",
        rf"({_H16})?::({_H16}:){{4}}{_LS32}",
        rf"(({_H16}:){{0,1}}{_H16})?::({_H16}:){{3}}{_LS32}",
        rf"(({_H16}:){{0,2}}{_H16})?::({_H16}:){{2}}{_LS32}",
        rf"(({_H16}:){{0,3}}{_H16})?::{_H16}:{_LS32}",
        rf"(({_H16}:){{0,4}}{_H16})?::{_LS32}",
        rf"(({_H16}:){{0,5}}{_H16})?::{_H16}",
        rf"(({_H16}:){{0,6}}{_H16})?::",
    ]
)
URL_RE = (
    rf"[Hh][Tt][Tt][Pp][Ss]?://([A-Za-z0-9._~!$&'()*+,;=-]+|\[({IPV6_RE})\])"
    r"(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}))?"
    r"([/?#].*)?"
)
# A dot-atom address (RFC 5322) at a host name: what every mail server takes, and what
# JSON Schema's `format: email` accepts. Local part at most 64 characters, domain 253.
_ATEXT = "[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
EMAIL_RE = _line(rf"(?![^@]{{65}}){_ATEXT}+(\.{_ATEXT}+)*@(?![^@]{{254}}){_LABEL}(\.{_LABEL})+")

EventName = Annotated[str, Meta(pattern=EVENT_NAME_RE, max_length=200)]
# What a publisher may name: the entity `dispatcher` is the dispatcher's own (operational
# events). The handlers say so in words before decoding; the schema says it as a pattern.
RESERVED_ENTITY = "dispatcher"
PublishedEventName = Annotated[
    str,
    Meta(
        pattern=_line(r"(?!dispatcher\.)[a-z0-9_-]+\.[a-z0-9_-]+\.v[0-9]+"),
        max_length=200,
        description="{entity}.{action}.v{version}; the entity `dispatcher` is reserved.",
    ),
]
EventPattern = Annotated[str, Meta(pattern=EVENT_PATTERN_RE, max_length=200)]
LowerName = Annotated[str, Meta(pattern=_line("[a-z0-9_-]{1,100}"))]
HeaderName = Annotated[str, Meta(pattern=HEADER_NAME_RE)]
Environment = Annotated[str, Meta(min_length=1, max_length=200)]
Text200 = Annotated[str, Meta(min_length=1, max_length=200)]
Email = Annotated[
    str,
    Meta(
        max_length=320,
        pattern=EMAIL_RE,
        extra_json_schema={"format": "email"},
        description="local@domain.tld, ASCII (an internationalised domain in its xn-- form)",
    ),
]
Secret = Annotated[
    str,
    Meta(min_length=16, max_length=200, description="Signing secret; generated when not given."),
]
Seconds = Annotated[float, Meta(ge=0, le=30 * _DAY)]
Timeout = Annotated[float, Meta(ge=0.001, le=300)]
Moment = Annotated[datetime, Meta(tz=True)]
Credential = Annotated[str, Meta(min_length=1, max_length=1000, pattern=_line("[^\n]*"))]
# What goes into a request header as is: RFC 9110's field-content in ASCII (visible
# characters, spaces or tabs only between them), which every receiver's parser takes.
FIELD_VALUE_RE = _line(r"[!-~]([ \t!-~]*[!-~])?")
HeaderValue = Annotated[str, Meta(min_length=1, max_length=1000, pattern=FIELD_VALUE_RE)]
UserAgent = Annotated[str, Meta(min_length=1, max_length=200, pattern=FIELD_VALUE_RE)]

# Page cursors: what a list gives out as next_cursor, and all a list takes back (any value
# of the form is a valid position, so a client may keep one across restarts). Deliveries
# page by id, newest first: the last id shown. Subscriptions by (created_at, id): the
# last one's created_at in microseconds since 1970, "-", its id as 32 hex digits.
DeliveryCursor = Annotated[
    str, Meta(pattern=_line("[0-9]{1,18}"), description="next_cursor of the previous page")
]
SubscriptionCursor = Annotated[
    str,
    Meta(pattern=_line("[0-9]{1,16}-[0-9a-f]{32}"), description="next_cursor of the previous page"),
]

# The names a setting may pick, taken from the registries that implement them.
if TYPE_CHECKING:
    EnvelopeName = str
    SignerName = str
else:
    EnvelopeName = Literal[tuple(sorted(ENVELOPES))]
    SignerName = Literal[tuple(sorted(SIGNERS))]

DeliveryStatus = Literal[
    "pending", "sending", "retrying", "waiting", "paused", "delivered", "failed", "expired"
]
FinishedStatus = Literal["delivered", "failed", "expired"]
STATUSES: tuple[str, ...] = get_args(DeliveryStatus)
FINISHED: tuple[str, ...] = get_args(FinishedStatus)


class EmailOn(StrEnum):
    """When the subscription's failure address is mailed."""

    EVERY_FAILURE = "every_failure"  # each failed attempt, and once more when it gives up
    FINAL = "final"  # when a delivery gives up
    NEVER = "never"


class Ordering(StrEnum):
    """Which deliveries of a subscription go out one after another, in publish order."""

    NONE = "none"  # any order, concurrently
    ENTITY = "entity"  # per entity_instance_id (events without one: unordered)
    SUBSCRIPTION = "subscription"  # the whole subscription, one at a time


class Closed(Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """A request object: an unknown key is an error, not something silently dropped."""


class Retry(Closed):
    """Explicit delays (the last repeats) or exponential: initial * factor^n, growth stopping
    after growth_limit retries. An override's block replaces the profile's whole."""

    delays: Annotated[list[Seconds], Meta(max_length=100)] | UnsetType = UNSET
    initial: Seconds | UnsetType = UNSET
    factor: Annotated[float, Meta(ge=1, le=100)] | UnsetType = UNSET
    growth_limit: Annotated[int, Meta(ge=1, le=100)] | UnsetType = UNSET
    max_attempts: Annotated[int, Meta(ge=1, le=1000)] | UnsetType = UNSET
    max_age: Annotated[float, Meta(ge=0, le=90 * _DAY)] | UnsetType = UNSET
    # Each delay spread by up to +-jitter of itself; default 0.2 for an exponential
    # schedule, 0 for explicit delays.
    jitter: Annotated[float, Meta(ge=0, le=1)] | UnsetType = UNSET


class RetryOn(Closed):
    """Which failures are retried; merged key by key with the profile's."""

    server_errors: bool | UnsetType = UNSET
    client_errors: bool | UnsetType = UNSET
    other_statuses: bool | UnsetType = UNSET
    timeouts: bool | UnsetType = UNSET
    network: bool | UnsetType = UNSET
    tls: bool | UnsetType = UNSET


class ErrorRate(Closed):
    """Deactivate when the share of failed attempts over `window` seconds stays at or above
    `threshold`, once there are `min_attempts` attempts in it."""

    threshold: Annotated[float, Meta(ge=0.01, le=1)] | UnsetType = UNSET
    min_attempts: Annotated[int, Meta(ge=1, le=1_000_000)] | UnsetType = UNSET
    window: Annotated[float, Meta(ge=60, le=30 * _DAY)] | UnsetType = UNSET


# Named retry policies a subscription may pick with "retry": "<name>".
RETRY_PRESETS: dict[str, Retry] = {
    "exponential": Retry(initial=60, factor=2, growth_limit=8, max_attempts=10),
    "linear": Retry(delays=[300], max_attempts=12),
    "aggressive": Retry(initial=5, factor=2, growth_limit=6, max_attempts=8),
    "none": Retry(max_attempts=1),
}
if TYPE_CHECKING:
    RetryPreset = str
else:
    RetryPreset = Literal[tuple(sorted(RETRY_PRESETS))]


_PORT = "([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
# What egress.parse_proxy accepts: "none", or http://[user:pass@]host[:port][/].
PROXY_RE = _line(rf"(none|http://([A-Za-z0-9._~%!$&'()*+,;=:-]+@)?[A-Za-z0-9.-]+(:{_PORT})?/?)")
Pem = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=65_536,
        description="PEM text; checked when stored (it parses; a key matches its certificate, "
        "which is valid now)",
    ),
]


class TLSSettings(Closed):
    """A receiver's own CA (trusted beside the system store and [egress] ca_file) and a
    client certificate with its key for receivers that demand one (mTLS). The key is never
    shown again: answers show the certificate's subject and expiry instead."""

    ca: Pem | UnsetType = UNSET
    client_cert: Pem | UnsetType = UNSET
    client_key: Pem | UnsetType = UNSET


class Settings(Closed):
    """A profile's settings, and a subscription's overrides of them: one shape for both."""

    success: SuccessRule | UnsetType = UNSET
    retry: Retry | RetryPreset | UnsetType = UNSET
    retry_on: RetryOn | UnsetType = UNSET
    timeout: Timeout | UnsetType = UNSET
    connect_timeout: Timeout | UnsetType = UNSET
    follow_redirects: bool | UnsetType = UNSET
    max_redirects: Annotated[int, Meta(ge=0, le=50)] | UnsetType = UNSET
    verify_tls: bool | UnsetType = UNSET
    user_agent: UserAgent | UnsetType = UNSET
    envelope: EnvelopeName | UnsetType = UNSET
    signature: SignerName | UnsetType = UNSET
    signature_header: HeaderName | UnsetType | None = UNSET
    max_in_flight: Annotated[int, Meta(ge=1, le=10000)] | UnsetType | None = UNSET
    email_on: EmailOn | UnsetType = UNSET
    deactivate_on: (
        Annotated[list[Annotated[int, Meta(ge=100, le=599)]], Meta(max_length=100)] | UnsetType
    ) = UNSET
    delete_on_body: Text200 | UnsetType | None = UNSET
    # "none" (direct, whatever [egress] says) or an http://[user:pass@]host:port proxy.
    proxy: Annotated[str, Meta(max_length=2048, pattern=PROXY_RE)] | UnsetType = UNSET
    tls: TLSSettings | UnsetType = UNSET
    # Answers whose Retry-After sets the earliest next attempt (default 429 and 503).
    retry_after_on: (
        Annotated[list[Annotated[int, Meta(ge=100, le=599)]], Meta(max_length=100)] | UnsetType
    ) = UNSET
    deactivate_on_error_rate: ErrorRate | UnsetType | None = UNSET
    verify_on_create: bool | UnsetType = UNSET
    # Consecutive failed attempts after which dispatcher.delivery_failing.v1 is published
    # (once per streak); null publishes none.
    failing_threshold: (
        Annotated[
            int,
            Meta(
                ge=1,
                le=1_000_000,
                description="Consecutive failed attempts that publish "
                "dispatcher.delivery_failing.v1 (default 5; null: never).",
            ),
        ]
        | UnsetType
        | None
    ) = UNSET
    # Strict publish order per key; a key waits behind its head (see README, "Ordered
    # delivery").
    ordering: Ordering | UnsetType = UNSET


SETTING_KEYS = frozenset(Settings.__struct_fields__)


class AuthNone(Closed, tag="none", tag_field="type"):
    """No credentials."""


class AuthBasic(Closed, tag="basic", tag_field="type"):
    username: Credential
    password: Credential


class AuthBearer(Closed, tag="bearer", tag_field="type"):
    token: HeaderValue


class AuthHeader(Closed, tag="header", tag_field="type"):
    name: HeaderName
    value: HeaderValue


Auth = AuthNone | AuthBasic | AuthBearer | AuthHeader


Url = Annotated[
    str,
    Meta(
        max_length=2048,
        pattern=_line(URL_RE),
        description="http(s) only; the host an ASCII name (an internationalised one in its "
        "xn-- form), an IPv4 address or a bracketed IPv6 one. Plain http and private, "
        "loopback or link-local destinations (numeric shorthands such as 127.1 included) "
        "only where the configuration allows them ([security]). With "
        "verify_on_create (the tilby profile's default) a create POSTs a SUBSCRIBED test to "
        "it and answers 422 unless it gets 200.",
    ),
]


class EntityEvent(Closed, kw_only=True):
    """Tilby style, as an item of `events`: `{"entity": "sales", "event_type": "closed"}`
    means `sales.closed.*` (every version)."""

    entity: LowerName
    event_type: LowerName

    def pattern(self) -> str:
        return f"{self.entity}.{self.event_type}.*"


EventsItem = Annotated[
    EventPattern | EntityEvent,
    Meta(description="An event name or pattern, or an {entity, event_type} object."),
]


class SubscriptionUpdate(Settings):
    """The fields of a subscription a PATCH may change; settings also at the top level."""

    url: Url | UnsetType = UNSET
    events: Annotated[list[EventsItem], Meta(min_length=1, max_length=100)] | UnsetType = UNSET
    entity: (
        Annotated[LowerName, Meta(description="Tilby style: with event_type instead of events.")]
        | UnsetType
    ) = UNSET
    event_type: LowerName | UnsetType = UNSET
    profile: Annotated[str, Meta(description="A profile name; see the enum.")] | UnsetType = UNSET
    name: Annotated[str, Meta(max_length=200)] | UnsetType | None = UNSET
    description: Annotated[str, Meta(max_length=2000)] | UnsetType | None = UNSET
    active: bool | UnsetType = UNSET
    secret: Secret | UnsetType = UNSET
    auth: Auth | UnsetType | None = UNSET
    email: Email | UnsetType | None = UNSET
    settings: Settings | UnsetType = UNSET


class SubscriptionCreate(SubscriptionUpdate, kw_only=True):
    """A new subscription: `url` and either `events` or `entity` + `event_type`."""

    url: Url
    environment_id: (
        Annotated[
            Environment, Meta(description="Required with the admin token; else the token's own.")
        ]
        | UnsetType
    ) = UNSET


class RotateSecret(Closed):
    """A new signing secret (generated when not given); the old one signs for grace_seconds."""

    secret: Secret | UnsetType = UNSET
    grace_seconds: Annotated[int, Meta(ge=0, le=30 * _DAY)] = _DAY


class EventCreate(Closed, kw_only=True):
    environment_id: Environment | UnsetType = UNSET
    event_name: PublishedEventName
    payload: Annotated[Any, Meta(description="Any JSON value: the event's data.")]  # see integral
    entity_instance_id: Text200 | UnsetType = UNSET
    idempotency_key: Text200 | UnsetType = UNSET


class ImportCreate(Closed, kw_only=True):
    environment_id: Environment | UnsetType = UNSET
    event_name: PublishedEventName
    entities: Annotated[list[Any], Meta(min_length=1, max_length=100_000)]


class ResendRequest(Closed):
    """Resend the finished deliveries matching every filter given (status: failed by default)."""

    environment_id: Environment | UnsetType = UNSET
    subscription_id: UUID | UnsetType = UNSET
    status: FinishedStatus | Annotated[list[FinishedStatus], Meta(min_length=1)] = "failed"
    since: Moment | UnsetType = UNSET
    event_name: Annotated[str, Meta(max_length=200)] | UnsetType = UNSET
    ids: (
        Annotated[
            list[Annotated[int, Meta(ge=1, le=2**63 - 1)]], Meta(min_length=1, max_length=1000)
        ]
        | UnsetType
    ) = UNSET


class SendTest(Closed, kw_only=True):
    """A test delivery: the event (by default one the subscription wants) and its payload
    (by default a realistic example of the event's entity)."""

    event_name: EventName | UnsetType = UNSET
    payload: Annotated[Any, Meta(description="Any JSON value.")] | UnsetType = UNSET
    entity_instance_id: Text200 | UnsetType = UNSET


# Rules across fields, added to the generated components by name (JSON Schema for what
# the handlers check after decoding).
_ONE_WAY_TO_SUBSCRIBE: dict[str, Any] = {
    "dependentRequired": {"entity": ["event_type"], "event_type": ["entity"]},
    "not": {"required": ["events", "entity"]},
}
RULES: dict[str, dict[str, Any]] = {
    "SubscriptionCreate": {
        **_ONE_WAY_TO_SUBSCRIBE,
        "anyOf": [{"required": ["events"]}, {"required": ["entity"]}],
    },
    "SubscriptionUpdate": _ONE_WAY_TO_SUBSCRIBE,
}


# Answers. Handlers build them as dicts from rows; these describe them.


class ErrorDetail(Struct):
    code: str
    message: str
    field: str | UnsetType = UNSET


class Error(Struct):
    error: ErrorDetail


class AuthShown(Struct):
    """The receiver's auth without its secrets."""

    type: str
    username: str | UnsetType = UNSET
    name: str | UnsetType = UNSET


class Subscription(Struct, kw_only=True):
    id: UUID
    environment_id: str
    url: str
    events: list[str]
    profile: str
    settings: dict[str, Any]
    name: str | UnsetType | None = UNSET
    description: str | UnsetType | None = UNSET
    active: bool
    deactivated_reason: str | UnsetType | None = UNSET
    auth: AuthShown
    email: str | UnsetType | None = UNSET
    created_at: datetime
    updated_at: datetime
    secret: Annotated[str, Meta(description="Only in the answer to a create.")] | UnsetType = UNSET
    public_key: (
        Annotated[
            str,
            Meta(
                pattern=_line("whpk_[A-Za-z0-9+/]{43}="),
                description="Standard Webhooks v1a (signature standard_v1a): the Ed25519 "
                "public key that verifies the signatures; the private key is never shown.",
            ),
        ]
        | UnsetType
    ) = UNSET


class RotatedSubscription(Subscription, kw_only=True):
    """After a rotation: the new secret, or for standard_v1a the new public key (and the
    previous one, which signs too until previous_secret_expires_at)."""

    secret: str | UnsetType = UNSET
    previous_public_key: str | UnsetType = UNSET
    previous_secret_expires_at: datetime


class SubscriptionPage(Struct):
    items: list[Subscription]
    next_cursor: SubscriptionCursor | None


class DeliveryCounts(Struct):
    delivered: int | UnsetType = UNSET
    failed: int | UnsetType = UNSET
    expired: int | UnsetType = UNSET
    pending: int | UnsetType = UNSET


# Bucket sizes a stats series may use (seconds): each divides a day, so buckets start on
# the minute, hour or day in UTC and two series of one size line up.
STATS_BUCKETS: tuple[int, ...] = (60, 300, 900, 1800, 3600, 10800, 21600, 43200, 86400)
MAX_STATS_BUCKETS = 500


class StatsBucket(Struct, kw_only=True):
    """One bucket of a stats series: the attempts started in [start, start + bucket) by
    outcome (delivered, retried: rescheduled, failed: gave up or expired) and their
    response times. Test deliveries are left out."""

    start: datetime
    delivered: int
    retried: int
    failed: int
    p50_response_ms: float | None
    p95_response_ms: float | None


class Stats(Struct, kw_only=True):
    subscription_id: UUID
    window_seconds: int
    bucket_seconds: (
        Annotated[int, Meta(description="Only with the bucket parameter.")] | UnsetType
    ) = UNSET
    series: (
        Annotated[
            list[StatsBucket],
            Meta(description="Only with the bucket parameter: oldest first, every bucket."),
        ]
        | UnsetType
    ) = UNSET
    attempts: int
    succeeded_attempts: int | UnsetType = UNSET
    success_rate: float | None
    error_rate: float | None
    mean_response_ms: float | None
    p95_response_ms: float | None
    retries_per_delivery: float | None
    deliveries: DeliveryCounts


class Event(Struct, kw_only=True):
    id: UUID
    environment_id: str
    event_name: str
    entity_instance_id: str | UnsetType | None = UNSET
    created_at: datetime
    deliveries: int
    duplicate: bool


class Import(Struct):
    events: int
    entities: int


class Delivery(Struct, kw_only=True):
    id: int
    subscription_id: UUID
    environment_id: str
    event_id: UUID
    event_name: str
    entity_instance_id: str | None
    status: DeliveryStatus
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None
    finished_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    test: Annotated[
        bool, Meta(description="Sent by POST /v1/subscriptions/{id}/test; not in stats.")
    ] = False
    waiting_behind: Annotated[
        int | None,
        Meta(
            description="A waiting delivery's (ordering): its key's head, the delivery it "
            "goes out after."
        ),
    ] = None


class RequestHeader(Struct):
    """A request header as the subscription's settings send it; secrets masked."""

    name: str
    value: str
    masked: bool


class Attempt(Struct):
    attempt: int
    started_at: datetime
    duration_ms: float
    status_code: int | None
    error: str | None
    response_excerpt: str | None
    outcome: Literal["delivered", "retry", "failed", "expired"]
    # The answer's Retry-After (seconds) when it set the next attempt.
    retry_after: float | None = None


class DeliveryDetail(Delivery, kw_only=True):
    payload: Any
    attempt_history: list[Attempt]
    request_headers: Annotated[
        list[RequestHeader],
        Meta(
            description="The headers every attempt sends, rebuilt from the subscription's "
            "current settings (not stored per attempt); signature and credential values "
            "masked, Content-Length and Host left out. Empty once the subscription is gone."
        ),
    ]


class Queue(Struct, kw_only=True):
    """The live queue of the token's environment (the admin token: all) at `measured_at`."""

    environment_id: str | None
    measured_at: datetime
    depth: Annotated[int, Meta(description="Live deliveries, paused ones included.")]
    waiting_for_slot: Annotated[
        int, Meta(description="Due now, not yet taken: waiting for a sending slot.")
    ]
    oldest_due_age_seconds: Annotated[
        float, Meta(description="How long the longest-waiting of those has been due.")
    ]
    sending: int
    scheduled: Annotated[int, Meta(description="Waiting for a later retry time.")]
    paused: Annotated[int, Meta(description="Held until their subscription is reactivated.")]
    endpoint_paused: Annotated[
        int, Meta(description="Of a subscription a receiver's Retry-After paused for now.")
    ]


class DeliveryPage(Struct):
    items: list[Delivery]
    next_cursor: DeliveryCursor | None


class ResendJob(Struct, kw_only=True):
    id: UUID
    environment_id: str | UnsetType | None = UNSET
    filter: dict[str, Any]
    status: Literal["running", "done", "failed"]
    matched: int
    resent: int
    error: str | UnsetType | None = UNSET
    created_at: datetime
    finished_at: datetime | UnsetType | None = UNSET


# Operational events: the payloads of the events the dispatcher publishes itself (entity
# `dispatcher`, see operational.py), documented here like the API's shapes.


class OperationalEndpointDisabled(Struct, kw_only=True):
    """dispatcher.endpoint_disabled.v1: a subscription stopped receiving (deactivated, or
    deleted because the receiver's answer asked for it)."""

    subscription_id: UUID
    url: str
    reason: Annotated[
        str,
        Meta(
            description="e.g. 'receiver answered 410', 'error rate 97% over 50 attempts in "
            "86400 s', 'deactivated by API', 'deleted: the receiver asked to unsubscribe'"
        ),
    ]


class OperationalEndpointEnabled(Struct, kw_only=True):
    """dispatcher.endpoint_enabled.v1: a deactivated subscription was reactivated."""

    subscription_id: UUID
    url: str


class OperationalDeliveryExhausted(Struct, kw_only=True):
    """dispatcher.delivery_exhausted.v1: a delivery gave up (out of attempts, not retryable,
    or older than its retry policy's max_age)."""

    delivery_id: int
    subscription_id: UUID
    url: str
    event_name: str
    outcome: Literal["failed", "expired"]
    attempts: int
    last_status: int | None
    last_error: str | None


class OperationalDeliveryFailing(Struct, kw_only=True):
    """dispatcher.delivery_failing.v1: a subscription's consecutive failed attempts reached
    its failing_threshold (once per streak)."""

    subscription_id: UUID
    url: str
    consecutive_failures: int
    threshold: int


class OperationalDeliveryRecovered(Struct, kw_only=True):
    """dispatcher.delivery_recovered.v1: an attempt succeeded after delivery_failing."""

    subscription_id: UUID
    url: str


OPERATIONAL_EVENTS: dict[str, type[Struct]] = {
    "dispatcher.endpoint_disabled.v1": OperationalEndpointDisabled,
    "dispatcher.endpoint_enabled.v1": OperationalEndpointEnabled,
    "dispatcher.delivery_exhausted.v1": OperationalDeliveryExhausted,
    "dispatcher.delivery_failing.v1": OperationalDeliveryFailing,
    "dispatcher.delivery_recovered.v1": OperationalDeliveryRecovered,
}


COMPONENTS: tuple[type[Struct], ...] = (
    Error,
    Subscription,
    SubscriptionCreate,
    SubscriptionUpdate,
    SubscriptionPage,
    Stats,
    EventCreate,
    Event,
    ImportCreate,
    Import,
    RotateSecret,
    RotatedSubscription,
    Delivery,
    DeliveryDetail,
    DeliveryPage,
    ResendRequest,
    ResendJob,
    *OPERATIONAL_EVENTS.values(),
    SendTest,
    Queue,
)


class Invalid(ValueError):
    """A value that does not fit its model; `field` names it as a dotted path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# msgspec's messages: "<what> - at `$.a.b[0]`", and for unknown or missing keys
# "Object contains unknown field `k`" / "Object missing required field `k`" (the key is
# not part of the location).
_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_KEY = re.compile(r"^Object (?:contains unknown|missing required) field `(?P<key>[^`]*)`")


def decode(data: object, model: type[T], where: str = "") -> T:
    """`data` (parsed JSON) as `model`, or `Invalid` naming the field, e.g. `retry.delays`.

    The field leaves out list indexes, as the API always has ("events", not "events.3");
    the message keeps the exact place.
    """
    try:
        return msgspec.convert(integral(data), model)
    except msgspec.ValidationError as exc:
        raise problem(exc, where) from None


def integral(value: object) -> object:
    """JSON's 3.0 is the integer 3 (as JSON Schema says); msgspec would call it a float.

    Values typed Any (a payload) come out changed too: handlers take those from the body.
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral(v) for v in value]
    return value


def problem(exc: msgspec.ValidationError, where: str = "") -> Invalid:
    """msgspec's error as an `Invalid`; `where` prefixes the field (e.g. "settings.")."""
    match = _AT.match(str(exc))
    assert match is not None  # the pattern matches any string
    what, path = match["what"], match["path"] or ""
    key = _KEY.match(what)
    if key:
        path += "." + key["key"]
    parts = [p for p in re.split(r"\.|\[(\d+)\]", path) if p]
    if not parts:
        return Invalid(where.rstrip(".") or "body", what)
    field = where + ".".join(p for p in parts if not p.isdigit())
    exact = where + ".".join(parts)
    return Invalid(field, what if exact == field else f"{what} (at {exact})")
