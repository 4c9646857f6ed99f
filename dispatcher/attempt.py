"""One attempt's pure ends: prepare the request (render, sign) and judge its outcome."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .endpoints import Endpoint
from .envelope import Message, render
from .policy import Decision, ErrorKind, Outcome, Verdict, decide
from .profiles import EmailOn, EndpointSettings, ErrorRateLimit, SettingsError
from .signing import SIGNERS


@dataclass(frozen=True, slots=True)
class Job:
    message: Message
    attempt: int
    url: str
    # The current signing secret first; during a rotation the previous one still signs too.
    secrets: list[str]
    endpoint: EndpointSettings | SettingsError
    headers: dict[str, str]
    blocked: str | None


@dataclass(frozen=True, slots=True)
class Request:
    """What to POST: the rendered body and every header, signature included."""

    body: bytes
    headers: dict[str, str]
    settings: EndpointSettings


@dataclass(frozen=True, slots=True)
class Judgement:
    """What an attempt's outcome means: the decision, the failure mail it queues, and the
    error-rate limit to check when it failed on a subscription that has one."""

    decision: Decision
    email: str | None
    error_rate: ErrorRateLimit | None


def job(row: Mapping[str, Any], endpoint: Endpoint, now: float) -> Job:
    """The job of a claimed row (queries.CLAIM) for its subscription's Endpoint; `now`
    (unix seconds) picks the secrets that sign."""
    return Job(
        message=Message(
            delivery_id=row["id"],
            subscription_id=row["subscription_id"],
            event_id=row["event_id"],
            event_name=row["event_name"],
            environment_id=row["environment_id"],
            entity_instance_id=row["entity_instance_id"],
            created_at=row["created_at"],
            payload=row["payload"],
        ),
        attempt=row["attempts"] + 1,
        url=endpoint.url,
        secrets=endpoint.secrets(now),
        endpoint=endpoint.settings,
        headers=endpoint.headers,
        blocked=endpoint.blocked,
    )


def configured_cap(job: Job, max_per_endpoint: int) -> int:
    """The endpoint's own concurrency cap, else the daemon's."""
    endpoint = job.endpoint
    if isinstance(endpoint, EndpointSettings) and endpoint.max_in_flight is not None:
        return endpoint.max_in_flight
    return max_per_endpoint


def prepare(job: Job, sent_ns: int, now: float) -> Request | Outcome:
    """The request to send at `sent_ns` (unix nanoseconds, the signature's timestamp), or
    the outcome at `now` of one that must not be sent (invalid settings, a refused URL)."""
    endpoint = job.endpoint
    if isinstance(endpoint, SettingsError):
        return Outcome(now, now, 0.0, error=ErrorKind.SETTINGS, detail=str(endpoint))
    if job.blocked is not None:
        return Outcome(now, now, 0.0, error=ErrorKind.BLOCKED, detail=job.blocked)
    body = render(endpoint.envelope, job.message, sent_ns)
    headers = dict(job.headers)
    headers.update(
        SIGNERS[endpoint.signature](
            job.secrets,
            f"msg_{job.message.delivery_id}",
            body,
            sent_ns // 1_000_000,
            endpoint.signature_header,
        )
    )
    return Request(body, headers, endpoint)


def judge(job: Job, outcome: Outcome) -> Judgement:
    endpoint = job.endpoint
    if isinstance(endpoint, SettingsError):
        return Judgement(Decision(Verdict.FAILED), None, None)
    decision = decide(endpoint.policy, job.attempt, outcome, job.message.created_at.timestamp())
    failed = decision.verdict is not Verdict.DELIVERED
    return Judgement(
        decision,
        failure_email(endpoint.email_on, decision.verdict),
        endpoint.error_rate if failed else None,
    )


def failure_email(email_on: EmailOn, verdict: Verdict) -> str | None:
    """Which failure mail an attempt queues: one per failed attempt for EVERY_FAILURE, and
    a last one when the delivery gives up (the kinds of dispatcher.emails)."""
    if verdict is Verdict.DELIVERED or email_on is EmailOn.NEVER:
        return None
    if verdict is Verdict.RETRY:
        return "attempt_failed" if email_on is EmailOn.EVERY_FAILURE else None
    return "gave_up"
