"""The operator page: static files served at /ui/, talking only to the public /v1 API."""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

FOLDER = Path(__file__).resolve().parent
# Only plain file names of the kinds the page is made of: no folders, no dot files, so a
# request can never leave FOLDER.
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(html|js|css|svg|png)$")
HEADERS = {
    # The page loads nothing from elsewhere and is never framed; API data is rendered as
    # text, and this policy is the second line of defence if that ever slips.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def _file(name: str) -> web.FileResponse:
    path = FOLDER / name
    if not NAME.match(name) or not path.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers=HEADERS)


async def index(request: web.Request) -> web.FileResponse:
    return await _file("index.html")


async def asset(request: web.Request) -> web.FileResponse:
    return await _file(request.match_info["name"])


async def to_index(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


def routes() -> list[web.RouteDef]:
    return [
        web.get("/", to_index),
        web.get("/ui", to_index),
        web.get("/ui/", index),
        web.get("/ui/{name}", asset),
    ]
