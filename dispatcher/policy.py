"""The decision core: from (policy, attempt, outcome) to delivered / retry at T / give up. Pure."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum


class SuccessRule(StrEnum):
    EXACTLY_200 = "exactly_200"
    ANY_2XX = "2xx"
    BELOW_400 = "below_400"

    def accepts(self, status: int) -> bool:
        if self is SuccessRule.EXACTLY_200:
            return status == 200
        if self is SuccessRule.ANY_2XX:
            return 200 <= status < 300
        return 100 <= status < 400


class ErrorKind(StrEnum):
    """Why an attempt got no HTTP status."""

    TIMEOUT = "timeout"
    CONNECT = "connect"
    DNS = "dns"
    TLS = "tls"
    NETWORK = "network"
    # The egress proxy failed (unreachable, 407, refused CONNECT, its own 5xx page): not the
    # receiver's answer, so no status-based rule applies; retried like a network error.
    PROXY = "proxy"
    REDIRECTS = "too_many_redirects"
    BLOCKED = "blocked_address"
    INVALID_URL = "invalid_url"
    SETTINGS = "invalid_settings"


class Action(StrEnum):
    """What an answer does to the subscription itself (the store's rules)."""

    DEACTIVATE = "deactivate"
    DELETE = "delete"


class Verdict(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    FAILED = "failed"
    EXPIRED = "expired"


@dataclass(slots=True)  # not frozen: one per delivery (see attempt.py)
class Outcome:
    """What one HTTP attempt produced: a status, or an error kind. `started_at` and
    `finished_at` are read on the daemon's clock (unix seconds; a test's clock may run faster),
    `duration` is the real seconds it took."""

    started_at: float
    finished_at: float
    duration: float
    status: int | None = None
    error: ErrorKind | None = None
    detail: str = ""
    body_excerpt: str = ""
    # The answer's Retry-After, in seconds from `finished_at` (send.parse_retry_after).
    retry_after: float | None = None
    # Redirects followed, in order: "302 https://new.example/hook" (status, then where to).
    redirects: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When the next attempt is due.

    With `delays`, retry n (0-based) waits delays[n], the last delay repeating; otherwise
    it waits initial * factor**min(n, growth_limit - 1). `max_attempts` counts the first
    attempt too; `max_age` is measured from the event's creation.
    """

    delays: tuple[float, ...] = ()
    initial: float = 30.0
    factor: float = math.e
    growth_limit: int = 10
    max_attempts: int | None = None
    max_age: float | None = None
    # Each delay is spread by up to +-jitter of itself, so that the deliveries that failed
    # together (an endpoint's outage) do not all come back at once. None: 0.2 for an
    # exponential schedule, 0 for explicit delays (which stay exact unless asked).
    jitter: float | None = None

    def delay(self, retry: int, spread: float = 0.5) -> float:
        """The wait before retry `retry` (0-based); `spread` in [0, 1) picks where in the
        jitter band it falls (0.5: the middle, no jitter)."""
        if self.delays:
            base = self.delays[min(retry, len(self.delays) - 1)]
        else:
            base = self.initial * self.factor ** min(retry, max(self.growth_limit - 1, 0))
        jitter = self.jitter if self.jitter is not None else (0.0 if self.delays else 0.2)
        return base * (1.0 + jitter * (2.0 * spread - 1.0))

    def attempts_limit(self) -> int | None:
        if self.max_attempts is not None:
            return self.max_attempts
        if self.delays:
            return len(self.delays) + 1
        return None


@dataclass(frozen=True, slots=True)
class RetryOn:
    """Which failures are worth another attempt."""

    server_errors: bool = True
    client_errors: bool = True
    other_statuses: bool = True
    timeouts: bool = True
    network: bool = True
    tls: bool = True

    def retries(self, outcome: Outcome) -> bool:
        if outcome.status is not None:
            if 500 <= outcome.status < 600:
                return self.server_errors
            if 400 <= outcome.status < 500:
                return self.client_errors
            return self.other_statuses
        if outcome.error is ErrorKind.TIMEOUT:
            return self.timeouts
        if outcome.error is ErrorKind.TLS:
            return self.tls
        if outcome.error in (ErrorKind.BLOCKED, ErrorKind.INVALID_URL, ErrorKind.SETTINGS):
            return False
        return self.network  # CONNECT, DNS, NETWORK, PROXY, REDIRECTS


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    success: SuccessRule = SuccessRule.ANY_2XX
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    retry_on: RetryOn = field(default_factory=RetryOn)
    # Statuses that deactivate the subscription, and a phrase in the body that deletes it.
    deactivate_on: frozenset[int] = frozenset()
    delete_on_body: str | None = None
    # Answers whose Retry-After sets the earliest next attempt (never before it, at most
    # RETRY_AFTER_MAX later than the answer).
    retry_after_on: frozenset[int] = frozenset({429, 503})


# The longest Retry-After honoured; a longer one waits this long.
RETRY_AFTER_MAX = 3600.0


@dataclass(slots=True)  # not frozen: one per delivery (see attempt.py)
class Decision:
    verdict: Verdict
    next_at: float | None = None
    action: Action | None = None
    # The receiver's Retry-After (seconds) that set next_at; and, for a 429 that carried
    # one, until when the whole endpoint waits (every delivery, not just this one).
    retry_after: float | None = None
    pause_until: float | None = None


def decide(
    policy: DeliveryPolicy,
    attempt: int,
    outcome: Outcome,
    created_at: float,
    spread: float = 0.5,
) -> Decision:
    """Decide after attempt number `attempt` (1-based) of an event created at `created_at`;
    `spread` (uniform in [0, 1), 0.5 for none) places the retry in its jitter band."""
    delivered = outcome.status is not None and policy.success.accepts(outcome.status)
    if policy.delete_on_body and policy.delete_on_body in outcome.body_excerpt.lower():
        return Decision(Verdict.DELIVERED if delivered else Verdict.FAILED, action=Action.DELETE)
    if delivered:
        return Decision(Verdict.DELIVERED)
    if outcome.status in policy.deactivate_on:
        return Decision(Verdict.FAILED, action=Action.DEACTIVATE)
    honoured = None
    if outcome.retry_after is not None and outcome.status in policy.retry_after_on:
        honoured = min(max(outcome.retry_after, 0.0), RETRY_AFTER_MAX)
    pause = outcome.finished_at + honoured if honoured and outcome.status == 429 else None
    if not policy.retry_on.retries(outcome):
        return Decision(Verdict.FAILED, pause_until=pause)
    limit = policy.retry.attempts_limit()
    if limit is not None and attempt >= limit:
        return Decision(Verdict.FAILED, pause_until=pause)
    delay = policy.retry.delay(attempt - 1, spread)
    if honoured is not None and honoured > delay:
        delay = honoured
    else:
        honoured = None  # the schedule waits longer anyway
    next_at = outcome.finished_at + delay
    if policy.retry.max_age is not None and next_at > created_at + policy.retry.max_age:
        return Decision(Verdict.EXPIRED, pause_until=pause)
    return Decision(Verdict.RETRY, next_at, retry_after=honoured, pause_until=pause)
