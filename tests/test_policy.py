"""The decision core, without I/O."""

from __future__ import annotations

import math

import pytest

from dispatcher.policy import (
    Action,
    Decision,
    DeliveryPolicy,
    ErrorKind,
    Outcome,
    RetryOn,
    RetryPolicy,
    SuccessRule,
    Verdict,
    decide,
)

T0 = 1_700_000_000.0


def status(code: int, at: float = T0, duration: float = 0.0, excerpt: str = "") -> Outcome:
    return Outcome(
        started_at=at,
        finished_at=at + duration,
        duration=duration,
        status=code,
        body_excerpt=excerpt,
    )


def error(kind: ErrorKind, at: float = T0) -> Outcome:
    return Outcome(started_at=at, finished_at=at, duration=0.0, error=kind)


@pytest.mark.parametrize(
    ("rule", "code", "ok"),
    [
        (SuccessRule.EXACTLY_200, 200, True),
        (SuccessRule.EXACTLY_200, 201, False),
        (SuccessRule.EXACTLY_200, 204, False),
        (SuccessRule.ANY_2XX, 200, True),
        (SuccessRule.ANY_2XX, 299, True),
        (SuccessRule.ANY_2XX, 300, False),
        (SuccessRule.ANY_2XX, 199, False),
        (SuccessRule.BELOW_400, 302, True),
        (SuccessRule.BELOW_400, 399, True),
        (SuccessRule.BELOW_400, 400, False),
    ],
)
def test_success_rules(rule: SuccessRule, code: int, ok: bool) -> None:
    assert rule.accepts(code) is ok


def test_success_is_delivered_whatever_the_attempt() -> None:
    policy = DeliveryPolicy(retry=RetryPolicy(delays=(1.0,)))
    assert decide(policy, 9, status(200), T0) == Decision(Verdict.DELIVERED)


def test_explicit_delays_are_measured_from_the_end_of_the_attempt() -> None:
    policy = DeliveryPolicy(retry=RetryPolicy(delays=(60, 120, 180, 240, 300), max_attempts=6))
    outcome = status(500, at=T0, duration=2.0)
    assert decide(policy, 1, outcome, T0) == Decision(Verdict.RETRY, T0 + 2 + 60)
    assert decide(policy, 5, outcome, T0) == Decision(Verdict.RETRY, T0 + 2 + 300)
    assert decide(policy, 6, outcome, T0) == Decision(Verdict.FAILED)


def test_explicit_delays_without_max_attempts_allow_one_retry_per_delay() -> None:
    policy = DeliveryPolicy(retry=RetryPolicy(delays=(900, 900, 900)))
    assert decide(policy, 3, status(500), T0).verdict is Verdict.RETRY
    assert decide(policy, 4, status(500), T0).verdict is Verdict.FAILED


def test_last_delay_repeats_when_attempts_outnumber_delays() -> None:
    policy = RetryPolicy(delays=(1, 5), max_attempts=10)
    assert [policy.delay(n) for n in range(4)] == [1, 5, 5, 5]


def test_exponential_growth_stops_after_the_limit() -> None:
    policy = RetryPolicy(initial=30, factor=math.e, growth_limit=10)
    assert policy.delay(0) == pytest.approx(30)
    assert policy.delay(1) == pytest.approx(81.55, rel=1e-3)
    assert policy.delay(9) == pytest.approx(30 * math.e**9)
    assert policy.delay(10) == policy.delay(9) == policy.delay(50)


def test_exponential_without_limit_retries_until_max_age_then_expires() -> None:
    policy = DeliveryPolicy(retry=RetryPolicy(initial=30, max_age=7 * 86400))
    assert decide(policy, 3, status(503, at=T0 + 1000), T0).verdict is Verdict.RETRY
    late = status(503, at=T0 + 7 * 86400 - 10)
    assert decide(policy, 40, late, T0) == Decision(Verdict.EXPIRED)


def test_max_attempts_counts_the_first_attempt() -> None:
    policy = DeliveryPolicy(retry=RetryPolicy(initial=1, max_attempts=3))
    assert decide(policy, 2, status(500), T0).verdict is Verdict.RETRY
    assert decide(policy, 3, status(500), T0).verdict is Verdict.FAILED


@pytest.mark.parametrize(
    ("retry_on", "outcome", "verdict"),
    [
        (RetryOn(client_errors=False), status(404), Verdict.FAILED),
        (RetryOn(client_errors=True), status(404), Verdict.RETRY),
        (RetryOn(server_errors=False), status(503), Verdict.FAILED),
        (RetryOn(tls=False), error(ErrorKind.TLS), Verdict.FAILED),
        (RetryOn(), error(ErrorKind.TLS), Verdict.RETRY),
        (RetryOn(timeouts=False), error(ErrorKind.TIMEOUT), Verdict.FAILED),
        (RetryOn(), error(ErrorKind.TIMEOUT), Verdict.RETRY),
        (RetryOn(), error(ErrorKind.DNS), Verdict.RETRY),
        (RetryOn(), error(ErrorKind.CONNECT), Verdict.RETRY),
        (RetryOn(network=False), error(ErrorKind.CONNECT), Verdict.FAILED),
        (RetryOn(), error(ErrorKind.BLOCKED), Verdict.FAILED),
        (RetryOn(), error(ErrorKind.INVALID_URL), Verdict.FAILED),
        (RetryOn(other_statuses=False), status(302), Verdict.FAILED),
    ],
)
def test_which_failures_are_retried(retry_on: RetryOn, outcome: Outcome, verdict: Verdict) -> None:
    policy = DeliveryPolicy(success=SuccessRule.ANY_2XX, retry_on=retry_on)
    assert decide(policy, 1, outcome, T0).verdict is verdict


def test_exactly_200_retries_a_201() -> None:
    policy = DeliveryPolicy(success=SuccessRule.EXACTLY_200)
    assert decide(policy, 1, status(201), T0).verdict is Verdict.RETRY


STORE = DeliveryPolicy(
    success=SuccessRule.EXACTLY_200,
    retry=RetryPolicy(delays=(60, 120, 180, 240, 300), max_attempts=6),
    deactivate_on=frozenset({400, 401, 403, 404, 405, 406, 410, 411}),
    delete_on_body="please unsubscribe me",
)


@pytest.mark.parametrize("code", [400, 401, 403, 404, 405, 406, 410, 411])
def test_store_statuses_deactivate_without_retry(code: int) -> None:
    assert decide(STORE, 1, status(code), T0) == Decision(Verdict.FAILED, action=Action.DEACTIVATE)


@pytest.mark.parametrize("code", [402, 409, 429, 500])
def test_other_failures_are_retried_without_action(code: int) -> None:
    decision = decide(STORE, 1, status(code), T0)
    assert decision.verdict is Verdict.RETRY
    assert decision.action is None


def test_please_unsubscribe_me_deletes_whatever_the_status() -> None:
    asked = status(200, excerpt="OK. PLEASE unsubscribe me")
    assert decide(STORE, 1, asked, T0) == Decision(Verdict.DELIVERED, action=Action.DELETE)
    angry = status(410, excerpt="please unsubscribe me")
    assert decide(STORE, 2, angry, T0) == Decision(Verdict.FAILED, action=Action.DELETE)
