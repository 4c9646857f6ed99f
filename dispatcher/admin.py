"""The admin HTTP port: health, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .listen import Listener
from .metrics import Metrics


@dataclass(frozen=True, slots=True)
class AdminState:
    pool: asyncpg.Pool
    listener: Listener
    metrics: Metrics


STATE = web.AppKey("state", AdminState)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    checks = {"database": False, "listener": state.listener.connected}
    try:
        await asyncio.wait_for(state.pool.fetchval("SELECT 1"), 2.0)
        checks["database"] = True
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        pass
    ready = all(checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[STATE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build(state: AdminState) -> web.Application:
    app = web.Application(client_max_size=1024 * 1024)
    app[STATE] = state
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
