"""Logging: structlog on top of the standard library, so stcs's events and aiohttp's own
messages share one stream and one format.

JSON lines when the output is not a terminal (or goes to ``logFile``), readable console output on
one.  Event names are short lowercase phrases; data goes in keys; request context (request id,
user id, ...) comes from contextvars.  Tokens and keys are never passed to a logger.

In UUID mode (no ``authServerEndpoint``) a user id *is* the user's token, so it must not be
logged either: `configure` then installs `hide_user_ids`, which replaces the ``user_id`` of every
event (whoever logs it) with `user_ref` of it.  ``stcs user-ref ID`` prints the reference of an
id, for an operator who wants that user's lines.

A client must not be able to fill the disk through the log (docs/security.md, "Log
flooding"): every value a client chooses (`CLIENT_KEYS`: path, client address from
``X-Forwarded-For``, ...) is clipped to `CLIENT_VALUE_MAX` characters and escaped by
`clip_client_values`, and the lines of requests refused before a user is known go through a
per-address budget, `RefusalLog`.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import hashlib
import importlib.util
import logging
import re
import sys
import time
from collections.abc import Callable
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


# Event keys whose values a client chooses (relay and control plane): the request target's path,
# the client address (an X-Forwarded-For entry, when the peer is a trusted proxy), the method
# and a refusal's reason (parser messages).  Each maps to the key that carries the original
# length when the value is clipped.
CLIENT_KEYS = {key: f"{key}_len" for key in ("path", "client", "method", "reason")}
CLIENT_VALUE_MAX = 256  # characters of a client-chosen value kept in a log line
_CLIPPED = "\u2026"  # the marker ending a clipped value


def clip_text(text: str, limit: int = CLIENT_VALUE_MAX) -> str:
    """``text`` fit for one log line: characters a terminal or a line-oriented reader would act
    on (controls, C1 controls, line and paragraph separators; `str.isprintable`) escaped as
    Python's ``unicode_escape`` writes them (``\\n``, ``\\x1b``), then cut to ``limit``
    characters with an ``…`` ending when longer."""
    head = text[: limit + 1]  # escaping the first limit + 1 characters is all that can show
    if not head.isprintable():
        head = head.encode("unicode_escape").decode("ascii")
    if len(head) > limit or len(text) > limit:
        return head[:limit] + _CLIPPED
    return head


def clip_client_values(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: clip and escape each client-chosen value (`CLIENT_KEYS`) with
    `clip_text`; a value longer than `CLIENT_VALUE_MAX` gets ``<key>_len``, its length in
    characters (bytes, for the relay's Latin-1 decoded path).

    On every line (the request line is on the hot path): a dict lookup, a length check and
    ``isprintable`` per key in the common case."""
    for key, length_key in CLIENT_KEYS.items():
        value = event.get(key)
        if value.__class__ is str and (len(value) > CLIENT_VALUE_MAX or not value.isprintable()):
            event[key] = clip_text(value)
            if len(value) > CLIENT_VALUE_MAX:
                event[length_key] = len(value)
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
    set_level(level)
    target: TextIO = open(log_file, "a", buffering=1, encoding="utf-8") if log_file else sys.stdout  # noqa: SIM115
    _stream, _log_file = _Stream(target), log_file
    as_json = (not target.isatty()) if json is None else json
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        *([hide_user_ids] if user_ids_are_secret else []),
        clip_client_values,  # after hide_user_ids: no id is cut in two, half of it shown
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _timestamp,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if as_json
        else structlog.dev.ConsoleRenderer(
            colors=target.isatty(), exception_formatter=_console_traceback()
        )
    )
    exc_info: Any = structlog.processors.format_exc_info if as_json else _identity
    stream = _stream
    structlog.configure(
        processors=[_native_chain(shared, exc_info), renderer],
        # The level is checked by `_native_chain`, not by the wrapper class: loggers are
        # cached on first use with their class, so a class-level filter could not change on
        # SIGHUP (`set_level`).  Below DEBUG nothing is ever logged.
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
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
            first = exc.message.splitlines()[0] if exc.message else type(exc).__name__
            record.args = (clip_text(first),)  # aiohttp quotes the offending bytes
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_stream: _Stream | None = None
_log_file = ""
_min_level = logging.INFO
_METHOD_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


def set_level(level: str) -> None:
    """Log ``level`` (a `LEVELS` name) and above from now on, structlog and stdlib alike (at
    start and on SIGHUP: ``logLevel`` is reloadable)."""
    global _min_level
    _min_level = LEVELS[level]
    logging.getLogger().setLevel(_min_level)


def _console_traceback() -> Any:
    """structlog's console traceback without the frames' local variables (its default, rich's,
    shows them: in UUID mode a user id is the user's token, and tokens and keys sit in
    locals)."""
    if importlib.util.find_spec("rich") is not None:  # what structlog's default picks
        return structlog.dev.RichTracebackFormatter(show_locals=False)
    return structlog.dev.plain_traceback


def _native_chain(shared: list[Any], exc_info: Any) -> Any:
    """The processors of stcs's own events before the renderer, as one processor: the level
    check (an event below `set_level`'s level is dropped; stdlib records were filtered by their
    logger's level already), then ``shared`` — the very list stdlib records go through
    (context, `hide_user_ids`, `clip_client_values`, level, logger name, timestamp: what hides
    and clips is written once, for both) — and ``exc_info`` (structlog's ``format_exc_info``)
    only for an event that carries one.

    The request line is written once per request: its level check and ``shared`` run in one
    call from structlog's processor loop, and the exception formatter only when needed (issue
    24: 79k → 76k instructions a line, callgrind; structlog's own call and renderer are ~49k
    of them).
    """
    steps = tuple(shared)
    levels = _METHOD_LEVELS

    def prepare(logger: Any, method: str, event: Any) -> Any:
        if levels.get(method, logging.INFO) < _min_level:
            raise structlog.DropEvent
        for step in steps:
            event = step(logger, method, event)
        if "exc_info" in event:
            event = exc_info(logger, method, event)
        return event

    return prepare


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


class RefusalLog:
    """How many lines the requests refused before a user is known may write: a token bucket
    per client address (``per_second`` lines a second, bursts of `BURST_SECONDS` times that),
    and one for all addresses together (`TOTAL_FACTOR` times the per-address one, so a client
    with many addresses, IPv6 for one, gains nothing past it).

    The buckets are kept for at most ``max_clients`` addresses (least recently refused first
    out: an address that comes back starts with a full bucket, which the total bucket bounds).
    A refusal not logged is counted, by address and status, and written as one ``requests not
    logged`` line (level warning) ``interval_s`` after the first of them, when ``loop`` is
    given, or at `flush`.  ``per_second`` 0 logs every refusal.  ``clock`` gives seconds
    (monotonic).  Source of the rule: nginx ``limit_req`` logs rejections at its own rate;
    issue 18 item 4 (≤ 1.5 KB of log per refused request).
    """

    BURST_SECONDS = 4  # a burst is this many seconds' worth of lines
    TOTAL_FACTOR = 10  # all addresses together: this many addresses' worth
    SUMMARY_CLIENTS = 20  # addresses listed by name in a summary line (most refusals first)
    CLIENT_KEY_MAX = 64  # characters of an address kept as a key (an IPv6 address is ≤ 45)

    def __init__(
        self,
        per_second: float,
        interval_s: float,
        *,
        max_clients: int = 4096,
        loop: asyncio.AbstractEventLoop | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_second = per_second
        self.burst = max(1.0, per_second * self.BURST_SECONDS)
        self.interval_s = interval_s
        self.max_clients = max_clients
        self._loop = loop
        self._clock = clock
        # address -> [tokens, last refill (clock s)]; ordered least recently refused first
        self._buckets: collections.OrderedDict[str, list[float]] = collections.OrderedDict()
        self._total = [self.burst * self.TOTAL_FACTOR, clock()]
        # address -> status -> lines not logged; at most max_clients addresses, then "other"
        self._dropped: dict[str, collections.Counter[int]] = {}
        self._dropped_since = 0.0
        self._summary: asyncio.TimerHandle | None = None
        self._log = structlog.get_logger("stcs.log")

    def admit(self, client: str | None, status: int) -> bool:
        """Whether the line of a refusal (``status``) for ``client`` (an address, None when
        unknown) is to be written; when not, it is counted for the next summary."""
        if not self.per_second:
            return True
        key = "-" if client is None else client[: self.CLIENT_KEY_MAX]
        now = self._clock()
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_clients:
                buckets.popitem(last=False)
            bucket = buckets[key] = [self.burst, now]
        else:
            buckets.move_to_end(key)
        total = self._total
        if (
            _refill(bucket, now, self.per_second, self.burst) >= 1
            and _refill(
                total, now, self.per_second * self.TOTAL_FACTOR, self.burst * self.TOTAL_FACTOR
            )
            >= 1
        ):
            bucket[0] -= 1
            total[0] -= 1
            return True
        self._count(key, status, now)
        return False

    def _count(self, key: str, status: int, now: float) -> None:
        dropped = self._dropped
        if not dropped:
            self._dropped_since = now
            if self._loop is not None and self._summary is None:
                # In a context of its own: not the refused request's (its request_id).
                self._summary = self._loop.call_later(
                    self.interval_s, self.flush, context=contextvars.Context()
                )
        counts = dropped.get(key)
        if counts is None:
            if len(dropped) >= self.max_clients:
                key = "other"
                counts = dropped.get(key)
            if counts is None:
                counts = dropped[key] = collections.Counter()
        counts[status] += 1

    def flush(self) -> None:
        """Write the ``requests not logged`` line for what was counted, if anything:
        ``count``, ``statuses`` (status -> count), ``clients`` (address -> status -> count,
        the `SUMMARY_CLIENTS` addresses with most), ``other_clients`` (addresses not listed)
        and ``since_s`` (seconds since the first of them)."""
        if self._summary is not None:
            self._summary.cancel()
            self._summary = None
        dropped, self._dropped = self._dropped, {}
        if not dropped:
            return
        totals = collections.Counter[int]()
        for counts in dropped.values():
            totals.update(counts)
        top = sorted(dropped.items(), key=lambda item: -item[1].total())[: self.SUMMARY_CLIENTS]
        self._log.warning(
            "requests not logged",
            count=totals.total(),
            statuses={str(status): n for status, n in sorted(totals.items())},
            clients={
                clip_text(client): {str(status): n for status, n in sorted(counts.items())}
                for client, counts in top
            },
            other_clients=len(dropped) - len(top),
            since_s=round(self._clock() - self._dropped_since, 1),
        )


def _refill(bucket: list[float], now: float, rate: float, size: float) -> float:
    """Refill a token bucket (``[tokens, last refill]``) at ``rate`` a second up to ``size``
    for the time since its last refill; return its tokens."""
    tokens = bucket[0] = min(size, bucket[0] + (now - bucket[1]) * rate)
    bucket[1] = now
    return tokens
