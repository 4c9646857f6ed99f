"""The admin API's OpenAPI 3.1 description, served at /openapi.json and checked by the tests.

The schemas are generated from `models`, the structs the handlers decode with; this module
only adds the routes, their parameters, and links between them for a stateful client.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from . import models
from .models import STATUSES
from .profiles import PROFILES

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


@functools.cache
def components() -> dict[str, Schema]:
    """The models' JSON Schemas, with the cross-field rules the handlers check after decoding."""
    _, schemas = msgspec.json.schema_components(
        models.COMPONENTS, ref_template="#/components/schemas/{name}"
    )
    for name, rules in models.RULES.items():
        schemas[name].update(rules)
    for name in ("SubscriptionCreate", "SubscriptionUpdate"):
        schemas[name]["properties"]["profile"]["enum"] = sorted(PROFILES)
    return schemas


TIME = {"type": "string", "format": "date-time"}
UUID_ = {"type": "string", "format": "uuid"}


def _json(schema: Schema) -> Schema:
    return {"content": {"application/json": {"schema": schema}}}


def _answers(ok: int, schema: Schema | None, *errors: int) -> Schema:
    out: Schema = {str(ok): {"description": "success", **(_json(schema) if schema else {})}}
    for code in (401, 503, *errors):
        out[str(code)] = {"description": "error", **_json(_ref("Error"))}
    return out


def _query(name: str, schema: Schema, description: str = "") -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


ID_PATH = {"name": "id", "in": "path", "required": True, "schema": UUID_}
DELIVERY_ID_PATH = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
}


def _page(cursor: Any) -> list[Schema]:
    """limit and cursor; the cursor's form comes from its model type."""
    return [
        _query("limit", {"type": "integer", "minimum": 1, "maximum": 200}),
        _query("cursor", msgspec.json.schema(cursor)),
    ]


def _body(name: str, *, required: bool = True) -> Schema:
    return {"required": required, **_json(_ref(name))}


# For a stateful client: what an answer's id opens next.
_SUBSCRIPTION_LINKS = {
    op: {"operationId": op, "parameters": {"id": "$response.body#/id"}}
    for op in (
        "getSubscription",
        "updateSubscription",
        "deleteSubscription",
        "activateSubscription",
        "deactivateSubscription",
        "rotateSecret",
        "subscriptionStats",
        "sendTestDelivery",
    )
}
_DELIVERY_LINKS = {
    op: {"operationId": op, "parameters": {"id": "$response.body#/items/0/id"}}
    for op in ("getDelivery", "resendDelivery")
}
_JOB_LINKS = {
    "getResendJob": {"operationId": "getResendJob", "parameters": {"id": "$response.body#/id"}}
}


def _linked(answers: Schema, status: int, links: Schema) -> Schema:
    answers[str(status)]["links"] = links
    return answers


def document() -> Schema:
    sub = _ref("Subscription")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "webhook-dispatcher admin API",
            "version": "1",
            "description": "Bearer tokens belong to one environment; the admin token from "
            "config sees all. Errors are {error: {code, message, field?}}.",
        },
        "components": {
            "schemas": components(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/subscriptions": {
                "post": {
                    "operationId": "createSubscription",
                    "requestBody": _body("SubscriptionCreate"),
                    "responses": _linked(
                        _answers(201, sub, 400, 409, 413, 422), 201, _SUBSCRIPTION_LINKS
                    ),
                },
                "get": {
                    "operationId": "listSubscriptions",
                    "parameters": _page(models.SubscriptionCursor),
                    "responses": _answers(200, _ref("SubscriptionPage"), 400),
                },
            },
            "/v1/subscriptions/{id}": {
                "parameters": [ID_PATH],
                "get": {"operationId": "getSubscription", "responses": _answers(200, sub, 404)},
                "patch": {
                    "operationId": "updateSubscription",
                    "requestBody": _body("SubscriptionUpdate"),
                    "responses": _answers(200, sub, 400, 404, 409, 413, 422),
                },
                "delete": {
                    "operationId": "deleteSubscription",
                    "responses": _answers(204, None, 404),
                },
            },
            "/v1/subscriptions/{id}/activate": {
                "parameters": [ID_PATH],
                "post": {
                    "operationId": "activateSubscription",
                    "responses": _answers(200, sub, 404),
                },
            },
            "/v1/subscriptions/{id}/deactivate": {
                "parameters": [ID_PATH],
                "post": {
                    "operationId": "deactivateSubscription",
                    "responses": _answers(200, sub, 404),
                },
            },
            "/v1/subscriptions/{id}/rotate-secret": {
                "parameters": [ID_PATH],
                "post": {
                    "operationId": "rotateSecret",
                    "description": "A new signing secret (shown once); the previous one "
                    "keeps signing next to it for grace_seconds (default one day).",
                    "requestBody": _body("RotateSecret", required=False),
                    "responses": _answers(200, _ref("RotatedSubscription"), 400, 404, 413, 422),
                },
            },
            "/v1/subscriptions/{id}/stats": {
                "parameters": [ID_PATH],
                "get": {
                    "operationId": "subscriptionStats",
                    "description": "Success rate, response times and retries over the "
                    "window; with `bucket`, also a series of buckets (oldest first) by outcome "
                    "with p50/p95 response times. Test deliveries are left out.",
                    "parameters": [
                        _query(
                            "window",
                            {"type": "integer", "minimum": 60, "maximum": 7_776_000},
                            "seconds, default one day. With bucket: a whole number of "
                            f"buckets, at most {models.MAX_STATS_BUCKETS} of them (else 400); "
                            f"default one day or {models.MAX_STATS_BUCKETS} buckets if fewer",
                        ),
                        _query(
                            "bucket",
                            {"type": "integer", "enum": list(models.STATS_BUCKETS)},
                            "seconds a bucket of the series, aligned to the epoch (UTC); "
                            "the last bucket is the current one",
                        ),
                    ],
                    "responses": _answers(200, _ref("Stats"), 400, 404),
                },
            },
            "/v1/subscriptions/{id}/test": {
                "parameters": [ID_PATH],
                "post": {
                    "operationId": "sendTestDelivery",
                    "description": "Queue one delivery of an example event for this "
                    "subscription only, signed and sent like any other and marked test: "
                    "left out of stats and the error-rate rule. Without event_name, an event "
                    "the subscription wants; without payload, a realistic example of its "
                    "entity. 409 when the subscription is deactivated.",
                    "requestBody": _body("SendTest", required=False),
                    "responses": _answers(202, _ref("Delivery"), 400, 404, 409, 413, 422),
                },
            },
            "/v1/queue": {
                "get": {
                    "operationId": "queueNow",
                    "description": "The live queue of the token's environment (the admin "
                    "token: every environment) right now.",
                    "responses": _answers(200, _ref("Queue")),
                },
            },
            "/v1/events": {
                "post": {
                    "operationId": "publishEvent",
                    "requestBody": _body("EventCreate"),
                    "responses": {
                        **_answers(201, _ref("Event"), 400, 413, 422),
                        "200": {
                            "description": "repeat of an idempotency key",
                            **_json(_ref("Event")),
                        },
                    },
                },
            },
            "/v1/events/import": {
                "post": {
                    "operationId": "publishImport",
                    "description": "Items and customers reach subscribers in batches of at "
                    "most 80 entities a request; other entities one event each.",
                    "requestBody": _body("ImportCreate"),
                    "responses": _answers(201, _ref("Import"), 400, 413, 422),
                },
            },
            "/v1/deliveries": {
                "get": {
                    "operationId": "listDeliveries",
                    "parameters": [
                        _query("subscription_id", UUID_),
                        _query("status", {"type": "string", "enum": list(STATUSES)}),
                        _query("event_name", {"type": "string", "maxLength": 200}),
                        _query("event_id", UUID_),
                        _query(
                            "entity_instance_id",
                            {"type": "string", "minLength": 1, "maxLength": 200},
                            "the event's entity instance id, exactly",
                        ),
                        _query(
                            "status_code",
                            {"type": "integer", "minimum": 100, "maximum": 599},
                            "the last attempt's HTTP status",
                        ),
                        _query("since", TIME, "created at or after"),
                        _query("until", TIME, "created before"),
                        *_page(models.DeliveryCursor),
                    ],
                    "responses": _linked(
                        _answers(200, _ref("DeliveryPage"), 400, 404), 200, _DELIVERY_LINKS
                    ),
                },
            },
            "/v1/deliveries/resend": {
                "post": {
                    "operationId": "resendDeliveries",
                    "requestBody": _body("ResendRequest"),
                    "responses": _linked(
                        _answers(202, _ref("ResendJob"), 400, 404, 413, 422), 202, _JOB_LINKS
                    ),
                },
            },
            "/v1/deliveries/{id}": {
                "parameters": [DELIVERY_ID_PATH],
                "get": {
                    "operationId": "getDelivery",
                    "responses": _answers(200, _ref("DeliveryDetail"), 404),
                },
            },
            "/v1/deliveries/{id}/resend": {
                "parameters": [DELIVERY_ID_PATH],
                "post": {
                    "operationId": "resendDelivery",
                    "responses": _answers(202, _ref("Delivery"), 404, 409),
                },
            },
            "/v1/resend-jobs/{id}": {
                "parameters": [ID_PATH],
                "get": {
                    "operationId": "getResendJob",
                    "responses": _answers(200, _ref("ResendJob"), 404),
                },
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "security": [],
                    "responses": {"200": {"description": "the process answers"}},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "ready",
                    "security": [],
                    "responses": {
                        "200": {"description": "ready"},
                        "503": {"description": "not ready"},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "security": [],
                    "responses": {"200": {"description": "Prometheus text"}},
                }
            },
        },
    }
