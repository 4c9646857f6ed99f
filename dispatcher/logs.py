"""structlog setup: JSON lines in production, readable console output on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog
from aiohttp.http_exceptions import HttpProcessingError

from .dberrors import DB_ERRORS


class _MalformedRequests(logging.Filter):
    """aiohttp logs a malformed request (bad header bytes, broken framing) with a traceback;
    it already answered 400, so one warning line with the reason is the useful record."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "malformed request refused: %s"
            record.args = (str(exc).replace("\n", " "),)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class _PoolReconnects(logging.Filter):
    """asyncpg's pool (0.32) keeps its minimum of idle connections by reconnecting in the
    background, and logs each failed try with a traceback: about once a second, backing off,
    while the database is away (four in a three-second failover in tests/test_failover.py).
    The daemon's own loops already log the outage, one JSON line each; the error on one line
    is the useful part, and a traceback would read as a crash (and break one line a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, DB_ERRORS):
            error = f"{type(exc).__name__}: {exc}".replace("\n", " ")
            record.args = (record.getMessage(), error)
            record.msg = "%s: %s"
            record.exc_info = None
            record.exc_text = None
        return True


def configure(fmt: str = "auto", level: str = "info") -> None:
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)
    logging.getLogger("aiohttp.server").addFilter(_MalformedRequests())
    logging.getLogger("asyncpg.pool").addFilter(_PoolReconnects())
