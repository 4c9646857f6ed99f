"""Profiles, envelopes and signatures, without I/O (receivers check them independently)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
from datetime import UTC, datetime
from uuid import UUID

import orjson
import pytest

from dispatcher.envelope import Message, iso_nanos, render
from dispatcher.policy import SuccessRule
from dispatcher.profiles import PROFILES, SettingsError, resolve
from dispatcher.signing import SIGNERS, new_secret

MESSAGE = Message(
    delivery_id=42,
    subscription_id=UUID("ff30cfdf-5167-4f72-b4fc-c1d72db3c07e"),
    event_id=UUID("c6fe918a-7bdc-4ccd-af36-95c03853233d"),
    event_name="transaction.create.v0",
    environment_id="shop-9",
    entity_instance_id="10b06f38-031d-4e0c-8706-0474c8c5b61c",
    created_at=datetime(2022, 12, 13, 8, 45, 0, 881000, tzinfo=UTC),
    payload='{"id": "10b06f38", "total_amount": 150.75}',
)


def test_every_profile_resolves_with_no_overrides() -> None:
    for name in PROFILES:
        resolve(name, {})


def test_profile_defaults_follow_the_seeds() -> None:
    store = resolve("store", {})
    assert store.timeout == 5
    assert store.policy.success is SuccessRule.EXACTLY_200
    assert store.policy.retry.delays == (60, 120, 180, 240, 300)
    assert store.policy.retry.attempts_limit() == 6
    tilby = resolve("tilby", {})
    assert tilby.policy.retry.delays == (900, 900, 900)
    assert tilby.policy.retry.attempts_limit() == 4
    tillhub = resolve("tillhub", {})
    assert tillhub.policy.retry.delay(0) == 30
    assert tillhub.policy.retry.delay(12) == pytest.approx(30 * math.e**9)
    assert tillhub.policy.retry.max_age == 7 * 86400
    assert tillhub.max_redirects == 20
    assert tillhub.follow_redirects
    assert not tillhub.policy.retry_on.tls
    assert resolve("tilia", {}).policy.success is SuccessRule.BELOW_400


def test_overrides_replace_the_retry_block_and_merge_retry_on() -> None:
    ep = resolve(
        "tillhub", {"retry": {"delays": [1, 2]}, "retry_on": {"client_errors": True}, "timeout": 3}
    )
    assert ep.policy.retry.delays == (1, 2)
    assert ep.policy.retry.max_age is None
    assert ep.policy.retry_on.client_errors
    assert not ep.policy.retry_on.tls
    assert ep.timeout == 3


@pytest.mark.parametrize(
    ("profile", "overrides", "field"),
    [
        ("nope", {}, "profile"),
        ("standard", {"colour": "red"}, "colour"),
        ("standard", {"timeout": -1}, "timeout"),
        ("standard", {"timeout": "5"}, "timeout"),
        ("standard", {"success": "3xx"}, "success"),
        ("standard", {"retry": {"delays": [1, -2]}}, "retry.delays"),
        ("standard", {"retry": {"max_attempts": 1.5}}, "retry.max_attempts"),
        ("standard", {"retry": {"speed": 1}}, "retry.speed"),
        ("standard", {"retry_on": {"client_errors": "yes"}}, "retry_on.client_errors"),
        ("standard", {"envelope": "xml"}, "envelope"),
        ("standard", {"signature": "rot13"}, "signature"),
        ("standard", {"max_in_flight": 0}, "max_in_flight"),
    ],
)
def test_bad_settings_name_their_field(
    profile: str, overrides: dict[str, object], field: str
) -> None:
    with pytest.raises(SettingsError) as info:
        resolve(profile, overrides)
    assert info.value.field == field


def test_tillhub_envelope_matches_the_seed_example() -> None:
    body = orjson.loads(render("tillhub", MESSAGE, 0))
    assert body == {
        "webhook_id": "ff30cfdf-5167-4f72-b4fc-c1d72db3c07e",
        "event_id": "c6fe918a-7bdc-4ccd-af36-95c03853233d",
        "event_entity": "transaction",
        "event_type": "create",
        "event_version": 0,
        "entity_instance_id": "10b06f38-031d-4e0c-8706-0474c8c5b61c",
        "timestamp": "2022-12-13T08:45:00.881Z",
        "payload": {"id": "10b06f38", "total_amount": 150.75},
    }


def test_tilia_envelope_carries_nanoseconds() -> None:
    sent = 1_709_142_981_714_473_539
    body = orjson.loads(render("tilia", MESSAGE, sent))
    assert body == {
        "event_name": "transaction.create.v0",
        "bucket_key": "shop-9",
        "sent_at": "2024-02-28T17:56:21.714473539Z",
        "message": {"id": "10b06f38", "total_amount": 150.75},
    }
    assert iso_nanos(5) == "1970-01-01T00:00:00.000000005Z"


def test_store_and_tilby_send_the_payload_itself() -> None:
    for name in ("store", "tilby"):
        assert orjson.loads(render(name, MESSAGE, 0)) == {"id": "10b06f38", "total_amount": 150.75}


def test_standard_signature_verifies_with_every_active_secret() -> None:
    old, new = new_secret(), new_secret()
    body = b'{"a":1}'
    headers = SIGNERS["standard"]([old, new], "msg_1", body, 1_700_000_000_123)
    assert headers["webhook-timestamp"] == "1700000000"
    sigs = headers["webhook-signature"].split()
    for secret, sig in zip((old, new), sigs, strict=True):
        key = base64.b64decode(secret.removeprefix("whsec_"))
        mac = hmac.new(key, b"msg_1.1700000000." + body, hashlib.sha256).digest()
        assert sig == "v1," + base64.b64encode(mac).decode()


def test_tillhub_signature_signs_millis_and_body() -> None:
    body = b'{"a":1}'
    header = SIGNERS["tillhub"](["s3cret"], "msg_1", body, 1_700_000_000_123)["Tillhub-Signature"]
    t, v1 = header.split(",")
    assert t == "t=1700000000123"
    mac = hmac.new(b"s3cret", b"1700000000123." + body, hashlib.sha256).digest()
    assert v1 == "v1=" + base64.b64encode(mac).decode()


def test_tilby_signature_is_hex_hmac_of_the_body_keyed_by_the_token() -> None:
    body = b'{"a":1}'
    headers = SIGNERS["tilby"](["static-token"], "msg_1", body, 0)
    assert list(headers.values()) == [hmac.new(b"static-token", body, "sha256").hexdigest()]
