"""Logging: structlog on top of the standard library, so stcs's events and aiohttp's own
messages share one stream and one format.

JSON lines when the output is not a terminal (or goes to ``logFile``), readable console output on
one.  Event names are short lowercase phrases; data goes in keys; request context (request id,
user id, ...) comes from contextvars.  Tokens and keys are never passed to a logger.

In UUID mode (no ``authServerEndpoint``) a user id *is* the user's token, so it must not be
logged either: `configure` then installs `hide_user_ids`, which replaces the ``user_id`` of every
event (whoever logs it) with `user_ref` of it.  ``stcs user-ref ID`` prints the reference of an
id, for an operator who wants that user's lines.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import sys
import time
from typing import Any, TextIO

import orjson
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


class _Stream:
    """The log destination behind a stable object: `reopen` swaps the file beneath every
    logger (stcs's own and the standard library's) without reconfiguring them."""

    def __init__(self, target: TextIO) -> None:
        self.target = target

    def write(self, text: str) -> int:
        return self.target.write(text)

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return self.target.isatty()


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's fast writer, carrying the logger name for ``add_logger_name``."""

    def __init__(self, file: Any, name: str) -> None:
        super().__init__(file)
        self.name = name


USER_REF_PREFIX = "u-"
USER_REF_HEX = 16  # 64 bits of SHA-256: no collisions in practice, nothing to read back


@functools.lru_cache(maxsize=4096)  # on every request line: hash each user once
def user_ref(user_id: str) -> str:
    """The reference logged for ``user_id`` in UUID mode: ``"u-"`` + the first 16 hex digits
    of SHA-256 of its UTF-8 bytes (``u-1f0a...``).

    Not reversible: a version-4 UUID has 122 random bits, far beyond any search; equal ids give
    equal references, so one user's lines can still be followed.
    """
    digest = hashlib.sha256(user_id.encode()).hexdigest()
    return f"{USER_REF_PREFIX}{digest[:USER_REF_HEX]}"


# Admin paths name users (/admin/users/{userId}/block, /admin/instances/{userId}).
_ADMIN_PATH_PREFIX = "/admin"
_UUID_IN_TEXT = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


def hide_user_ids(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor (UUID mode): replace a string ``user_id`` with its `user_ref`, and
    each UUID in an admin request's ``path`` with the reference of its lowercase form (the
    user the admin call acts on, `stcs.auth.normalize_user_id`)."""
    user_id = event.get("user_id")
    if isinstance(user_id, str):
        event["user_id"] = user_ref(user_id)
    path = event.get("path")
    if isinstance(path, str) and path.startswith(_ADMIN_PATH_PREFIX):
        event["path"] = _UUID_IN_TEXT.sub(lambda m: user_ref(m.group().lower()), path)
    return event


def configure(
    level: str = "info",
    log_file: str = "",
    *,
    json: bool | None = None,
    user_ids_are_secret: bool = False,
) -> None:
    """Route all logging to ``log_file`` (appended) or standard output.

    stcs's own events go through structlog's native pipeline (no stdlib record per line: the
    request line is on the hot path); other libraries' stdlib records are rendered the same
    way by a `ProcessorFormatter`.  ``level`` is a `LEVELS` name.  ``json`` None picks JSON
    unless the stream is a terminal.  ``user_ids_are_secret`` (UUID mode: the id is the
    token) logs `user_ref` of every ``user_id`` instead.  The file is created with the process's
    umask (``stcs serve``: 0600).  Raises OSError when ``log_file`` cannot be opened.
    """
    global _stream, _log_file
    target: TextIO = open(log_file, "a", buffering=1, encoding="utf-8") if log_file else sys.stdout  # noqa: SIM115
    _stream, _log_file = _Stream(target), log_file
    as_json = (not target.isatty()) if json is None else json
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        *([hide_user_ids] if user_ids_are_secret else []),
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _timestamp,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=target.isatty())
    )
    exc_info: Any = structlog.processors.format_exc_info if as_json else _identity
    stream = _stream
    structlog.configure(
        processors=[*shared, exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=lambda *args: _NamedWriteLogger(stream, str(args[0]) if args else "stcs"),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, exc_info, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
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


_stream: _Stream | None = None
_log_file = ""


def reopen() -> None:
    """Reopen ``logFile`` (after logrotate moved it): called on SIGHUP.  No-op on stdout."""
    if _stream is None or not _log_file:
        return
    try:
        target = open(_log_file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        structlog.get_logger("stcs").error("cannot reopen log file", error=str(exc))
        return
    old, _stream.target = _stream.target, target
    old.close()
    structlog.get_logger("stcs").info("log file reopened")


_second: tuple[int, str] = (0, "")


def _timestamp(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """``timestamp``: ISO 8601, UTC, microseconds (``2026-11-21T14:51:04.573126Z``), as
    structlog's ``TimeStamper(fmt="iso", utc=True)`` writes it, at about a third of its cost
    (callgrind): the date and time of day are formatted once a second."""
    global _second
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    event["timestamp"] = f"{_second[1]}.{int((now - whole) * 1_000_000):06d}Z"
    return event


def _dumps(obj: Any, **kw: Any) -> str:
    """JSON via orjson: the request line costs about a third less than with the standard
    library's json (docs/benchmarks.md).  ``kw`` carries structlog's ``default`` fallback."""
    return orjson.dumps(obj, **kw).decode()


def _identity(_logger: Any, _name: str, event: Any) -> Any:
    return event
