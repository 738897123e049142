"""What a request is answered with, apart from the connection it came on: ``/health``,
``/ready`` and ``/auth`` here, control paths relayed to the aiohttp application, the rest
authenticated, admitted by the quotas, leased and forwarded to the user's chroma, the answer
relayed back with back-pressure.  `Relay` is the listener of a serving stcs, with this handler.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import structlog

from stcs.answers import UNEXPECTED, status_of
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
    answer_response,
    error_response,
    extract_token,
    filter_headers,
    json_response,
    response_head,
)
from stcs.state import State
from stcs.supervisor import Instance, Lease
from stcs.upstream import (
    PooledConnection,
    UnixTarget,
    UnreachableError,
    UpstreamFailedError,
    UpstreamResponse,
)

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
        # `serve_now`'s token lookup with no wait (None: none, every request in a task).
        self._peek: Callable[[str], str | None] | None = getattr(state.resolver, "peek", None)

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
            return self.refuse(cycle, exc)

    def refuse(self, cycle: RequestCycle, exc: RequestError) -> tuple[int, bool]:
        """Answer ``exc`` (`stcs.answers`) or, once the answer is streaming, abort the
        connection; (status, close)."""
        status = status_of(exc)
        if cycle.response_started:
            cycle.conn.abort()
            return status, True
        close = status in _STATUS_CLOSE or not cycle.request.complete
        if isinstance(exc, ShuttingDownError) or self.state.shutting_down:
            close = True
        cycle.write(error_response(exc, close=close))
        return status, close

    def serve_now(self, cycle: RequestCycle) -> bool:
        """Serve ``cycle``'s request in callbacks (`Exchange`) when nothing on its way can
        wait: a whole request (head and body, ≤ `SMALL_BODY`) that passes `_can_serve_now`,
        with an idle pooled connection to the instance (`UpstreamPool.take_idle`).  The checks
        of the task path, in its order; the bytes sent and the answers are the same (issue 24: no
        task, coroutine chain or future per request; a small chunked answer that came whole
        goes out with ``Content-Length``).

        True: taken.  False: nothing was taken (no lease, no slot, no connection; a token the
        resolver knew is kept as ``cycle.user_id``): serve it in a task, still the way for
        everything else — cold starts, holds, quotas, large or streamed bodies, refusals, own
        and control paths."""
        request = cycle.request
        if not request.complete or request.buffered > SMALL_BODY:
            return False
        ready = self._can_serve_now(cycle)
        if ready is None:
            return False
        admission, inst = ready
        assert inst.child is not None  # ready
        upstream = self.state.upstream_pool.take_idle(inst.child)
        if upstream is None:
            return False
        lease = self.state.supervisor.lease_ready(inst)  # nothing ran since ready_instance
        cycle.upstream_port = lease.port
        self.state.metrics.requests.in_callbacks += 1
        Exchange(self, cycle, lease, admission).send(upstream)
        return True

    def await_body(self, cycle: RequestCycle) -> bool:
        """Whether the rest of the request's body may be awaited in the connection's callbacks
        (`ClientConnection`, bounded by ``bodyTimeout``), to try `serve_now` at its end: a
        ``Content-Length`` body of at most `SMALL_BODY` bytes, no ``Expect: 100-continue`` (the
        client waits for our word), and `_can_serve_now` passes now — a request the task path
        would refuse is refused by it before any of its body is read, as ever."""
        request = cycle.request
        length = request.content_length
        return (
            length is not None
            and length <= SMALL_BODY
            and not request.expect_continue
            and self._can_serve_now(cycle) is not None
        )

    def _can_serve_now(self, cycle: RequestCycle) -> tuple[Admission, Instance] | None:
        """The task path's steps before the lease, where none waits: a proxied path (not HEAD,
        not one of stcs's own or the control plane's), not shutting down, a token the resolver
        knows at once (``peek``: the user id is kept as ``cycle.user_id``), a user not blocked,
        nothing for the quotas to take or wait for (`Quotas.admit_now`: no limit, or only route
        limits and not a write), a ready instance (`Supervisor.ready_instance`).
        The admission and the instance if so, else None.  Takes nothing."""
        state = self.state
        request = cycle.request
        if (
            request.reject is not None
            or request.body_error is not None
            or request.method == b"HEAD"
            or state.shutting_down
            or self._peek is None
        ):
            return None
        path = request.path
        if path in OWN_PATHS or path in CONTROL_PATHS or path.startswith(b"/admin/"):
            return None
        user_id = cycle.user_id
        if user_id is None:
            try:
                token = extract_token(request.special)
            except RequestError:
                return None  # refused by the task path, as ever
            user_id = self._peek(token)
            if user_id is None:
                return None
            cycle.user_id = user_id
        if user_id in state.blocklist:
            return None
        admission = state.quotas.admit_now(user_id, request.method, request.url)
        if admission is None:
            return None
        inst = state.supervisor.ready_instance(user_id)
        return None if inst is None else (admission, inst)

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
        user_id = cycle.user_id  # known already when `serve_now` resolved it, then declined
        if user_id is None:
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
                    raise request_failed(lease, exc) from None
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
                raise answer_failed(exc) from None
            write_answer(cycle, resp, data, close)
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


def request_failed(lease: Lease, exc: UpstreamFailedError) -> RequestError:
    """The error for a request whose exchange with chroma broke before the answer's head:
    why policy stopped the instance (memory), else a 502 (logged)."""
    if lease.instance.stop_error is not None:
        return lease.instance.stop_error
    log.warning("upstream request failed", port=lease.port, error=str(exc))
    return UpstreamError("the user's chroma server failed during the request")


def answer_failed(exc: UpstreamFailedError) -> RequestError:
    """The error for an answer that broke after its head, before any of it was relayed: 502
    (logged)."""
    log.warning("upstream failed mid-response", error=str(exc))
    return UpstreamError("the user's chroma server failed during the request")


def write_answer(cycle: RequestCycle, resp: UpstreamResponse, body: bytes, close: bool) -> None:
    """A whole answer to the client: ``resp``'s head (hop-by-hop and framing headers
    dropped, RFC 9110 §7.6.1), ``Content-Length`` and ``body``, in one write."""
    headers = filter_headers(resp.headers, RESPONSE_DROP_FRAMING)
    headers.append((b"Content-Length", b"%d" % len(body)))
    cycle.write(response_head(resp.status, resp.reason, headers, close) + body)


class Exchange:
    """A proxied request served in the relay's callbacks, with no task (`Handler.serve_now`):
    sent whole on an idle pooled connection, its answer written when the upstream
    connection's callbacks bring its end (`UpstreamResponse.watcher`).

    Holds what the task path's ``async with`` and ``finally`` hold (the lease, the quota
    admission) and gives them back (`_end`) on each way out: the whole answer, or a broken
    exchange, as the upstream connection reports them (`_on_upstream`); the client leaving
    (`cancel`, from ``connection_lost``: 499, the upstream connection closed, never pooled); a
    bug (`_guarded`: 500).  An answer too large to hold, or streamed, goes to a task that relays
    it as the task path does (`_hand_over`, `relay_response`).  Runs in a log context of its
    own (request id, user id), as the task path's task does."""

    __slots__ = (
        "admission", "context", "cycle", "ended", "finished", "handler", "lease", "relaying",
        "resp", "upstream",
    )  # fmt: skip

    def __init__(
        self, handler: Handler, cycle: RequestCycle, lease: Lease, admission: Admission
    ) -> None:
        self.handler = handler
        self.cycle = cycle
        self.lease = lease
        self.admission = admission
        self.context = contextvars.Context()
        self.finished = False  # the answer is written, or a task took the request over
        self.ended = False  # what it holds is given back (`_end`)
        self.relaying = False  # the task it handed over to runs (`_relay`)
        self.upstream: PooledConnection | None = None
        self.resp: UpstreamResponse | None = None

    def done(self) -> bool:
        """Whether the request ended (`ClientConnection` asks before `cancel`)."""
        return self.finished

    def send(self, upstream: PooledConnection) -> None:
        cycle = self.cycle
        if not cycle.begun:  # begun already when its body was awaited
            cycle.begin()
        cycle.conn.task = self  # cancelled if the client leaves (`cancel`)
        self.upstream = upstream
        self.context.run(self._guarded, self._send, upstream)

    def _send(self, upstream: PooledConnection) -> None:
        cycle = self.cycle
        request = cycle.request
        structlog.contextvars.bind_contextvars(request_id=cycle.request_id, user_id=cycle.user_id)
        headers = filter_headers(request.headers, REQUEST_DROP_FRAMING)
        body = cycle.take_body() if request.has_body else None
        head = upstream_head(request, b"127.0.0.1:%d" % self.lease.port, headers, body, False)
        self.resp = self.handler.state.upstream_pool.send_now(
            upstream, head + body if body else head, self._watch
        )

    def _watch(self) -> None:
        self.context.run(self._guarded, self._on_upstream)

    def _guarded(self, step: Callable[..., None], *args: Any) -> None:
        """Run ``step``; a bug in it ends the request as the task path's does (500, logged
        with its traceback), never leaves it hanging or the connection's callbacks broken."""
        try:
            step(*args)
        except Exception:
            log.exception("request failed")
            if not self.finished:  # neither ended nor handed over
                self.finished = True
                try:
                    if self.resp is not None:
                        self.resp.watcher = None
                    cycle = self.cycle
                    if not cycle.conn.closed and not cycle.response_started:
                        cycle.write(answer_response(UNEXPECTED, close=True))
                    self._end(0, 500, True)
                except Exception:  # a bug in the ending itself: nothing more to do for it
                    log.exception("request failed")

    def _on_upstream(self) -> None:
        resp = self.resp
        assert resp is not None
        failed = resp.failed
        if failed is not None:
            resp.watcher = None
            assert isinstance(failed, UpstreamFailedError)
            if resp.head_received:
                error = answer_failed(failed)
            else:
                error = request_failed(self.lease, failed)
            status, close = self.handler.refuse(self.cycle, error)
            self._end(0, status, close)
        elif resp.done:
            resp.watcher = None
            close = not self.cycle.request.keep_alive or self.handler.state.shutting_down
            if resp.has_body:
                write_answer(self.cycle, resp, resp.take_body(), close)
            else:
                headers = filter_headers(resp.headers, RESPONSE_DROP)
                self.cycle.write(response_head(resp.status, resp.reason, headers, close))
            self._end(resp.status, resp.status, close)
        else:
            length = resp.content_length
            if length is None or length > SMALL_BODY:  # streamed: a task relays it
                resp.watcher = None
                self._hand_over(resp)
            # else: a small answer whose end is still to come

    def _end(self, admitted: int, status: int, close: bool) -> None:
        """Give back what the request holds, then its log line, metrics, answer and the
        connection's next step (`RequestCycle.end`).  Once."""
        if self.ended:
            return
        self.ended = self.finished = True
        cycle = self.cycle
        resp = self.resp
        if resp is not None:
            resp.release()  # pooled after a whole answer that keeps the connection, else closed
        elif self.upstream is not None:
            self.upstream.close()  # a bug before the request was written: never pooled
        self._give_back(admitted)
        cycle.end(status, close)

    def _give_back(self, admitted: int) -> None:
        """The lease and the quota admission (``admitted``: the status `Admission.done` is
        told), as the task path's ``async with`` and ``finally`` give them back."""
        self.handler.state.supervisor.end_lease(self.lease, self.cycle.conn)
        self.admission.done(admitted)

    def cancel(self) -> None:
        """The client left before the answer: the upstream connection is closed (its answer
        is never read), the request logged as 499."""
        if not self.finished:
            self.context.run(self._guarded, self._end, 0, 499, True)

    def _hand_over(self, resp: UpstreamResponse) -> None:
        cycle = self.cycle
        conn = cycle.conn
        # Created in this exchange's context (we run in it): the task's log lines are its own.
        task = conn.loop.create_task(cycle.run(self._relay))
        # Cancelled before its first step (the client gone as it was made), it runs nothing
        # of `_relay` or `run`: what they would give back is given back by these, in order.
        task.add_done_callback(self._settle)
        task.add_done_callback(cycle.settle, context=contextvars.Context())
        self.finished = True  # the task owns the request from here
        conn.task = task

    def _settle(self, _task: asyncio.Task[None]) -> None:
        if not self.relaying:
            self.relaying = True
            resp = self.resp
            assert resp is not None
            resp.release()
            self._give_back(0)

    async def _relay(self, cycle: RequestCycle) -> tuple[int, bool]:
        self.relaying = True
        resp = self.resp
        assert resp is not None
        status = 0
        try:
            status, close = await relay_response(cycle, resp, self.handler.state.shutting_down)
        except RequestError as exc:
            status, close = self.handler.refuse(cycle, exc)
        finally:
            self._give_back(status)
        return status, close


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
        if not settings.relay_fast_path:  # every request in a task
            self.serve_now = self.await_body = None

    def apply(self, settings: Settings) -> None:
        """Reloaded settings (`stcs.reload`): the edge limits for new connections, and the
        admin key at once."""
        self.apply_limits(Limits.from_settings(settings))
        self._handler.admin_api_key = settings.admin_api_key
