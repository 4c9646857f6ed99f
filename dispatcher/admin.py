"""The admin HTTP port: the /v1 API, health, readiness, Prometheus metrics and OpenAPI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import api_deliveries, api_events, api_subscriptions, openapi, ui
from .api import STATE, AdminState, authentication, body_limit, errors, json_response

__all__ = ["AdminState", "build"]


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    checks = {"database": False, "listener": state.listener.connected}
    try:
        await asyncio.wait_for(state.pool.fetchval("SELECT 1"), 2.0)
        checks["database"] = True
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        pass
    ready = all(checks.values())
    return json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[STATE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi_json(request: web.Request) -> web.Response:
    return json_response(openapi.document())


async def _resend_jobs(app: web.Application) -> AsyncIterator[None]:
    jobs = app[api_deliveries.RESEND_JOBS]
    await jobs.resume()
    yield
    await jobs.close()


def build(state: AdminState) -> web.Application:
    app = web.Application(
        client_max_size=body_limit(state.settings.delivery.max_payload_bytes),
        middlewares=[errors, authentication],
    )
    app[STATE] = state
    app[api_deliveries.RESEND_JOBS] = api_deliveries.ResendJobs(state.pool)
    app.cleanup_ctx.append(_resend_jobs)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_json)
    app.add_routes(api_subscriptions.routes())
    app.add_routes(api_events.routes())
    app.add_routes(api_deliveries.routes())
    app.add_routes(ui.routes())  # the operator page; it uses only the /v1 API above
    return app
