"""A tiny ASGI app for the interop test, served by uvicorn and hypercorn in a subprocess.

Each answer says how often that request id was seen and how long its body was, so the
test can tell that every request arrived once and whole. `/chunked` streams its answer
(Transfer-Encoding: chunked), anything else answers with a Content-Length.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Message = dict[str, Any]
_seen: dict[str, int] = {}


async def app(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    headers = dict(scope["headers"])
    rid = headers.get(b"x-id", b"").decode()
    _seen[rid] = _seen.get(rid, 0) + 1
    reply = f"{rid} seen {_seen[rid]} len {len(body)}".encode()
    if scope["path"] == "/chunked":
        start = {"type": "http.response.start", "status": 200, "headers": []}
        await send(start)
        for part in (reply[:4], reply[4:]):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    length = str(len(reply)).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", length)]}
    )
    await send({"type": "http.response.body", "body": reply})
