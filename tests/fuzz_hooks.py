"""schemathesis hooks for the fuzz run: fit generated requests to the credentials in use.

Which environment a body may name, and whether a create's URL must answer a test request,
depend on the token and on the subscription's profile, not on the request's shape; the
schema says so in descriptions. For data generated as valid, these hooks make it valid
for this run's token and receiver, so `positive_data_acceptance` judges the shape alone.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis
from schemathesis.generation.modes import GenerationMode

ENVIRONMENT = os.environ.get("FUZZ_ENVIRONMENT", "")
RECEIVER = os.environ.get("FUZZ_RECEIVER", "")
VERIFYING = {"tilby"}


@schemathesis.hook
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    meta = case.meta
    if meta is None or meta.generation.mode is not GenerationMode.POSITIVE:
        return
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
    verify = body.get("verify_on_create", settings.get("verify_on_create"))
    if case.operation.path == "/v1/subscriptions" and (
        verify or (verify is None and body.get("profile") in VERIFYING)
    ):
        # A create that tests its URL needs one that answers 200.
        body["url"] = RECEIVER
