"""What every admin API route shares: the app state, JSON in and out, errors, auth, paging."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID

import asyncpg
import msgspec
import orjson
import structlog
from aiohttp import web

from .config import Settings
from .dberrors import UNAVAILABLE
from .listen import Listener
from .metrics import Metrics
from .models import Invalid, decode
from .send import Sender
from .tokens import Principal, authenticate

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = 1024 * 1024
# Room in a request body for what goes with the payload (event name, keys, the JSON around).
_BODY_SLACK = 64 * 1024


def body_limit(max_payload_bytes: int) -> int:
    """The largest request body: 1 MiB, or room for the largest payload the database takes."""
    return max(MAX_BODY, max_payload_bytes + _BODY_SLACK)


MAX_PAGE = 200
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class AdminState:
    pool: asyncpg.Pool
    listener: Listener
    metrics: Metrics
    settings: Settings
    sender: Sender


STATE = web.AppKey("state", AdminState)
PRINCIPAL = web.RequestKey("principal", Principal)


class ApiError(Exception):
    """An answer other than success: status, a machine code, a message, the field at fault."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid", message, field)


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def _default(value: Any) -> Any:
    # asyncpg returns its own UUID type, which orjson does not know.
    if isinstance(value, UUID) or type(value).__name__ == "UUID":
        return str(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, default=_default, option=orjson.OPT_UTC_Z),
        status=status,
        content_type="application/json",
    )


def _error_body(status: int, code: str, message: str, field: str | None) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return json_response({"error": error}, status)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure is JSON naming what was wrong; nothing escapes as a traceback."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _error_body(exc.status, exc.code, exc.message, exc.field)
    except web.HTTPRequestEntityTooLarge:
        limit = body_limit(request.app[STATE].settings.delivery.max_payload_bytes)
        return _error_body(413, "too_large", f"request body over {limit} bytes", "body")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        answer = _error_body(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason, None)
        if "Allow" in exc.headers:
            # RFC 9110: a 405 names the methods the resource does support.
            answer.headers["Allow"] = exc.headers["Allow"]
        return answer
    except UNAVAILABLE as exc:
        log.warning("admin.unavailable", path=request.path, error=str(exc))
        if isinstance(exc, asyncpg.InternalClientError):
            # Its connection may go back to the pool broken, failing every request after.
            await request.app[STATE].pool.expire_connections()
        return _error_body(503, "unavailable", "database unavailable, try again", None)
    except Exception:
        log.exception("admin.failed", method=request.method, path=request.path)
        return _error_body(500, "internal", "internal error (logged)", None)


@web.middleware
async def authentication(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/v1/"):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "send Authorization: Bearer <token>")
    state = request.app[STATE]
    principal = await authenticate(state.pool, token.strip(), state.settings.admin.token)
    if principal is None:
        raise ApiError(401, "unauthorized", "unknown token")
    request[PRINCIPAL] = principal
    return await handler(request)


def principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def state(request: web.Request) -> AdminState:
    return request.app[STATE]


async def body(request: web.Request, *, empty_ok: bool = False) -> dict[str, Any]:
    """The request's JSON object; 400 when it is not one. With `empty_ok`, no body at all
    is an empty object (the routes whose every field has a default)."""
    raw = await request.read()
    if empty_ok and not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"request body is not valid JSON: {exc}", "body") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_json", "request body must be a JSON object", "body")
    for key, value in data.items():
        if "\x00" in key or _holds_nul(value):
            # PostgreSQL text and jsonb cannot store it: refuse it here, by name.
            raise invalid(key, "must not contain the NUL character (\\u0000)")
    return data


def decoded(data: object, model: type[T]) -> T:
    """A parsed body as its model; 422 naming the field that does not fit."""
    try:
        return decode(data, model)
    except Invalid as exc:
        raise invalid(exc.field, exc.message) from None


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False


def environment_for(request: web.Request, requested: Any) -> str:
    """The environment a write goes to: the token's own, or (admin) the one named."""
    who = principal(request)
    if who.environment_id is not None:
        if requested is not None and requested != who.environment_id:
            raise invalid("environment_id", "this token belongs to another environment")
        return who.environment_id
    if not isinstance(requested, str) or not requested or len(requested) > 200:
        raise invalid("environment_id", "required with the admin token: a non-empty string")
    return requested


def scope(request: web.Request) -> str | None:
    """The environment reads are limited to; None for the admin token (sees all)."""
    return principal(request).environment_id


def path_uuid(request: web.Request, name: str = "id") -> UUID:
    try:
        return UUID(request.match_info[name])
    except ValueError:
        raise not_found("subscription") from None


def path_int(request: web.Request, what: str, name: str = "id") -> int:
    text = request.match_info[name]
    if not text.isdigit() or len(text) > 18:
        raise not_found(what)
    return int(text)


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, "bad_query", f"{name} must be an integer", name) from None
    if not low <= value <= high:
        raise ApiError(400, "bad_query", f"{name} must be between {low} and {high}", name)
    return value


def query_uuid(request: web.Request, name: str) -> UUID | None:
    text = request.query.get(name)
    if text is None:
        return None
    try:
        return UUID(text)
    except ValueError:
        raise ApiError(400, "bad_query", f"{name} must be a UUID", name) from None


def query_cursor(request: web.Request, form: Any) -> str | None:
    """The `cursor` query parameter, checked against its model type (`models.*Cursor`)."""
    text = request.query.get("cursor")
    if text is None:
        return None
    try:
        cursor: str = msgspec.convert(text, form)
    except msgspec.ValidationError:
        raise ApiError(400, "bad_query", "cursor is not one this API gave out", "cursor") from None
    return cursor
