"""An attempt's pure ends and the Endpoint it is built from, without I/O."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest

from dispatcher import attempt
from dispatcher.config import DeliverySettings, SecuritySettings
from dispatcher.endpoints import Endpoint, build
from dispatcher.policy import ErrorKind, Outcome, Verdict
from dispatcher.profiles import EmailOn, SettingsError

T0 = 1_700_000_000.0
OPEN = SecuritySettings(allow_http=True, allow_private_networks=True)


def subscription(**row: Any) -> dict[str, Any]:
    return {
        "id": uuid4(),
        "updated_at": datetime.fromtimestamp(T0, UTC),
        "url": "http://127.0.0.1:9/hook",
        "secret": "whsec_current",
        "profile": "standard",
        "settings": "{}",
        "auth": "{}",
        "mails": True,
        "previous_secret": None,
        "previous_until": None,
        **row,
    }


def claimed(endpoint: Endpoint, attempts: int = 0) -> attempt.Job:
    row = {
        "id": 7,
        "subscription_id": uuid4(),
        "event_id": uuid4(),
        "event_name": "products.update.v0",
        "environment_id": "shop-42",
        "entity_instance_id": "p-1",
        "created_at": datetime.fromtimestamp(T0, UTC),
        "payload": '{"id": "p-1"}',
        "attempts": attempts,
        "order_key": None,
        "payload_bytes": 13,
    }
    return attempt.job(row, endpoint, T0)


def answer(status: int) -> Outcome:
    return Outcome(started_at=T0, finished_at=T0, duration=0.0, status=status)


def test_an_endpoint_carries_its_constant_headers() -> None:
    endpoint = build(
        subscription(profile="tillhub", auth=json.dumps({"type": "bearer", "token": "t"})),
        DeliverySettings(),
        OPEN,
    )
    assert endpoint.headers["Content-Type"] == "application/json"
    assert endpoint.headers["User-Agent"] == "Tillhub HTTP Connector/2.1.0"
    assert endpoint.blocked is None


def test_an_endpoint_on_a_refused_url_is_blocked() -> None:
    endpoint = build(subscription(), DeliverySettings(), SecuritySettings())
    assert endpoint.blocked is not None


def test_invalid_settings_are_kept_as_the_error() -> None:
    endpoint = build(subscription(profile="nope"), DeliverySettings(), OPEN)
    assert isinstance(endpoint.settings, SettingsError)


def test_the_previous_secret_signs_until_it_expires() -> None:
    endpoint = build(
        subscription(previous_secret="whsec_old", previous_until=T0 + 60),
        DeliverySettings(),
        OPEN,
    )
    assert endpoint.secrets(T0) == ["whsec_current", "whsec_old"]
    assert endpoint.secrets(T0 + 61) == ["whsec_current"]


def test_a_job_is_the_next_attempt_of_its_row() -> None:
    job = claimed(build(subscription(), DeliverySettings(), OPEN), attempts=2)
    assert job.attempt == 3
    assert job.message.delivery_id == 7


def test_prepare_renders_and_signs() -> None:
    job = claimed(build(subscription(), DeliverySettings(), OPEN))
    request = attempt.prepare(job, int(T0 * 1e9), T0)
    assert isinstance(request, attempt.Request)
    assert json.loads(request.body)["data"] == {"id": "p-1"}
    assert request.headers["webhook-id"] == "msg_7"
    assert request.headers["webhook-timestamp"] == str(int(T0))
    assert request.headers["webhook-signature"].startswith("v1,")
    assert "webhook-id" not in job.headers  # the endpoint's headers are not changed


@pytest.mark.parametrize(
    ("row", "security", "kind"),
    [
        ({"profile": "nope"}, OPEN, ErrorKind.SETTINGS),
        ({}, SecuritySettings(), ErrorKind.BLOCKED),
    ],
)
def test_prepare_sends_nothing_it_must_not(
    row: dict[str, Any], security: SecuritySettings, kind: ErrorKind
) -> None:
    job = claimed(build(subscription(**row), DeliverySettings(), security))
    outcome = attempt.prepare(job, 0, T0)
    assert isinstance(outcome, Outcome)
    assert outcome.error is kind
    assert outcome.started_at == T0


def test_judge_fails_invalid_settings_without_a_mail() -> None:
    job = claimed(build(subscription(profile="nope"), DeliverySettings(), OPEN))
    judged = attempt.judge(job, answer(200), None)
    assert judged.result.decision.verdict is Verdict.FAILED
    assert judged.result.email is None


def test_judge_names_the_error_rate_limit_of_a_failed_attempt_only() -> None:
    job = claimed(build(subscription(profile="tillhub"), DeliverySettings(), OPEN))
    assert attempt.judge(job, answer(500), None).error_rate is not None
    assert attempt.judge(job, answer(200), None).error_rate is None


def test_tilby_mails_every_failed_attempt() -> None:
    job = claimed(build(subscription(profile="tilby"), DeliverySettings(), OPEN))
    judged = attempt.judge(job, answer(500), b'{"id": "p-1"}')
    assert judged.result.decision.verdict is Verdict.RETRY
    assert judged.result.email == "attempt_failed"
    assert judged.result.body == '{"id": "p-1"}'


def test_no_mail_is_queued_for_a_subscription_without_a_recipient() -> None:
    job = claimed(build(subscription(profile="tilby", mails=False), DeliverySettings(), OPEN))
    judged = attempt.judge(job, answer(500), b'{"id": "p-1"}')
    assert judged.result.decision.verdict is Verdict.RETRY
    assert judged.result.email is None
    assert judged.result.body is None


def test_a_delivered_attempt_quotes_no_body() -> None:
    job = claimed(build(subscription(profile="tilby"), DeliverySettings(), OPEN))
    judged = attempt.judge(job, answer(200), b"{}")
    assert judged.result.email is None
    assert judged.result.body is None


@pytest.mark.parametrize(
    ("email_on", "verdict", "mail"),
    [
        (EmailOn.EVERY_FAILURE, Verdict.RETRY, "attempt_failed"),
        (EmailOn.FINAL, Verdict.RETRY, None),
        (EmailOn.FINAL, Verdict.FAILED, "gave_up"),
        (EmailOn.EVERY_FAILURE, Verdict.EXPIRED, "gave_up"),
        (EmailOn.NEVER, Verdict.FAILED, None),
        (EmailOn.EVERY_FAILURE, Verdict.DELIVERED, None),
    ],
)
def test_failure_email(email_on: EmailOn, verdict: Verdict, mail: str | None) -> None:
    assert attempt.failure_email(email_on, verdict) == mail


def test_an_endpoints_cap_is_its_own_else_the_daemons() -> None:
    settings = DeliverySettings(max_per_endpoint=64)
    own = claimed(build(subscription(settings='{"max_in_flight": 3}'), settings, OPEN))
    assert own.cap == 3
    assert claimed(build(subscription(), settings, OPEN)).cap == 64
