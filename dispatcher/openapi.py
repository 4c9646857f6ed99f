"""The admin API's OpenAPI 3.1 description, served at /openapi.json and checked by the tests."""

from __future__ import annotations

from typing import Any

from .api_deliveries import FINISHED, STATUSES
from .policy import SuccessRule
from .profiles import PROFILES

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str, **extra: Any) -> Schema:
    return {"type": [kind, "null"], **extra}


TIME = {"type": "string", "format": "date-time"}
NULL_TIME = {"type": ["string", "null"], "format": "date-time"}
UUID_ = {"type": "string", "format": "uuid"}
EVENT_NAME = {"type": "string", "pattern": r"^[a-z0-9_-]+\.[a-z0-9_-]+\.v[0-9]+$", "maxLength": 200}
EVENT_PATTERN = {
    "type": "string",
    "pattern": r"^(\*|[a-z0-9_-]+\.\*|[a-z0-9_-]+\.[a-z0-9_-]+\.(\*|v[0-9]+))$",
    "maxLength": 200,
}

RETRY: Schema = {
    "type": "object",
    "additionalProperties": False,
    "description": "Explicit delays (the last repeats) or exponential: initial * factor^n, "
    "growth stopping after growth_limit retries.",
    "properties": {
        "delays": {
            "type": "array",
            "maxItems": 100,
            "items": {"type": "number", "minimum": 0, "maximum": 2_592_000},
        },
        "initial": {"type": "number", "minimum": 0, "maximum": 2_592_000},
        "factor": {"type": "number", "minimum": 1, "maximum": 100},
        "growth_limit": {"type": "integer", "minimum": 1, "maximum": 100},
        "max_attempts": {"type": "integer", "minimum": 1, "maximum": 1000},
        "max_age": {"type": "number", "minimum": 0, "maximum": 7_776_000},
    },
}

SETTINGS: dict[str, Schema] = {
    "success": {"type": "string", "enum": [r.value for r in SuccessRule]},
    "retry": RETRY,
    "retry_on": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            k: {"type": "boolean"}
            for k in (
                "server_errors",
                "client_errors",
                "other_statuses",
                "timeouts",
                "network",
                "tls",
            )
        },
    },
    "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 300},
    "connect_timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 300},
    "follow_redirects": {"type": "boolean"},
    "max_redirects": {"type": "integer", "minimum": 0, "maximum": 50},
    "verify_tls": {"type": "boolean"},
    "user_agent": {"type": "string", "minLength": 1, "maxLength": 200},
    "envelope": {"type": "string", "enum": ["standard", "tillhub", "tilia", "tilby", "store"]},
    "signature": {"type": "string", "enum": ["standard", "tillhub", "tilby", "none"]},
    "max_in_flight": {"type": "integer", "minimum": 1, "maximum": 10_000},
}

AUTH_IN: Schema = {
    "oneOf": [
        {
            "type": "object",
            "required": ["type"],
            "additionalProperties": False,
            "properties": {"type": {"const": "none"}},
        },
        {
            "type": "object",
            "required": ["type", "username", "password"],
            "additionalProperties": False,
            "properties": {
                "type": {"const": "basic"},
                "username": {"type": "string", "minLength": 1, "maxLength": 1000},
                "password": {"type": "string", "minLength": 1, "maxLength": 1000},
            },
        },
        {
            "type": "object",
            "required": ["type", "token"],
            "additionalProperties": False,
            "properties": {
                "type": {"const": "bearer"},
                "token": {"type": "string", "minLength": 1, "maxLength": 1000},
            },
        },
        {
            "type": "object",
            "required": ["type", "name", "value"],
            "additionalProperties": False,
            "properties": {
                "type": {"const": "header"},
                "name": {"type": "string", "pattern": "^[A-Za-z0-9-]{1,100}$"},
                "value": {"type": "string", "minLength": 1, "maxLength": 1000},
            },
        },
    ]
}

SUBSCRIPTION_FIELDS: dict[str, Schema] = {
    "environment_id": {
        "type": "string",
        "minLength": 1,
        "maxLength": 200,
        "description": "Required with the admin token; else the token's own.",
    },
    "url": {"type": "string", "format": "uri", "maxLength": 2048},
    "events": {"type": "array", "minItems": 1, "maxItems": 100, "items": EVENT_PATTERN},
    "entity": {
        "type": "string",
        "pattern": "^[a-z0-9_-]{1,100}$",
        "description": "Tilby style: with event_type instead of events.",
    },
    "event_type": {"type": "string", "pattern": "^[a-z0-9_-]{1,100}$"},
    "profile": {"type": "string", "enum": sorted(PROFILES)},
    "name": _nullable("string", maxLength=200),
    "description": _nullable("string", maxLength=2000),
    "active": {"type": "boolean"},
    "secret": {
        "type": "string",
        "minLength": 16,
        "maxLength": 200,
        "description": "Signing secret; generated when not given.",
    },
    "auth": AUTH_IN,
    "email": _nullable("string", format="email", maxLength=320),
    "settings": {"type": "object", "additionalProperties": False, "properties": SETTINGS},
    **SETTINGS,
}

SUBSCRIPTION: Schema = {
    "type": "object",
    "required": [
        "id",
        "environment_id",
        "url",
        "events",
        "profile",
        "settings",
        "active",
        "auth",
        "created_at",
        "updated_at",
    ],
    "properties": {
        "id": UUID_,
        "environment_id": {"type": "string"},
        "url": {"type": "string"},
        "events": {"type": "array", "items": {"type": "string"}},
        "profile": {"type": "string"},
        "settings": {"type": "object"},
        "name": _nullable("string"),
        "description": _nullable("string"),
        "active": {"type": "boolean"},
        "deactivated_reason": _nullable("string"),
        "auth": {
            "type": "object",
            "required": ["type"],
            "properties": {
                "type": {"type": "string"},
                "username": {"type": "string"},
                "name": {"type": "string"},
            },
        },
        "email": _nullable("string"),
        "created_at": TIME,
        "updated_at": TIME,
        "secret": {"type": "string", "description": "Only in the answer to a create."},
    },
}

DELIVERY_PROPS: dict[str, Schema] = {
    "id": {"type": "integer"},
    "subscription_id": UUID_,
    "environment_id": {"type": "string"},
    "event_id": UUID_,
    "event_name": {"type": "string"},
    "entity_instance_id": _nullable("string"),
    "status": {"type": "string", "enum": list(STATUSES)},
    "attempts": {"type": "integer"},
    "created_at": TIME,
    "next_attempt_at": NULL_TIME,
    "finished_at": NULL_TIME,
    "last_status_code": _nullable("integer"),
    "last_error": _nullable("string"),
}
DELIVERY: Schema = {
    "type": "object",
    "required": list(DELIVERY_PROPS),
    "properties": DELIVERY_PROPS,
}

ATTEMPT: Schema = {
    "type": "object",
    "required": [
        "attempt",
        "started_at",
        "duration_ms",
        "status_code",
        "error",
        "response_excerpt",
        "outcome",
    ],
    "properties": {
        "attempt": {"type": "integer"},
        "started_at": TIME,
        "duration_ms": {"type": "number"},
        "status_code": _nullable("integer"),
        "error": _nullable("string"),
        "response_excerpt": _nullable("string"),
        "outcome": {"type": "string", "enum": ["delivered", "retry", "failed", "expired"]},
    },
}

RESEND_JOB: Schema = {
    "type": "object",
    "required": ["id", "filter", "status", "matched", "resent", "created_at"],
    "properties": {
        "id": UUID_,
        "environment_id": _nullable("string"),
        "filter": {"type": "object"},
        "status": {"type": "string", "enum": ["running", "done", "failed"]},
        "matched": {"type": "integer"},
        "resent": {"type": "integer"},
        "error": _nullable("string"),
        "created_at": TIME,
        "finished_at": NULL_TIME,
    },
}

COMPONENTS: dict[str, Schema] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "field": {"type": "string"},
                },
            }
        },
    },
    "Subscription": SUBSCRIPTION,
    "SubscriptionCreate": {
        "type": "object",
        "required": ["url"],
        "additionalProperties": False,
        "properties": SUBSCRIPTION_FIELDS,
    },
    "SubscriptionUpdate": {
        "type": "object",
        "additionalProperties": False,
        "properties": {k: v for k, v in SUBSCRIPTION_FIELDS.items() if k != "environment_id"},
    },
    "SubscriptionPage": {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": _ref("Subscription")},
            "next_cursor": _nullable("string"),
        },
    },
    "Stats": {
        "type": "object",
        "required": [
            "subscription_id",
            "window_seconds",
            "attempts",
            "success_rate",
            "error_rate",
            "mean_response_ms",
            "p95_response_ms",
            "retries_per_delivery",
            "deliveries",
        ],
        "properties": {
            "subscription_id": UUID_,
            "window_seconds": {"type": "integer"},
            "attempts": {"type": "integer"},
            "succeeded_attempts": {"type": "integer"},
            "success_rate": _nullable("number"),
            "error_rate": _nullable("number"),
            "mean_response_ms": _nullable("number"),
            "p95_response_ms": _nullable("number"),
            "retries_per_delivery": _nullable("number"),
            "deliveries": {
                "type": "object",
                "properties": {
                    k: {"type": "integer"} for k in ("delivered", "failed", "expired", "pending")
                },
            },
        },
    },
    "EventCreate": {
        "type": "object",
        "required": ["event_name", "payload"],
        "additionalProperties": False,
        "properties": {
            "environment_id": {"type": "string", "minLength": 1, "maxLength": 200},
            "event_name": EVENT_NAME,
            "payload": {"description": "Any JSON value: the event's data."},
            "entity_instance_id": {"type": "string", "minLength": 1, "maxLength": 200},
            "idempotency_key": {"type": "string", "minLength": 1, "maxLength": 200},
        },
    },
    "Event": {
        "type": "object",
        "required": ["id", "environment_id", "event_name", "created_at", "deliveries", "duplicate"],
        "properties": {
            "id": UUID_,
            "environment_id": {"type": "string"},
            "event_name": {"type": "string"},
            "entity_instance_id": _nullable("string"),
            "created_at": TIME,
            "deliveries": {"type": "integer"},
            "duplicate": {"type": "boolean"},
        },
    },
    "ImportCreate": {
        "type": "object",
        "required": ["event_name", "entities"],
        "additionalProperties": False,
        "properties": {
            "environment_id": {"type": "string", "minLength": 1, "maxLength": 200},
            "event_name": EVENT_NAME,
            "entities": {"type": "array", "minItems": 1, "maxItems": 100_000},
        },
    },
    "Import": {
        "type": "object",
        "required": ["events", "entities"],
        "properties": {"events": {"type": "integer"}, "entities": {"type": "integer"}},
    },
    "RotateSecret": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "secret": {"type": "string", "minLength": 16, "maxLength": 200},
            "grace_seconds": {"type": "integer", "minimum": 0, "maximum": 2_592_000},
        },
    },
    "RotatedSubscription": {
        "allOf": [
            SUBSCRIPTION,
            {
                "type": "object",
                "required": ["secret", "previous_secret_expires_at"],
                "properties": {"previous_secret_expires_at": TIME},
            },
        ]
    },
    "Delivery": DELIVERY,
    "DeliveryDetail": {
        "allOf": [
            DELIVERY,
            {
                "type": "object",
                "required": ["payload", "attempt_history"],
                "properties": {
                    "payload": {},
                    "attempt_history": {"type": "array", "items": ATTEMPT},
                },
            },
        ],
    },
    "DeliveryPage": {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": _ref("Delivery")},
            "next_cursor": _nullable("string"),
        },
    },
    "ResendRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "environment_id": {"type": "string", "minLength": 1, "maxLength": 200},
            "subscription_id": UUID_,
            "status": {
                "oneOf": [
                    {"type": "string", "enum": list(FINISHED)},
                    {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "string", "enum": list(FINISHED)},
                    },
                ]
            },
            "since": TIME,
            "event_name": {"type": "string", "maxLength": 200},
            "ids": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1000,
                "items": {"type": "integer", "minimum": 1},
            },
        },
    },
    "ResendJob": RESEND_JOB,
}


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
PAGE = [
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 200}),
    _query("cursor", {"type": "string"}, "next_cursor of the previous page"),
]


def _body(name: str, *, required: bool = True) -> Schema:
    return {"required": required, **_json(_ref(name))}


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
            "schemas": COMPONENTS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/subscriptions": {
                "post": {
                    "operationId": "createSubscription",
                    "requestBody": _body("SubscriptionCreate"),
                    "responses": _answers(201, sub, 400, 413, 422),
                },
                "get": {
                    "operationId": "listSubscriptions",
                    "parameters": PAGE,
                    "responses": _answers(200, _ref("SubscriptionPage"), 400),
                },
            },
            "/v1/subscriptions/{id}": {
                "parameters": [ID_PATH],
                "get": {"operationId": "getSubscription", "responses": _answers(200, sub, 404)},
                "patch": {
                    "operationId": "updateSubscription",
                    "requestBody": _body("SubscriptionUpdate"),
                    "responses": _answers(200, sub, 400, 404, 413, 422),
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
                    "parameters": [
                        _query(
                            "window",
                            {"type": "integer", "minimum": 60, "maximum": 7_776_000},
                            "seconds, default one day",
                        )
                    ],
                    "responses": _answers(200, _ref("Stats"), 400, 404),
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
                        _query("since", TIME, "created at or after"),
                        _query("until", TIME, "created before"),
                        *PAGE,
                    ],
                    "responses": _answers(200, _ref("DeliveryPage"), 400, 404),
                },
            },
            "/v1/deliveries/resend": {
                "post": {
                    "operationId": "resendDeliveries",
                    "requestBody": _body("ResendRequest"),
                    "responses": _answers(202, _ref("ResendJob"), 400, 404, 413, 422),
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
