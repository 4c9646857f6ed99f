"""Headers that prove a request is ours: signature schemes and the receiver's own auth. Pure."""

from __future__ import annotations

import base64
import hmac
import secrets
from functools import lru_cache
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

Headers = dict[str, str]


class Signer(Protocol):
    """Headers for one request: active secrets, message id, body, send time in unix ms, and
    the header name where the scheme lets the subscription choose it."""

    def __call__(
        self, secrets_: list[str], msg_id: str, body: bytes, now_ms: int, header: str | None = None
    ) -> Headers: ...


def new_secret() -> str:
    """A Standard Webhooks style secret: whsec_ + base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@lru_cache(maxsize=4096)
def secret_key(secret: str) -> bytes:
    """The HMAC key: the decoded bytes of a whsec_ secret, else the secret's UTF-8 bytes."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[6:], validate=True)
        except ValueError:
            pass
    return secret.encode()


def _hmac(key: bytes, data: bytes) -> bytes:
    # The one-shot C digest: no HMAC object per request.
    return hmac.digest(key, data, "sha256")


def standard(
    secrets_: list[str], msg_id: str, body: bytes, now_ms: int, header: str | None = None
) -> Headers:
    """Standard Webhooks v1; one signature per active secret (rotation)."""
    ts = str(now_ms // 1000)
    signed = f"{msg_id}.{ts}.".encode() + body
    sigs = " ".join(
        "v1," + base64.b64encode(_hmac(secret_key(s), signed)).decode() for s in secrets_
    )
    return {"webhook-id": msg_id, "webhook-timestamp": ts, "webhook-signature": sigs}


def tillhub(
    secrets_: list[str], msg_id: str, body: bytes, now_ms: int, header: str | None = None
) -> Headers:
    """Tillhub-Signature: t=<unix ms>,v1=<base64 HMAC-SHA256 of "<t>.<body>">, keyed by the
    signing secret as the receiver holds it (its UTF-8 bytes)."""
    signed = f"{now_ms}.".encode() + body
    parts = [f"t={now_ms}"] + [
        "v1=" + base64.b64encode(_hmac(s.encode(), signed)).decode() for s in secrets_
    ]
    return {"Tillhub-Signature": ",".join(parts)}


def tilby(
    secrets_: list[str], msg_id: str, body: bytes, now_ms: int, header: str | None = None
) -> Headers:
    """Hex HMAC-SHA256 of the body keyed by the shop's static token, in the header the
    subscription names (the docs name none; X-Tilby-Signature by default)."""
    digest = hmac.digest(secrets_[0].encode(), body, "sha256").hex()
    return {header or "X-Tilby-Signature": digest}


def new_signing_key() -> str:
    """An Ed25519 private key as Standard Webhooks serializes it: whsk_ + base64 of 32 bytes."""
    return "whsk_" + base64.b64encode(secrets.token_bytes(32)).decode()


@lru_cache(maxsize=4096)
def _private_key(key: str) -> Ed25519PrivateKey:
    # Parsing a key is ~10x the cost of a signature: cached like secret_key().
    return Ed25519PrivateKey.from_private_bytes(base64.b64decode(key.removeprefix("whsk_")))


def public_key(key: str) -> str:
    """The whpk_ public key of a whsk_ private key: what a receiver verifies v1a with."""
    raw = _private_key(key).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "whpk_" + base64.b64encode(raw).decode()


def standard_v1a(
    secrets_: list[str], msg_id: str, body: bytes, now_ms: int, header: str | None = None
) -> Headers:
    """Standard Webhooks v1a: Ed25519 over the same content as v1; `secrets_` are the whsk_
    private keys (the current one, and the previous one during a rotation)."""
    ts = str(now_ms // 1000)
    signed = f"{msg_id}.{ts}.".encode() + body
    sigs = " ".join(
        "v1a," + base64.b64encode(_private_key(k).sign(signed)).decode() for k in secrets_
    )
    return {"webhook-id": msg_id, "webhook-timestamp": ts, "webhook-signature": sigs}


# The signers whose keys are Ed25519 key pairs (the subscription's signing_key) rather than
# the HMAC secret.
ASYMMETRIC = frozenset({"standard_v1a"})


def none(
    secrets_: list[str], msg_id: str, body: bytes, now_ms: int, header: str | None = None
) -> Headers:
    return {}


SIGNERS: dict[str, Signer] = {
    "standard": standard,
    "standard_v1a": standard_v1a,
    "tillhub": tillhub,
    "tilby": tilby,
    "none": none,
}


def auth_headers(auth: dict[str, Any]) -> dict[str, str]:
    """The request headers for a subscription's receiver auth (see sql/0002_admin.sql)."""
    kind = auth.get("type", "none")
    if kind == "basic":
        pair = f"{auth['username']}:{auth['password']}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
    if kind == "bearer":
        return {"Authorization": f"Bearer {auth['token']}"}
    if kind == "header":
        return {str(auth["name"]): str(auth["value"])}
    return {}
