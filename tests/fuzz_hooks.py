"""schemathesis hooks for the fuzz run: fit generated requests to the credentials in use.

Which environment a body may name, and whether a create's URL must answer a test request,
depend on the token and on the subscription's profile, not on the request's shape; the
schema says so in descriptions. For data generated as valid, these hooks make it valid
for this run's token and receiver, so `positive_data_acceptance` judges the shape alone.
"""

from __future__ import annotations

import json
import os
from typing import Any

import schemathesis
from schemathesis.generation.meta import TestPhase
from schemathesis.generation.modes import GenerationMode

ENVIRONMENT = os.environ.get("FUZZ_ENVIRONMENT", "")
# Usable TLS material (a CA, a client certificate and its key): a generated PEM is never a
# certificate, and the API checks what it stores (the schema says so in a description).
TLS: dict[str, str] = json.loads(os.environ.get("FUZZ_TLS", "{}"))
RECEIVER = os.environ.get("FUZZ_RECEIVER", "")
VERIFYING = {"tilby"}


@schemathesis.hook
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    meta = case.meta
    if meta is None or meta.generation.mode is not GenerationMode.POSITIVE:
        return
    query = case.query
    if case.operation.path.endswith("/stats") and isinstance(query, dict) and "bucket" in query:
        # window with bucket: a whole number of buckets, at most 500 (the parameter's
        # description; JSON Schema has no way to relate two parameters).
        # Values may come as numbers or as their text (the coverage phase).
        try:
            bucket = int(query["bucket"])
            window = int(query.get("window", 86_400))
        except (TypeError, ValueError):
            return
        if bucket > 0:
            query["window"] = bucket * min(max(window // bucket, 1), 500)
    body = case.body
    if not isinstance(body, dict):
        return
    if "environment_id" in body or (
        case.operation.path
        in (
            "/v1/subscriptions",
            "/v1/events",
            "/v1/events/import",
        )
        and case.operation.method.upper() == "POST"
    ):
        # The environment token may only name its own; the admin token must name one.
        body["environment_id"] = ENVIRONMENT
    nested = body.get("settings")
    settings = nested if isinstance(nested, dict) else {}
    for where in (body, settings):
        tls = where.get("tls")
        if isinstance(tls, dict) and tls:
            if "client_cert" in tls or "client_key" in tls:
                tls["client_cert"], tls["client_key"] = TLS["client_cert"], TLS["client_key"]
            if "ca" in tls:
                tls["ca"] = TLS["ca"]
    verify = body.get("verify_on_create", settings.get("verify_on_create"))
    if case.operation.path == "/v1/subscriptions" and (
        verify or (verify is None and body.get("profile") in VERIFYING)
    ):
        # A create that tests its URL needs one that answers 200, and the time to get it:
        # a generated timeout of a millisecond cannot wait for any receiver.
        body["url"] = RECEIVER
        for where in (body, settings):
            for key in ("timeout", "connect_timeout"):
                if key in where:
                    where[key] = max(where[key], 5.0)


# Delivery ids the run has seen in list pages, and where reads and resends of those ids
# are written (one line each) so the test can tell the list's links were followed.
LINKS_LOG = os.environ.get("FUZZ_LINKS_LOG", "")
_LISTED: set[int] = set()
_FOLLOWERS = {("GET", "/v1/deliveries/{id}"), ("POST", "/v1/deliveries/{id}/resend")}


@schemathesis.hook
def after_call(ctx: Any, case: Any, response: Any) -> None:
    where = (case.operation.method.upper(), case.operation.path)
    if where == ("GET", "/v1/deliveries") and response.status_code == 200:
        _LISTED.update(item["id"] for item in response.json()["items"])
    elif where in _FOLLOWERS and LINKS_LOG and response.status_code < 300:
        meta = case.meta
        stateful = meta is not None and meta.phase.name is TestPhase.STATEFUL
        if stateful and case.path_parameters.get("id") in _LISTED:
            with open(LINKS_LOG, "a") as out:
                out.write(f"{where[0]} {where[1]} {case.path_parameters['id']}\n")
