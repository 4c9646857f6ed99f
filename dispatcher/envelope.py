"""Envelopes: the body each profile sends, serialized once per attempt with orjson. Pure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from uuid import UUID

import orjson


@dataclass(slots=True)  # not frozen: one per delivery (see attempt.py)
class Message:
    """One delivery's content; `payload` is the event's JSON text, embedded without reparsing."""

    delivery_id: int
    subscription_id: UUID
    event_id: UUID
    event_name: str
    environment_id: str
    entity_instance_id: str | None
    created_at: datetime
    payload: str


@lru_cache(maxsize=1024)
def iso_millis(moment: datetime) -> str:
    # isoformat is C; strftime was a tenth of a delivery's envelope-and-sign time. Cached:
    # an event's fan-out, and every event of one publishing transaction (now() is the
    # transaction's time), share one created_at.
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def iso_nanos(ns: int) -> str:
    seconds, nanos = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{nanos:09d}Z"


def _standard(msg: Message, sent_ns: int) -> object:
    return {
        "type": msg.event_name,
        "timestamp": iso_millis(msg.created_at),
        "data": orjson.Fragment(msg.payload),
    }


def _tillhub(msg: Message, sent_ns: int) -> object:
    entity, action, version = msg.event_name.split(".")
    return {
        "webhook_id": str(msg.subscription_id),
        "event_id": str(msg.event_id),
        "event_entity": entity,
        "event_type": action,
        "event_version": int(version[1:]),
        "entity_instance_id": msg.entity_instance_id,
        "timestamp": iso_millis(msg.created_at),
        "payload": orjson.Fragment(msg.payload),
    }


def _tilia(msg: Message, sent_ns: int) -> object:
    return {
        "event_name": msg.event_name,
        "bucket_key": msg.environment_id,
        "sent_at": iso_nanos(sent_ns),
        "message": orjson.Fragment(msg.payload),
    }


def _payload_only(msg: Message, sent_ns: int) -> object:
    return orjson.Fragment(msg.payload)


ENVELOPES: dict[str, Callable[[Message, int], object]] = {
    "standard": _standard,
    "tillhub": _tillhub,
    "tilia": _tilia,
    # Tilby sends the entity model and the store its order JSON: the payload itself.
    "tilby": _payload_only,
    "store": _payload_only,
}


def render(envelope: str, msg: Message, sent_ns: int) -> bytes:
    """The request body; `sent_ns` is the send time in unix nanoseconds."""
    return orjson.dumps(ENVELOPES[envelope](msg, sent_ns))
