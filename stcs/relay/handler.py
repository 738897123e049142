"""What a request is answered with, apart from the connection it came on: ``/health``,
``/ready`` and ``/auth`` here, control paths relayed to the aiohttp application, the rest
authenticated, admitted by the quotas, leased and forwarded to the user's chroma, the answer
relayed back with back-pressure.  `Relay` is the listener of a serving stcs, with this handler.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import structlog

from stcs.answers import status_of
from stcs.auth import validate_user_id, verify_admin_key
from stcs.config import Settings
from stcs.errors import (
    BodyTooLargeError,
    RequestError,
    ShuttingDownError,
    UpstreamError,
    UserBlockedError,
)
from stcs.quotas import Admission
from stcs.relay.cycle import SMALL_BODY, RequestCycle
from stcs.relay.head import Request
from stcs.relay.limits import Limits
from stcs.relay.protocol import Listener
from stcs.relay.wire import (
    CONTROL_DROP,
    REQUEST_DROP_FRAMING,
    RESPONSE_DROP,
    RESPONSE_DROP_FRAMING,
    error_response,
    extract_token,
    filter_headers,
    json_response,
    response_head,
)
from stcs.state import State
from stcs.upstream import UnixTarget, UnreachableError, UpstreamFailedError, UpstreamResponse

log = structlog.get_logger("stcs.relay")

CONTROL_PATHS = (b"/admin-health", b"/metrics")
OWN_PATHS = (b"/health", b"/ready", b"/auth")  # other methods: the control plane answers 405
# Own paths that take no request body, whatever the method (every route on them is GET), and
# methods no admin route reads a body of (stcs.app, stcs.admin): such a body is refused (413)
# before any of it is asked for or read.
_BODILESS_PATHS = (*OWN_PATHS, *CONTROL_PATHS)
_BODILESS_METHODS = (b"GET", b"HEAD", b"DELETE", b"OPTIONS")
_STATUS_CLOSE = {408, 413, 431, 400, 501}


class Handler:
    """Serves one request (`RequestCycle`); returns (status for the log line, close the
    connection after it).  ``control``: the unix socket of the aiohttp control application."""

    def __init__(self, state: State, control: UnixTarget, admin_api_key: str) -> None:
        self.state = state
        self.control = control
        self.admin_api_key = admin_api_key

    async def __call__(self, cycle: RequestCycle) -> tuple[int, bool]:
        request = cycle.request
        path = request.path
        method = request.method
        if path == b"/health" and method in (b"GET", b"HEAD") and not request.has_body:
            return self._health(cycle), False
        if path == b"/ready" and method in (b"GET", b"HEAD") and not request.has_body:
            return self._ready(cycle), False
        if path == b"/auth" and method == b"GET" and not request.has_body:
            return await self._auth(cycle)
        try:
            if path in CONTROL_PATHS or path.startswith(b"/admin/") or path in OWN_PATHS:
                return await self._control(cycle)
            return await self._proxy(cycle)
        except RequestError as exc:
            status = status_of(exc)
            if cycle.response_started:
                cycle.conn.abort()
                return status, True
            close = status in _STATUS_CLOSE or not request.complete
            if isinstance(exc, ShuttingDownError) or self.state.shutting_down:
                close = True
            cycle.write(error_response(exc, close=close))
            return status, close

    def _health(self, cycle: RequestCycle) -> int:
        if self.state.shutting_down:
            status, reason, body = 503, b"Service Unavailable", b'{"status":"shutting down"}'
        else:
            status, reason, body = 200, b"OK", b'{"status":"ok"}'
        head = json_response(status, reason, body, False)
        cycle.write(head[: -len(body)] if cycle.request.method == b"HEAD" else head)
        return status

    def _ready(self, cycle: RequestCycle) -> int:
        """``GET /ready``: 200 ``{"status": "ready"}``, else 503 ``{"status": "not ready",
        "reason": …}`` (`stcs.readiness`)."""
        reason = self.state.readiness.reason()
        if reason is None:
            status, phrase, body = 200, b"OK", b'{"status":"ready"}'
        else:
            status, phrase = 503, b"Service Unavailable"
            body = orjson.dumps({"status": "not ready", "reason": reason})
        head = json_response(status, phrase, body, False)
        cycle.write(head[: -len(body)] if cycle.request.method == b"HEAD" else head)
        return status

    async def _auth(self, cycle: RequestCycle) -> tuple[int, bool]:
        """``GET /auth``: authenticate only (nginx ``auth_request``): 204 with the user id in
        ``X-Stcs-User-Id``; 401/403/503/502 as the error table.  Starts no instance."""
        state = self.state
        request = cycle.request
        try:
            token = extract_token(request.special)
            resolver = state.resolver
            # In a cluster the router asks any node: the user may live on another one.
            resolve = getattr(resolver, "resolve_anywhere", resolver.resolve)
            user_id = validate_user_id(await resolve(token, cycle.conn))
            cycle.user_id = user_id
            if user_id in state.blocklist:
                raise UserBlockedError("this user is blocked")
        except RequestError as exc:
            cycle.write(error_response(exc, close=not request.complete))
            return status_of(exc), not request.complete
        cycle.write(
            response_head(
                204,
                b"No Content",
                [(b"X-Stcs-User-Id", user_id.encode())],
                close=not request.complete,
            )
        )
        return 204, not request.complete

    async def _control(self, cycle: RequestCycle) -> tuple[int, bool]:
        """Relay to the aiohttp control application over its unix socket, unchanged.  A request
        with a body is checked first, so no body is asked for (``100 Continue``) or read that
        would be refused: the admin key (AdminForbiddenError), then whether the route takes a
        body at all (BodyTooLargeError, 413: ``/health``, ``/auth``, ``/admin-health``,
        ``/metrics``, and GET, HEAD, DELETE, OPTIONS on ``/admin/*``)."""
        request = cycle.request
        if request.has_body:
            path = request.path
            if path not in OWN_PATHS:
                verify_admin_key(
                    self.admin_api_key,
                    request.special.get(b"x-api-key"),
                    request.special.get(b"authorization"),
                )
            if path in _BODILESS_PATHS or request.method in _BODILESS_METHODS:
                raise BodyTooLargeError("this endpoint takes no request body")
        headers = filter_headers(request.headers, CONTROL_DROP)
        body, chunked = await cycle.body_for_upstream()
        head = upstream_head(request, b"localhost", headers, body, chunked)
        try:
            resp = await self.state.upstream_pool.request(
                self.control, head, body, chunked=chunked, head_only=request.method == b"HEAD"
            )
        except (UnreachableError, UpstreamFailedError) as exc:
            log.error("control plane unreachable", error=str(exc))
            raise UpstreamError("stcs's control plane failed") from None
        return await relay_response(cycle, resp, self.state.shutting_down)

    async def _proxy(self, cycle: RequestCycle) -> tuple[int, bool]:
        state = self.state
        request = cycle.request
        if state.shutting_down:
            raise ShuttingDownError("server is shutting down")
        token = extract_token(request.special)
        user_id = validate_user_id(await state.resolver.resolve(token, cycle.conn))
        cycle.user_id = user_id
        structlog.contextvars.bind_contextvars(user_id=user_id)
        if user_id in state.blocklist:
            raise UserBlockedError("this user is blocked")
        # Per-user rate, concurrency and disk limits (stcs.quotas): before any body is read.
        admission = await state.quotas.admit(
            user_id, request.method.decode("latin-1"), request.url.decode("latin-1")
        )
        status = 0
        try:
            status, close = await self._forward(cycle, user_id, admission)
        finally:
            admission.done(status)
        return status, close

    async def _forward(
        self, cycle: RequestCycle, user_id: str, admission: Admission
    ) -> tuple[int, bool]:
        state = self.state
        supervisor = state.supervisor
        request = cycle.request
        headers = filter_headers(request.headers, REQUEST_DROP_FRAMING)
        body: bytes | AsyncIterator[bytes] | None = None
        chunked = False
        small = True
        if request.has_body:
            if request.content_length is not None and request.content_length > SMALL_BODY:
                small = False  # streamed to chroma as it arrives (bounded by bodyTimeout)
            else:
                # Read before a slot is taken (a stalled client holds no instance): a small
                # body, chunked or not, goes upstream whole, with the head.
                await cycle.prefetch()
                if request.complete:
                    body = cycle.take_body()
                else:
                    small = False
        blocklist = state.blocklist

        def not_blocked() -> None:
            # Again now the body is in (a block may have come meanwhile), and after every wait
            # inside acquire (a request waiting on the block's hold must not restart the user).
            if user_id in blocklist:
                raise UserBlockedError("this user is blocked")

        for attempt in (1, 2):
            async with supervisor.acquire(user_id, not_blocked, cycle.conn) as lease:
                cycle.cold_start = cycle.cold_start or lease.cold_start
                cycle.upstream_port = lease.port
                if admission.wants_body and request.has_body and not isinstance(body, bytes):
                    body, small = await cycle.whole_body(), True  # quotas count its ids
                # Quotas: the user's write lock, then disk and chroma's own counts.
                await admission.check_write(lease.child, body if isinstance(body, bytes) else None)
                if request.has_body and not small:
                    body, chunked = await cycle.body_for_upstream()
                head = upstream_head(request, b"127.0.0.1:%d" % lease.port, headers, body, chunked)
                try:
                    resp = await state.upstream_pool.request(
                        lease.child,
                        head,
                        body,
                        chunked=chunked,
                        head_only=request.method == b"HEAD",
                    )
                except UnreachableError:
                    # Nothing reached chroma: stop the instance and retry once on a fresh one.
                    supervisor.mark_unreachable(lease.instance)
                    if attempt == 2:
                        raise UpstreamError("the user's chroma server is unreachable") from None
                    continue
                except UpstreamFailedError as exc:
                    if request.body_error is not None:
                        raise request.body_error from None
                    if lease.instance.stop_error is not None:  # stopped by policy (memory)
                        raise lease.instance.stop_error from None
                    log.warning("upstream request failed", port=lease.port, error=str(exc))
                    raise UpstreamError(
                        "the user's chroma server failed during the request"
                    ) from None
                return await relay_response(cycle, resp, state.shutting_down)
        raise AssertionError("unreachable")


def upstream_head(
    request: Request,
    host: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes | AsyncIterator[bytes] | None,
    chunked: bool,
) -> bytes:
    """The head sent upstream: the client's request line and header bytes (``headers``,
    already filtered), ``Host``, and the framing of the body actually sent."""
    parts = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (request.method, request.url, host)]
    parts.extend(b"%s: %s\r\n" % pair for pair in headers)
    if isinstance(body, bytes):
        parts.append(b"Content-Length: %d\r\n\r\n" % len(body))
    elif body is None:
        parts.append(b"\r\n")
    elif chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
    else:
        parts.append(b"Content-Length: %d\r\n\r\n" % (request.content_length or 0))
    return b"".join(parts)


async def relay_response(
    cycle: RequestCycle, resp: UpstreamResponse, shutting_down: bool
) -> tuple[int, bool]:
    """Relay ``resp`` to the client with back-pressure; return (status, close)."""
    request = cycle.request
    conn = cycle.conn
    try:
        close = not request.keep_alive or shutting_down
        status = resp.status
        length = resp.content_length
        if not resp.has_body:
            headers = filter_headers(resp.headers, RESPONSE_DROP)
            cycle.write(response_head(status, resp.reason, headers, close))
            return status, close
        if length is not None and length <= SMALL_BODY:
            try:
                data = await resp.read()
            except UpstreamFailedError as exc:
                log.warning("upstream failed mid-response", error=str(exc))
                raise UpstreamError("the user's chroma server failed during the request") from None
            headers = filter_headers(resp.headers, RESPONSE_DROP_FRAMING)
            headers.append((b"Content-Length", b"%d" % len(data)))
            cycle.write(response_head(status, resp.reason, headers, close) + data)
            return status, close
        headers = filter_headers(
            resp.headers, RESPONSE_DROP if length is not None else RESPONSE_DROP_FRAMING
        )
        chunked = length is None and request.version == "1.1"
        if length is None and not chunked:
            close = True  # an HTTP/1.0 client: the body ends with the connection
        if chunked:
            headers.append((b"Transfer-Encoding", b"chunked"))
        cycle.response_started = True
        cycle.send_held()  # a streamed answer goes out as it comes
        # The head goes out with the first piece of the body (usually in the same read from
        # chroma): one write, not two.
        pending = response_head(status, resp.reason, headers, close)
        writable = conn.flow.writable
        try:
            async for chunk in resp.chunks():
                if conn.closed:
                    raise asyncio.CancelledError
                if chunked:
                    cycle.write_chunk(chunk, pending)
                else:
                    cycle.write_after(pending, chunk)
                pending = b""
                if not writable.is_set():
                    await writable.wait()
            if chunked:
                cycle.write(pending + b"0\r\n\r\n")
            elif pending:
                cycle.write(pending)
        except UpstreamFailedError as exc:
            # The status line is gone already: abort, so the client sees a broken response,
            # not a short one that looks complete.
            log.warning("upstream failed mid-response", error=str(exc))
            conn.abort()
            cycle.upstream_status = status
            return 502, True
        if conn.closed:
            raise asyncio.CancelledError
        return status, close
    finally:
        resp.release()


class Relay(Listener):
    """The data plane of one stcs process: a `ClientConnection` per accepted socket, each
    request served by a `Handler` on ``state``.  ``control_socket`` is the unix socket path
    the aiohttp control application listens on."""

    def __init__(self, state: State, control_socket: str) -> None:
        settings = state.settings
        self._handler = Handler(state, UnixTarget(control_socket), settings.admin_api_key)
        super().__init__(
            state, self._handler, Limits.from_settings(settings), loop=asyncio.get_running_loop()
        )

    def apply(self, settings: Settings) -> None:
        """Reloaded settings (`stcs.reload`): the edge limits for new connections, and the
        admin key at once."""
        self.apply_limits(Limits.from_settings(settings))
        self._handler.admin_api_key = settings.admin_api_key
