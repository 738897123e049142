"""The data plane: stcs's own HTTP/1.1 listener, relaying requests to the users' chroma servers.

In the manner of uvicorn's ``httptools_impl``: an `asyncio.Protocol` per client connection,
``httptools.HttpRequestParser`` (llhttp, strict: CL+TE, duplicate Content-Length, bad chunks and
obs-fold are parse errors) on the client side, `stcs.upstream` (``HttpResponseParser``) on the
chroma side.  Per request it does only what it must: parse the head, resolve the token (a cache
hit is a dict lookup), take a lease on the user's instance incarnation, relay head and body with
back-pressure both ways, write one log line and the metrics.

Header bytes pass through unchanged (never decoded and re-encoded); hop-by-hop headers (RFC 9110
§7.6.1) and the client's credentials are dropped.  Requests are served one at a time per
connection, pipelined ones in order (reading pauses while one is served).

Control-plane paths (``/admin-health``, ``/admin/*``, ``/metrics``, other methods on
``/health`` and ``/auth``) are relayed over a private unix socket to the aiohttp application
(`stcs.app`), unchanged; ``GET /health`` and ``GET /auth`` are answered here (``/auth`` is on
nginx's ``auth_request`` path, once per request in cluster mode).  A body is never asked for
or read for a control path that would refuse it (no admin key, or a route that takes none).

Log lines carry client-chosen values clipped (`stcs.log.clip_client_values`); the lines of
requests refused before a user is known are limited per client address (`Relay.refusals`).

The edge is bounded by settings (docs in README): ``headersTimeout`` (head, 408),
``bodyTimeout`` (pause in a body, 408, lease released), ``keepAliveTimeout``,
``maxHeaderSize`` and ``maxHeadersCount`` (431), ``maxConnections`` (503), ``maxBodySize``
(413).  Every refusal is chroma's JSON error shape; after a framing error the connection closes.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import itertools
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import httptools
import orjson
import structlog

from stcs.answers import UNEXPECTED, ErrorAnswer, answer_for, status_of
from stcs.auth import TOKEN_HEADER, validate_user_id, verify_admin_key
from stcs.auth import extract_token as _extract_token
from stcs.config import Networks, Settings
from stcs.errors import (
    BadRequestError,
    BodyTooLargeError,
    HeadTooLargeError,
    RequestError,
    RequestTimeoutError,
    ShuttingDownError,
    TooManyConnectionsError,
    UnsupportedCodingError,
    UpstreamError,
    UserBlockedError,
)
from stcs.log import RefusalLog
from stcs.quotas import Admission
from stcs.state import State
from stcs.upstream import UnixTarget, UnreachableError, UpstreamFailedError, UpstreamResponse

log = structlog.get_logger("stcs.relay")

# RFC 9110 §7.6.1 (and RFC 2616 §13.5.1's list, which proxies still honour).
HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    )
)
# Not relayed to chroma: the client's credentials (a token must never leave stcs), Host and the
# framing headers (set from the body actually sent), Expect (answered here).
REQUEST_DROP = HOP_BY_HOP | {b"authorization", b"x-chroma-token", b"host", b"expect"}
REQUEST_DROP_FRAMING = REQUEST_DROP | {b"content-length"}
RESPONSE_DROP = HOP_BY_HOP
RESPONSE_DROP_FRAMING = HOP_BY_HOP | {b"content-length"}
# To the control plane the credentials go on (the admin key may come as a Bearer token).
CONTROL_DROP = HOP_BY_HOP | {b"host", b"expect", b"content-length"}

# Bodies up to this size (bytes) with a Content-Length are read whole *before* an instance is
# leased, and go upstream with the head in one write; larger and chunked ones are streamed.
SMALL_BODY = 64 * 1024
# Unconsumed request body above this (bytes) pauses reading from the client.
BODY_HIGH_WATER = 256 * 1024
# What the parser is fed at a time outside a Content-Length body (bytes), and how many requests
# may be parsed ahead of the one being served: past either bound the rest of a read waits as raw
# bytes (`ClientConnection.backlog`, reading paused), so a read of thousands of tiny pipelined
# requests costs that read, not thousands of parsed requests (~1 KB each).
FEED_SLICE = 1024
CHUNKED_SLICE = 8192  # inside a chunked body: a 20 MB upload costs ~2,500 parser calls
MAX_PIPELINED = 8
# Body pieces smaller than this are gathered into one buffer instead of kept one by one: a
# body in tiny chunks costs its size, not an object per chunk (bytes).
PIECE_GATHER = 4096
# After a refusal, how long stcs reads and discards what the client still sends before closing.
LINGER_S = 2.0
CONTROL_PATHS = (b"/admin-health", b"/metrics")
_OWN_PATHS = (b"/health", b"/ready", b"/auth")  # other methods: the control plane answers 405
# Own paths that take no request body, whatever the method (every route on them is GET), and
# methods no admin route reads a body of (stcs.app, stcs.admin): such a body is refused (413)
# before any of it is asked for or read.
_BODILESS_PATHS = (*_OWN_PATHS, *CONTROL_PATHS)
_BODILESS_METHODS = (b"GET", b"HEAD", b"DELETE", b"OPTIONS")

_REQUEST_IDS = itertools.count(1)
_ID_PREFIX = os.urandom(4).hex()  # this process's requests: unique across restarts
_STATUS_CLOSE = {408, 413, 431, 400, 501}
_FAULTS = (500, 502)  # never held back by the refusals' log budget


def next_request_id() -> str:
    """A request id unique within and across runs (a random per-process prefix and a counter;
    cheaper than a UUID on the hot path)."""
    return f"{_ID_PREFIX}{next(_REQUEST_IDS):08x}"


def _response_head(
    status: int, reason: bytes, headers: list[tuple[bytes, bytes]], close: bool
) -> bytes:
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    parts.extend(b"%s: %s\r\n" % pair for pair in headers)
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def json_response(status: int, reason: bytes, body: bytes, close: bool, extra: Any = ()) -> bytes:
    headers = [(b"Content-Type", b"application/json"), (b"Content-Length", b"%d" % len(body))]
    headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in extra)
    return _response_head(status, reason, headers, close) + body


# Reason phrases (RFC 9110 §15), fixed here: Python's HTTPStatus renames some across versions.
_REASONS = {
    200: b"OK",
    204: b"No Content",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    422: b"Unprocessable Content",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
}


def error_response(exc: RequestError, close: bool) -> bytes:
    """The whole response for ``exc`` as `stcs.answers` maps it: status, ``Retry-After``,
    chroma's JSON error body."""
    return answer_response(answer_for(exc), close)


def answer_response(answer: ErrorAnswer, close: bool) -> bytes:
    status = answer.status
    return json_response(status, _REASONS.get(status, b"Error"), answer.body, close, answer.headers)


def filter_headers(
    pairs: list[tuple[bytes, bytes]], drop: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """``pairs`` without ``drop`` (lowercase names) and those a ``Connection`` header names
    (RFC 9110 §7.6.1)."""
    named = [v for k, v in pairs if len(k) == 10 and k.lower() == b"connection"]
    if named:
        drop = drop | {t.strip().lower() for v in named for t in v.split(b",")}
    return [(k, v) for k, v in pairs if k.lower() not in drop]


def client_address(peer: str | None, forwarded: list[bytes], trusted: Networks) -> str | None:
    """The client's address: the peer, or, when the peer is a trusted front proxy, the
    right-most ``X-Forwarded-For`` entry that is not itself a trusted proxy."""
    if not trusted or peer is None or not _is_trusted(peer, trusted):
        return peer
    hops = [h.strip().decode("latin-1") for v in forwarded for h in v.split(b",")]
    hops = [h for h in hops if h]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def _is_trusted(address: str, trusted: Networks) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def extract_token(headers: dict[bytes, bytes]) -> str:
    """The client's token from the lowercase-keyed ``headers``: ``X-Chroma-Token``, else
    ``Authorization: Bearer``.  Same rules as `stcs.auth.extract_token` (AuthError)."""
    view: dict[str, str] = {}
    raw = headers.get(b"x-chroma-token")
    if raw is not None:
        view[TOKEN_HEADER] = raw.decode("latin-1")
    auth = headers.get(b"authorization")
    if auth is not None:
        view["Authorization"] = auth.decode("latin-1")
    return _extract_token(view)


class _Message:
    """One request as parsed: head, then body chunks as they arrive."""

    __slots__ = (
        "body",
        "body_error",
        "buffered",
        "chunked",
        "complete",
        "content_length",
        "expect_continue",
        "forwarded",
        "headers",
        "keep_alive",
        "method",
        "more",
        "received",
        "reject",
        "special",
        "url",
        "version",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.special: dict[bytes, bytes] = {}  # lowercase name -> value, for the few we read
        self.forwarded: list[bytes] = []
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.reject: RequestError | None = None
        self.body: collections.deque[bytes | bytearray] = collections.deque()
        self.buffered = 0
        self.received = 0
        self.complete = False
        self.body_error: RequestError | None = None
        self.more: asyncio.Event | None = None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


_SPECIAL = frozenset(
    (
        b"x-chroma-token",
        b"authorization",
        b"content-length",
        b"transfer-encoding",
        b"expect",
        b"upgrade",
        b"x-api-key",
    )
)


class Relay:
    """The data plane of one stcs process: builds a `ClientConnection` per accepted socket.

    ``control_socket`` is the unix socket path the aiohttp control application listens on.
    """

    def __init__(self, state: State, control_socket: str) -> None:
        self.state = state
        settings: Settings = state.settings
        self.settings = settings
        self.control = UnixTarget(control_socket)
        self.connections: set[ClientConnection] = set()
        self.head_timeout = settings.headers_timeout / 1000
        self.send_timeout = settings.send_timeout / 1000
        self.body_timeout = settings.body_timeout / 1000
        self.keepalive_timeout = settings.keep_alive_timeout / 1000
        self.trusted = settings.trusted_networks
        # Lines of requests refused before a user is known: a budget per client address.
        self.refusals = RefusalLog(
            settings.log_refusals_per_second,
            settings.log_refusals_summary_interval / 1000,
            loop=asyncio.get_running_loop(),
        )

    def __call__(self) -> ClientConnection:
        return ClientConnection(self)

    def close_idle(self) -> None:
        """Close every connection that is not serving a request (at shutdown, once
        ``State.shutting_down`` is set: busy ones close after their answer)."""
        for conn in list(self.connections):
            if conn.active is None:
                conn.close()

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.abort()
        self.refusals.flush()


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests, serves them in order, enforces the edge limits."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.state = relay.state
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.msg: _Message | None = None  # the message being parsed
        self.active: _Message | None = None  # the message being served
        self.task: asyncio.Task[None] | None = None
        self.pipeline: collections.deque[_Message] = collections.deque()
        self.backlog = b""  # read but not parsed yet (see FEED_SLICE); reading paused meanwhile
        self.eof = False  # the client half-closed after complete requests: answer, then close
        self.probed = False  # after the half-close, an interim answer was sent (`check_gone`)
        self.feeding = False
        self.in_head = False
        self.head_bytes = 0
        self.stopped = False  # no more parsing: a framing error or a refusal that closes
        self.lingering = False  # answered and closing: what the client still sends is discarded
        self.closed = False
        self.reading_paused = False
        self.timer: asyncio.TimerHandle | None = None
        self.send_timer: asyncio.TimerHandle | None = None  # armed while the client reads nothing
        self.waiting_to_serve = False  # a response done, the next waits for the client to read
        self.pending_refusal: RequestError | None = None  # answered once the current request ends
        self.held: list[bytes] | None = None  # a request's answer, until its line is logged
        self.unpaid = 0  # bytes of the current message since its last body byte (trailers...)
        self.writable = asyncio.Event()
        self.writable.set()

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        relay = self.relay
        if len(relay.connections) >= relay.settings.max_connections:
            exc = TooManyConnectionsError("too many connections; retry later", retry_after_s=1)
            self.transport.write(error_response(exc, close=True))
            self.transport.close()
            self.closed = True
            if relay.refusals.admit(self.peer, 503):
                log.warning("connection refused", reason="maxConnections", client=self.peer)
            return
        relay.connections.add(self)
        # Until the first byte, the head timeout applies (as nginx's client_header_timeout).
        self._set_timer(relay.head_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay.connections.discard(self)
        self._cancel_timer()
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None
        self.writable.set()
        msg = self.active
        if msg is not None and msg.more is not None:
            msg.more.set()
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client left: stop its request (logged as 499)

    def data_received(self, data: bytes) -> None:
        if self.stopped or self.closed:
            return  # refused or lingering: discarded
        if self.backlog:  # parsing is held back (reading is paused: the read in progress)
            self.backlog += data
            return
        self._feed(data)

    def _parsed_enough(self) -> bool:
        """Whether to parse no further for now: enough requests wait behind the one being
        served, or the body being received is over its high-water mark."""
        msg = self.msg
        return len(self.pipeline) >= MAX_PIPELINED or (
            msg is not None and msg.buffered > BODY_HIGH_WATER
        )

    def _feed(self, data: bytes) -> None:
        """Parse ``data`` a slice at a time (a Content-Length body in one piece), keeping what
        is left as `backlog` once `_parsed_enough`; `_update_reading` feeds it later.  Slices
        are views: nothing is copied but a backlog."""
        self.feeding = True
        view = memoryview(data)
        offset, end = 0, len(data)
        try:
            while offset < end:
                if self.stopped or self.closed:
                    return
                if self._parsed_enough():
                    self.backlog = bytes(view[offset:])
                    return
                msg = self.msg
                size = FEED_SLICE
                if msg is not None and not self.in_head:
                    if msg.content_length is not None:
                        size = max(size, msg.content_length - msg.received)
                    else:  # chunked: bigger slices (fewer calls), still few requests behind
                        size = CHUNKED_SLICE
                self._parse(view[offset : offset + size])
                offset += size
        finally:
            view.release()
            self.feeding = False
            self._update_reading()

    def _parse(self, data: memoryview) -> None:
        if self.active is None and not self.in_head and self.msg is None:
            # First bytes of a new request on an idle connection: now the head timeout runs.
            self._set_timer(self.relay.head_timeout, self._head_timed_out)
        if self.msg is None or self.in_head:
            self.head_bytes += len(data)
        else:
            self.unpaid += len(data)  # reset by on_body: trailers and chunk extensions only
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # CONNECT or Upgrade: refused in on_headers_complete; nothing after it is read.
            self._stop_reading()
        except httptools.HttpParserError as exc:
            self._framing_error(str(exc))
            return
        if self.unpaid > self.relay.settings.max_header_size + SMALL_BODY and not self.stopped:
            self._framing_error("trailer section or chunk extensions too large")
            return
        if self.in_head and self.head_bytes > self.relay.settings.max_header_size:
            self._refuse_head(
                HeadTooLargeError(
                    f"request head over the limit of {self.relay.settings.max_header_size} bytes"
                )
            )

    def pause_writing(self) -> None:
        """The client's socket buffer is full: read no more requests, and give it
        ``sendTimeout`` to read before the connection is aborted."""
        self.writable.clear()
        self._update_reading()
        if self.send_timer is None:
            self.send_timer = self.loop.call_later(self.relay.send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        self.writable.set()
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None
        if self.waiting_to_serve and self.active is None and not self.closed:
            self.waiting_to_serve = False
            self._next()
        self._update_reading()

    def _send_timed_out(self) -> None:
        self.send_timer = None
        log.info(
            "client stopped reading",
            client=self.peer,
            send_timeout_ms=self.relay.settings.send_timeout,
        )
        self._abort()

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.stopped:
            return
        self.msg = _Message()
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        msg = self.msg
        if msg is not None and not self.stopped:
            msg.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        msg = self.msg
        if msg is None or self.stopped or not self.in_head:
            return  # trailer fields are dropped (RFC 9110 §6.5.1), never merged into the head
        msg.headers.append((name, value))
        lower = name.lower()
        if lower in _SPECIAL:
            if lower in msg.special and lower != b"content-length":
                # Two tokens, two Expect, ...: ambiguous, refused (llhttp refuses CL twice).
                msg.reject = msg.reject or BadRequestError(
                    f"duplicate {name.decode('latin-1')} header"
                )
            msg.special[lower] = value
        elif lower == b"x-forwarded-for":
            msg.forwarded.append(value)

    def on_headers_complete(self) -> None:
        msg = self.msg
        if msg is None or self.stopped:
            return
        self.in_head = False
        self.head_bytes = 0
        self._cancel_timer()
        parser = self.parser
        msg.method = parser.get_method()
        msg.version = parser.get_http_version()
        # HTTP/1.0 clients get their answer and the connection closes (no 1.0 keep-alive).
        msg.keep_alive = msg.version == "1.1" and parser.should_keep_alive()
        self._check_head(msg)
        if self.active is None:
            self._serve(msg)
        else:
            self.pipeline.append(msg)
            self._update_reading()

    def on_body(self, body: bytes) -> None:
        msg = self.msg
        if msg is None or self.stopped or msg.reject is not None:
            return
        self.unpaid = 0
        msg.received += len(body)
        if msg.received > self.relay.settings.max_body_size:
            if msg.body_error is None:
                msg.body_error = BodyTooLargeError(
                    f"request body exceeds the limit of {self.relay.settings.max_body_size} bytes"
                )
                self.stopped = True
                self._stop_reading()
            if msg.more is not None:
                msg.more.set()
            return
        pieces = msg.body
        if len(body) < PIECE_GATHER:
            last = pieces[-1] if pieces else None
            if isinstance(last, bytearray) and len(last) < PIECE_GATHER:
                last += body
            else:
                pieces.append(bytearray(body))
        else:
            pieces.append(body)
        msg.buffered += len(body)
        if msg.more is not None:
            msg.more.set()
        if msg.buffered > BODY_HIGH_WATER:
            self._update_reading()

    def on_message_complete(self) -> None:
        msg = self.msg
        if msg is None or self.stopped:
            return
        msg.complete = True
        self.msg = None
        if msg.more is not None:
            msg.more.set()

    # -- head checks ------------------------------------------------------------------------

    def _check_head(self, msg: _Message) -> None:
        """Refusals decided by the head alone (answered in order, then the connection closes)."""
        settings = self.relay.settings
        # The head as sent, give or take optional whitespace: request line and header lines.
        size = (
            len(msg.method) + len(msg.url) + 12 + sum(len(k) + len(v) + 4 for k, v in msg.headers)
        )
        if msg.reject is not None:
            pass
        elif size > settings.max_header_size:
            msg.reject = HeadTooLargeError(
                f"request head over the limit of {settings.max_header_size} bytes"
            )
        elif msg.version not in ("1.0", "1.1"):
            msg.reject = BadRequestError(f"HTTP/{msg.version} is not supported")
        elif len(msg.headers) > self.relay.settings.max_headers_count:
            msg.reject = HeadTooLargeError(
                f"more than {self.relay.settings.max_headers_count} header lines"
            )
        elif msg.method == b"CONNECT" or b"upgrade" in msg.special:
            msg.reject = BadRequestError(f"{msg.method.decode()} / Upgrade is not supported")
        elif not msg.url.startswith(b"/"):
            msg.reject = BadRequestError("request target must be a path (origin-form)")
        else:
            te = msg.special.get(b"transfer-encoding")
            if te is not None:
                if te.strip().lower() != b"chunked":
                    msg.reject = UnsupportedCodingError(
                        "only the chunked transfer coding is supported"
                    )
                msg.chunked = True
            cl = msg.special.get(b"content-length")
            if cl is not None:
                msg.content_length = int(cl)  # llhttp accepted it: digits only
                if msg.content_length > self.relay.settings.max_body_size:
                    msg.reject = BodyTooLargeError(
                        f"request body of {msg.content_length} bytes exceeds the limit of "
                        f"{self.relay.settings.max_body_size} bytes"
                    )
            expect = msg.special.get(b"expect")
            if expect is not None:
                if expect.strip().lower() == b"100-continue":
                    msg.expect_continue = msg.version == "1.1"
                else:
                    msg.reject = BadRequestError("unsupported Expect")  # RFC 9110 §10.1.1: 417
        if msg.reject is not None:
            # Its body (if any) is not read: nothing after this request can be trusted.
            self.stopped = True
            self._stop_reading()

    # -- serving ----------------------------------------------------------------------------

    def _serve(self, msg: _Message) -> None:
        self.active = msg
        msg.more = asyncio.Event()
        self.task = self.loop.create_task(self._run(msg))

    async def _run(self, msg: _Message) -> None:
        state = self.state
        started = time.monotonic()
        request_id = next_request_id()
        # This task's context is a copy of the one that started it (the request before it on
        # this connection): nothing of that request may reach this one's log lines.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        info: dict[str, Any] = {"user_id": None, "cold_start": False, "upstream_port": None}
        status = 500
        state.in_flight += 1
        state.idle.clear()
        close = False
        self.held = []
        try:
            status, close = await self._handle(msg, info)
        except asyncio.CancelledError:
            status = 499  # the client left (nginx's convention)
            close = True
        except Exception:
            log.exception("request failed")
            status = 500
            close = True
            if not self.closed and not info.get("response_started"):
                self._write(answer_response(UNEXPECTED, close=True))
        finally:
            state.in_flight -= 1
            if not state.in_flight:
                state.idle.set()
            duration = time.monotonic() - started
            method = msg.method.decode("latin-1")
            state.metrics.observe_request(method, status, duration)
            info.pop("response_started", None)
            client = client_address(self.peer, msg.forwarded, self.relay.trusted)
            # Refused before a user is known: within the address's line budget (log.RefusalLog).
            # stcs's own faults (500, 502) are always written: the operator must see each one.
            if (
                info["user_id"] is not None
                or status < 400
                or status in _FAULTS
                or self.relay.refusals.admit(client, status)
            ):
                log.info(
                    "request",
                    request_id=request_id,
                    method=method,
                    path=msg.url.partition(b"?")[0].decode("latin-1"),
                    status=status,
                    duration_ms=round(duration * 1000, 2),
                    client=client,
                    **info,
                )
        self._send_held()
        self._done(msg, close)

    def _done(self, msg: _Message, close: bool) -> None:
        """After a response: next pipelined request, keep-alive wait, or close."""
        self.active = None
        self.task = None
        self.unpaid = 0
        if self.closed:
            return
        if self.pending_refusal is not None:  # a later request was refused while this one ran
            self._write(error_response(self.pending_refusal, close=True))
            self.close()
            return
        if self.eof and not self.pipeline and not self.backlog:
            self._end_linger()  # nothing more can arrive: close once this answer is written
            return
        if close or not msg.keep_alive or not msg.complete or self.state.shutting_down:
            # An unread (or half-read) body leaves the stream unparseable: close.
            self.close()
            return
        if not self.writable.is_set():
            # The client has not read this answer yet: serve nothing more until it does.
            self.waiting_to_serve = True
            self._update_reading()
            return
        self._next()

    def _next(self) -> None:
        """Serve the next pipelined request, or wait for one (head or keep-alive timer)."""
        if self.pipeline:
            self._serve(self.pipeline.popleft())
        elif self.msg is not None and self.in_head:
            self._set_timer(self.relay.head_timeout, self._head_timed_out)
        else:
            self._set_timer(self.relay.keepalive_timeout, self._idle_timed_out)
        self._update_reading()

    def _idle_timed_out(self) -> None:
        self.timer = None
        if self.active is None and self.msg is None:
            self._end_linger()  # nothing pending: a plain close
        else:
            self.close()

    async def _handle(self, msg: _Message, info: dict[str, Any]) -> tuple[int, bool]:
        """Serve ``msg``; return (status for the log, close the connection after it)."""
        if msg.reject is not None:
            exc = msg.reject
            self._write(error_response(exc, close=True))
            return status_of(exc), True
        path = msg.url.partition(b"?")[0]
        method = msg.method
        if path == b"/health" and method in (b"GET", b"HEAD") and not msg.has_body:
            return self._health(msg), False
        if path == b"/ready" and method in (b"GET", b"HEAD") and not msg.has_body:
            return self._ready(msg), False
        if path == b"/auth" and method == b"GET" and not msg.has_body:
            return await self._auth(msg, info)
        try:
            if path in CONTROL_PATHS or path.startswith(b"/admin/") or path in _OWN_PATHS:
                return await self._control(msg, info)
            return await self._proxy(msg, info)
        except RequestError as exc:
            status = status_of(exc)
            if info.get("response_started"):
                self._abort()
                return status, True
            close = status in _STATUS_CLOSE or not msg.complete
            if isinstance(exc, ShuttingDownError) or self.state.shutting_down:
                close = True
            self._write(error_response(exc, close=close))
            return status, close

    def _health(self, msg: _Message) -> int:
        if self.state.shutting_down:
            status, reason, body = 503, b"Service Unavailable", b'{"status":"shutting down"}'
        else:
            status, reason, body = 200, b"OK", b'{"status":"ok"}'
        head = json_response(status, reason, body, False)
        self._write(head[: -len(body)] if msg.method == b"HEAD" else head)
        return status

    def _ready(self, msg: _Message) -> int:
        """``GET /ready``: 200 ``{"status": "ready"}``, else 503 ``{"status": "not ready",
        "reason": …}`` (`stcs.readiness`)."""
        reason = self.state.readiness.reason()
        if reason is None:
            status, phrase, body = 200, b"OK", b'{"status":"ready"}'
        else:
            status, phrase = 503, b"Service Unavailable"
            body = orjson.dumps({"status": "not ready", "reason": reason})
        head = json_response(status, phrase, body, False)
        self._write(head[: -len(body)] if msg.method == b"HEAD" else head)
        return status

    async def _auth(self, msg: _Message, info: dict[str, Any]) -> tuple[int, bool]:
        """``GET /auth``: authenticate only (nginx ``auth_request``): 204 with the user id in
        ``X-Stcs-User-Id``; 401/403/503/502 as the error table.  Starts no instance."""
        state = self.state
        try:
            token = extract_token(msg.special)
            user_id = validate_user_id(await state.resolver.resolve(token, self))
            info["user_id"] = user_id
            if user_id in state.blocklist:
                raise UserBlockedError("this user is blocked")
        except RequestError as exc:
            self._write(error_response(exc, close=not msg.complete))
            return status_of(exc), not msg.complete
        self._write(
            _response_head(
                204,
                b"No Content",
                [(b"X-Stcs-User-Id", user_id.encode())],
                close=not msg.complete,
            )
        )
        return 204, not msg.complete

    async def _control(self, msg: _Message, info: dict[str, Any]) -> tuple[int, bool]:
        """Relay to the aiohttp control application over its unix socket, unchanged.  A request
        with a body is checked first, so no body is asked for (``100 Continue``) or read that
        would be refused: the admin key (AdminForbiddenError), then whether the route takes a
        body at all (BodyTooLargeError, 413: ``/health``, ``/auth``, ``/admin-health``,
        ``/metrics``, and GET, HEAD, DELETE, OPTIONS on ``/admin/*``)."""
        if msg.has_body:
            path = msg.url.partition(b"?")[0]
            if path not in _OWN_PATHS:
                verify_admin_key(
                    self.relay.settings.admin_api_key,
                    msg.special.get(b"x-api-key"),
                    msg.special.get(b"authorization"),
                )
            if path in _BODILESS_PATHS or msg.method in _BODILESS_METHODS:
                raise BodyTooLargeError("this endpoint takes no request body")
        headers = filter_headers(msg.headers, CONTROL_DROP)
        body, chunked = await self._body_for_upstream(msg)
        head = self._upstream_head(msg, b"localhost", headers, body, chunked)
        try:
            resp = await self.state.upstream_pool.request(
                self.relay.control, head, body, chunked=chunked, head_only=msg.method == b"HEAD"
            )
        except (UnreachableError, UpstreamFailedError) as exc:
            log.error("control plane unreachable", error=str(exc))
            raise UpstreamError("stcs's control plane failed") from None
        return await self._relay_response(msg, resp, info)

    async def _proxy(self, msg: _Message, info: dict[str, Any]) -> tuple[int, bool]:
        state = self.state
        resolver = state.resolver
        if state.shutting_down:
            raise ShuttingDownError("server is shutting down")
        token = extract_token(msg.special)
        user_id = validate_user_id(await resolver.resolve(token, self))
        info["user_id"] = user_id
        structlog.contextvars.bind_contextvars(user_id=user_id)
        if user_id in state.blocklist:
            raise UserBlockedError("this user is blocked")
        quotas = state.quotas
        # Per-user rate, concurrency and disk limits (stcs.quotas): before any body is read.
        admission = await quotas.admit(
            user_id, msg.method.decode("latin-1"), msg.url.decode("latin-1")
        )
        status = 0
        try:
            status, close = await self._forward(msg, info, user_id, admission)
        finally:
            admission.done(status)
        return status, close

    async def _forward(
        self, msg: _Message, info: dict[str, Any], user_id: str, admission: Admission
    ) -> tuple[int, bool]:
        state = self.state
        supervisor = state.supervisor
        headers = filter_headers(msg.headers, REQUEST_DROP_FRAMING)
        body: bytes | AsyncIterator[bytes] | None = None
        chunked = False
        small = True
        if msg.has_body:
            if msg.content_length is not None and msg.content_length > SMALL_BODY:
                small = False  # streamed to chroma as it arrives (bounded by bodyTimeout)
            else:
                # Read before a slot is taken (a stalled client holds no instance): a small
                # body, chunked or not, goes upstream whole, with the head.
                await self._prefetch(msg)
                if msg.complete:
                    body = self._take_body(msg)
                else:
                    small = False
        blocklist = state.blocklist

        def not_blocked() -> None:
            # Again now the body is in (a block may have come meanwhile), and after every wait
            # inside acquire (a request waiting on the block's hold must not restart the user).
            if user_id in blocklist:
                raise UserBlockedError("this user is blocked")

        for attempt in (1, 2):
            async with supervisor.acquire(user_id, not_blocked, self) as lease:
                info["cold_start"] = info["cold_start"] or lease.cold_start
                info["upstream_port"] = lease.port
                if admission.wants_body and msg.has_body and not isinstance(body, bytes):
                    body, small = await self._whole_body(msg), True  # quotas count its ids
                # Quotas: the user's write lock, then disk and chroma's own counts.
                await admission.check_write(lease.port, body if isinstance(body, bytes) else None)
                if msg.has_body and not small:
                    body, chunked = await self._body_for_upstream(msg)
                head = self._upstream_head(
                    msg, b"127.0.0.1:%d" % lease.port, headers, body, chunked
                )
                try:
                    resp = await state.upstream_pool.request(
                        lease.child, head, body, chunked=chunked, head_only=msg.method == b"HEAD"
                    )
                except UnreachableError:
                    # Nothing reached chroma: stop the instance and retry once on a fresh one.
                    supervisor.mark_unreachable(lease.instance)
                    if attempt == 2:
                        raise UpstreamError("the user's chroma server is unreachable") from None
                    continue
                except UpstreamFailedError as exc:
                    if msg.body_error is not None:
                        raise msg.body_error from None
                    if lease.instance.stop_error is not None:  # stopped by policy (memory)
                        raise lease.instance.stop_error from None
                    log.warning("upstream request failed", port=lease.port, error=str(exc))
                    raise UpstreamError(
                        "the user's chroma server failed during the request"
                    ) from None
                return await self._relay_response(msg, resp, info)
        raise AssertionError("unreachable")

    # -- bodies -----------------------------------------------------------------------------

    def _upstream_head(
        self,
        msg: _Message,
        host: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes] | None,
        chunked: bool,
    ) -> bytes:
        parts = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (msg.method, msg.url, host)]
        parts.extend(b"%s: %s\r\n" % pair for pair in headers)
        if isinstance(body, bytes):
            parts.append(b"Content-Length: %d\r\n\r\n" % len(body))
        elif body is None:
            parts.append(b"\r\n")
        elif chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
        else:
            parts.append(b"Content-Length: %d\r\n\r\n" % (msg.content_length or 0))
        return b"".join(parts)

    def _continue(self, msg: _Message) -> None:
        """Answer ``Expect: 100-continue`` (after the auth and size checks), once."""
        if msg.expect_continue and not msg.received and not msg.complete:
            msg.expect_continue = False
            if self.transport is not None and not self.closed:  # now, not after the log line
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def _body_for_upstream(
        self, msg: _Message
    ) -> tuple[bytes | AsyncIterator[bytes] | None, bool]:
        if not msg.has_body:
            return None, False
        if msg.content_length is not None and msg.content_length <= SMALL_BODY:
            return await self._read_body(msg), False
        return self._stream_body(msg), msg.chunked

    async def _read_body(self, msg: _Message) -> bytes:
        """The whole body of a request with ``Content-Length`` ≤ `SMALL_BODY` (so `_prefetch`
        ends with it complete).  Raises what `_prefetch` raises."""
        await self._prefetch(msg)
        return self._take_body(msg)

    async def _whole_body(self, msg: _Message) -> bytes:
        """The whole body of any request (up to ``maxBodySize``), read into memory.  Raises
        what `_stream_body` raises."""
        return b"".join([chunk async for chunk in self._stream_body(msg)])

    def _take_body(self, msg: _Message) -> bytes:
        data = b"".join(msg.body)
        msg.body.clear()
        msg.buffered = 0
        self._update_reading()
        return data

    async def _prefetch(self, msg: _Message) -> None:
        """Wait until the body is complete or `SMALL_BODY` bytes of it are buffered.  Raises
        what the body stream raises (timeout, size, framing)."""
        self._continue(msg)
        while not msg.complete and msg.buffered < SMALL_BODY:
            if msg.body_error is not None:
                raise msg.body_error
            await self._more_body(msg)
        if msg.body_error is not None:
            raise msg.body_error

    async def _more_body(self, msg: _Message) -> None:
        """Wait for the next piece of ``msg``'s body (or its end, or an error).  Raises
        RequestTimeoutError after ``bodyTimeout`` without one; CancelledError if the client
        left (logged 499)."""
        more = msg.more
        assert more is not None
        if self.closed:
            raise asyncio.CancelledError
        more.clear()
        try:
            await asyncio.wait_for(more.wait(), self.relay.body_timeout)
        except asyncio.TimeoutError:
            msg.body_error = RequestTimeoutError(
                f"no request body bytes for {self.relay.settings.body_timeout} ms"
            )
            self.stopped = True
            raise msg.body_error from None

    async def _stream_body(self, msg: _Message) -> AsyncIterator[bytes]:
        """The body as it arrives, with back-pressure on the client.  Raises
        RequestTimeoutError after ``bodyTimeout`` without a byte, BodyTooLargeError past
        ``maxBodySize``, BadRequestError if the client closed mid-body."""
        self._continue(msg)
        while True:
            while msg.body:
                chunk = msg.body.popleft()
                msg.buffered -= len(chunk)
                if self.reading_paused and msg.buffered < BODY_HIGH_WATER // 2:
                    self._update_reading()
                yield chunk if isinstance(chunk, bytes) else bytes(chunk)  # gathered: ≤ 4 KiB
            if msg.body_error is not None:
                raise msg.body_error
            if msg.complete:
                return
            await self._more_body(msg)

    # -- responses --------------------------------------------------------------------------

    async def _relay_response(
        self, msg: _Message, resp: UpstreamResponse, info: dict[str, Any]
    ) -> tuple[int, bool]:
        """Relay ``resp`` to the client with back-pressure; return (status, close)."""
        try:
            close = not msg.keep_alive or self.state.shutting_down
            status = resp.status
            length = resp.content_length
            if not resp.has_body:
                headers = filter_headers(resp.headers, RESPONSE_DROP)
                self._write(_response_head(status, resp.reason, headers, close))
                return status, close
            if length is not None and length <= SMALL_BODY:
                try:
                    data = await resp.read()
                except UpstreamFailedError as exc:
                    log.warning("upstream failed mid-response", error=str(exc))
                    raise UpstreamError(
                        "the user's chroma server failed during the request"
                    ) from None
                headers = filter_headers(resp.headers, RESPONSE_DROP_FRAMING)
                headers.append((b"Content-Length", b"%d" % len(data)))
                self._write(_response_head(status, resp.reason, headers, close) + data)
                return status, close
            headers = filter_headers(
                resp.headers, RESPONSE_DROP if length is not None else RESPONSE_DROP_FRAMING
            )
            chunked = length is None and msg.version == "1.1"
            if length is None and not chunked:
                close = True  # an HTTP/1.0 client: the body ends with the connection
            if chunked:
                headers.append((b"Transfer-Encoding", b"chunked"))
            info["response_started"] = True
            self._send_held()  # a streamed answer goes out as it comes
            self._write(_response_head(status, resp.reason, headers, close))
            try:
                async for chunk in resp.chunks():
                    if self.closed:
                        raise asyncio.CancelledError
                    if chunked:
                        self.transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))  # type: ignore[union-attr]
                    else:
                        self._write(chunk)
                    if not self.writable.is_set():
                        await self.writable.wait()
                if chunked:
                    self._write(b"0\r\n\r\n")
            except UpstreamFailedError as exc:
                # The status line is gone already: abort, so the client sees a broken response,
                # not a short one that looks complete.
                log.warning("upstream failed mid-response", error=str(exc))
                self._abort()
                info["upstream_status"] = status
                return 502, True
            if self.closed:
                raise asyncio.CancelledError
            return status, close
        finally:
            resp.release()

    # -- connection helpers -----------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            return
        if self.held is not None:
            self.held.append(data)  # sent after the request line is logged (`_run`)
        else:
            self.transport.write(data)

    def _send_held(self) -> None:
        """Send what a request's handler wrote: after its log line, so a client that has its
        answer finds the line already written (as aiohttp did)."""
        held, self.held = self.held, None
        if held and not self.closed and self.transport is not None:
            self.transport.write(held[0] if len(held) == 1 else b"".join(held))

    def _refuse_head(self, exc: RequestError) -> None:
        """A head that cannot be completed (too large, too slow): answer and close, unless a
        request is being served (then only close after it)."""
        self.stopped = True
        self._stop_reading()
        self._cancel_timer()
        if self.active is None:
            self._write(error_response(exc, close=True))
            status = status_of(exc)
            if self.relay.refusals.admit(self.peer, status):
                log.info("request refused", status=status, reason=exc.message, client=self.peer)
            self.close()
        else:
            self.pipeline.clear()
            self.pending_refusal = exc

    def _framing_error(self, reason: str) -> None:
        msg = self.active
        if msg is not None and not msg.complete:
            # The body of the request being served is broken (bad chunk): fail it.
            msg.body_error = BadRequestError(f"malformed request body: {reason}")
            self.stopped = True
            self._stop_reading()
            if msg.more is not None:
                msg.more.set()
            return
        self._refuse_head(BadRequestError(f"malformed request: {reason}"))

    def _head_timed_out(self) -> None:
        self.timer = None
        if self.active is not None:
            return
        if self.msg is None and not self.in_head:
            self._end_linger()  # nothing sent yet: just close, as nginx does
            return
        self._refuse_head(
            RequestTimeoutError(
                f"request head not received within {self.relay.settings.headers_timeout} ms"
            )
        )

    def _set_timer(self, delay: float, callback: Any) -> None:
        self._cancel_timer()
        self.timer = self.loop.call_later(delay, callback)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _update_reading(self) -> None:
        if self.backlog and not self.feeding and not self._parsed_enough():
            data, self.backlog = self.backlog, b""
            self._feed(data)  # ends with _update_reading
            return
        msg = self.active
        pause = (
            bool(self.pipeline)
            or bool(self.backlog)
            or self.stopped
            or not self.writable.is_set()
            or (msg is not None and msg.buffered > BODY_HIGH_WATER)
        )
        if self.msg is not None and self.msg is not msg and self.msg.buffered > BODY_HIGH_WATER:
            pause = True
        if pause and not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()
        elif not pause and self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def _stop_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def close(self) -> None:
        """Close after what was written; when the client may still be sending (a refused or
        half-read request), first *linger*: send FIN, read and discard for up to `LINGER_S`,
        so the client reads our answer instead of a reset (nginx ``lingering_close``)."""
        self._cancel_timer()
        transport = self.transport
        if transport is None or self.closed or self.lingering:
            return
        msg = self.msg or self.active
        if not (self.stopped or (msg is not None and not msg.complete)):
            self._end_linger()
            return
        self.lingering = True
        self.stopped = True
        if transport.can_write_eof():
            transport.write_eof()
        self.reading_paused = False
        transport.resume_reading()
        self.timer = self.loop.call_later(LINGER_S, self._end_linger)

    def _end_linger(self) -> None:
        """Close; if what was written is still unread, abort after ``sendTimeout``."""
        self.timer = None
        transport = self.transport
        if transport is not None and not self.closed:
            self.closed = True
            transport.close()
            if transport.get_write_buffer_size():
                self.loop.call_later(self.relay.send_timeout, transport.abort)

    # -- the client as the supervisor and resolver see it (`supervisor.Requester`) ------------

    @property
    def address(self) -> str | None:
        """The client address of the request being served (`client_address`)."""
        msg = self.active
        return client_address(self.peer, msg.forwarded if msg else [], self.relay.trusted)

    def check_gone(self) -> None:
        """After a half-close, find out whether the client is still there (asked by the
        supervisor while the request waits in the start queue, a few times a second).

        TCP cannot tell a half-close (``shutdown(SHUT_WR)``, still reading) from a close: the
        difference shows only when something is sent, which a closed socket answers with a
        reset.  So the first call sends an interim ``100 Continue`` (HTTP/1.1 clients accept
        1xx answers at any time, RFC 9110 §15.2); the later ones read the socket's error
        (``SO_ERROR``, set by the reset) and, if it is set, abort the connection: its request is
        cancelled as if the client had reset it.  Not for HTTP/1.0 clients (no 1xx for them).
        """
        transport = self.transport
        msg = self.active
        if self.closed or not self.eof or transport is None or msg is None:
            return
        if not self.probed:
            self.probed = True
            if msg.version == "1.1":
                transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        sock = transport.get_extra_info("socket")
        try:
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if sock else 0
        except OSError:
            error = 0
        if error:
            log.info("client gone", client=self.address, error=os.strerror(error))
            self._abort()

    def eof_received(self) -> bool | None:
        """The client half-closed.  After complete requests that is not a hang-up (RFC 9112
        §9.6 leaves the connection to close after the answers): keep writing, answer what was
        asked, then close.  Mid-request, or idle, the connection closes now."""
        if self.lingering:
            self._end_linger()
            return None
        active = self.active
        asked = (active is not None and active.complete) or bool(self.pipeline)
        if asked and self.msg is None and not self.closed:
            self.eof = True
            return True
        return None

    def abort(self) -> None:
        self._abort()

    def _abort(self) -> None:
        self._cancel_timer()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()
