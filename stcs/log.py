"""Logging: structlog on top of the standard library, so stcs's events and aiohttp's own
messages share one stream and one format.

JSON lines when the output is not a terminal (or goes to ``logFile``), readable console output on
one.  Event names are short lowercase phrases; data goes in keys; request context (request id,
user id, ...) comes from contextvars.  Tokens and keys are never passed to a logger.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError

# The Node.js server's levels (pino) mapped onto the standard library's.
LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "critical": logging.CRITICAL,
}


def configure(level: str = "info", log_file: str = "", *, json: bool | None = None) -> None:
    """Route all logging to ``log_file`` (appended) or standard output.

    ``level`` is a `LEVELS` name.  ``json`` None picks JSON unless the stream is a terminal.
    Raises OSError when ``log_file`` cannot be opened.
    """
    stream: TextIO = open(log_file, "a", buffering=1, encoding="utf-8") if log_file else sys.stdout  # noqa: SIM115
    as_json = (not stream.isatty()) if json is None else json
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if as_json else _identity,
            renderer,
        ],
    )
    global _file_handler
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    _file_handler = (handler, log_file) if log_file else None
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    # aiohttp's access log is replaced by our one line per request.
    logging.getLogger("aiohttp.access").disabled = True
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, BadRequestFilter) for f in server_log.filters):
        server_log.addFilter(BadRequestFilter())


class BadRequestFilter(logging.Filter):
    """Turn aiohttp's traceback for a client's malformed HTTP (oversize header, bad request
    line, ...) into one warning line: a client must not be able to fill the error log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "bad request from client: %s"
            record.args = (exc.message.splitlines()[0] if exc.message else type(exc).__name__,)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_file_handler: tuple[logging.StreamHandler[TextIO], str] | None = None


def reopen() -> None:
    """Reopen ``logFile`` (after logrotate moved it): called on SIGHUP.  No-op on stdout."""
    if _file_handler is None:
        return
    handler, path = _file_handler
    try:
        stream = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        logging.getLogger("stcs").error("cannot reopen log file %s: %s", path, exc)
        return
    old = handler.setStream(stream)
    if old is not None:
        old.close()
    logging.getLogger("stcs").info("log file reopened")


def _identity(_logger: Any, _name: str, event: Any) -> Any:
    return event
